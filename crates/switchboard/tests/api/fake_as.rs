//! An in-test application service: a small axum server on loopback that records every request the
//! homeserver makes and answers the way the test tells it to (failures, legacy routes only, lazy
//! room creation on alias queries), plus helpers to write registration files and start a server with them.

#![allow(dead_code)] // shared helpers; not every test uses every one

use std::{
    collections::VecDeque,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header::AUTHORIZATION},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::harness::{RELAXED_LIMITS, Server, enc};

/// One request the homeserver made to the fake service, and what the service answered.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path exactly as received (still percent-encoded).
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
    /// The status the fake service answered with.
    pub status: u16,
    /// Set for `PUT …/transactions/{txnId}` on either route set (served or not).
    pub txn_id: Option<String>,
    /// `true` for `/_matrix/app/v1/…`, `false` for the unprefixed legacy routes.
    pub v1: bool,
}

impl Request {
    /// The path with percent-escapes decoded (`/_matrix/app/v1/rooms/#a:localhost`).
    pub fn decoded_path(&self) -> String {
        percent_decode(&self.path)
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `events` of a transaction body (empty if there are none).
    pub fn events(&self) -> Vec<Value> {
        self.json()["events"].as_array().cloned().unwrap_or_default()
    }

    /// The transaction ID as a number: Switchboard's IDs are decimal and strictly increasing.
    pub fn txn_number(&self) -> u64 {
        let id = self.txn_id.as_deref().expect("a transaction");
        id.parse()
            .unwrap_or_else(|_| panic!("transaction ID {id:?} is not a decimal number"))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = (u16, Value)> + Send>>;
type Callback = Arc<dyn Fn(String) -> BoxFuture + Send + Sync>;

struct Behaviour {
    /// Serve only the unprefixed 2015-era routes; `/_matrix/app/v1/…` answers 404 `M_UNRECOGNIZED`.
    legacy_only: bool,
    /// Statuses for the next transactions, one per request; afterwards `txn_status`.
    txn_statuses: VecDeque<u16>,
    txn_status: u16,
    ping_status: u16,
    room_query: Option<Callback>,
    user_query: Option<Callback>,
}

struct Inner {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Request>>,
}

pub struct FakeAs {
    /// Base URL for the registration's `url`.
    pub url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAs {
    /// A modern service: serves the `/_matrix/app/v1/` routes only, accepts every transaction.
    pub async fn start() -> Self {
        crate::harness::tls_init();
        let inner = Arc::new(Inner {
            behaviour: Mutex::new(Behaviour {
                legacy_only: false,
                txn_statuses: VecDeque::new(),
                txn_status: 200,
                ping_status: 200,
                room_query: None,
                user_query: None,
            }),
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake appservice");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            inner,
            task,
        }
    }

    /// A 2015-era service that knows only `/transactions/{txnId}`, `/users/{userId}` and `/rooms/{alias}`.
    pub async fn start_legacy() -> Self {
        crate::harness::tls_init();
        let fake = Self::start().await;
        fake.behaviour(|b| b.legacy_only = true);
        fake
    }

    fn behaviour<T>(&self, f: impl FnOnce(&mut Behaviour) -> T) -> T {
        let mut b = self.inner.behaviour.lock().expect("behaviour lock");
        f(&mut b)
    }

    /// Answer every following transaction with `status` (500: the service is down; 200: back up).
    pub fn set_transaction_status(&self, status: u16) {
        self.behaviour(|b| b.txn_status = status);
    }

    /// Answer the next transactions with these statuses, one each, before the default applies.
    pub fn queue_transaction_statuses(&self, statuses: impl IntoIterator<Item = u16>) {
        self.behaviour(|b| b.txn_statuses.extend(statuses));
    }

    pub fn set_ping_status(&self, status: u16) {
        self.behaviour(|b| b.ping_status = status);
    }

    /// Runs `f(alias)` for each `GET …/rooms/{alias}` query and answers with the status and body it
    /// returns. Without a callback the service answers 404 `M_NOT_FOUND`.
    pub fn on_room_query<F, Fut>(&self, f: F)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (u16, Value)> + Send + 'static,
    {
        let callback: Callback = Arc::new(move |alias: String| -> BoxFuture { Box::pin(f(alias)) });
        self.behaviour(|b| b.room_query = Some(callback));
    }

    /// As [`FakeAs::on_room_query`], for `GET …/users/{userId}`.
    pub fn on_user_query<F, Fut>(&self, f: F)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (u16, Value)> + Send + 'static,
    {
        let callback: Callback = Arc::new(move |user: String| -> BoxFuture { Box::pin(f(user)) });
        self.behaviour(|b| b.user_query = Some(callback));
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.requests.lock().expect("requests lock").clone()
    }

    /// Every transaction request (any route, any answer), in arrival order.
    pub fn transaction_attempts(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT" && r.txn_id.is_some())
            .collect()
    }

    /// Transaction requests the service accepted (answered 2xx): `(txnId, body)` in arrival order.
    pub fn transactions(&self) -> Vec<(String, Value)> {
        self.transaction_attempts()
            .into_iter()
            .filter(Request::succeeded)
            .map(|r| (r.txn_id.clone().expect("txn id"), r.json()))
            .collect()
    }

    /// All events of accepted transactions, flattened, in arrival order (no de-duplication).
    pub fn events(&self) -> Vec<Value> {
        self.transactions()
            .into_iter()
            .flat_map(|(_, body)| body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Polls until `done` holds for the accepted events; returns them. Panics after `timeout`.
    pub async fn wait_for_events(&self, done: impl Fn(&[Value]) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake appservice: condition not met within {timeout:?}; accepted events: {}; requests: {}",
                    summarise_events(&events),
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until `done` holds for the recorded requests; returns them. Panics after `timeout`.
    pub async fn wait_for_requests(
        &self,
        done: impl Fn(&[Request]) -> bool,
        timeout: Duration,
    ) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake appservice: condition not met within {timeout:?}; requests: {}",
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line per request, for failure messages.
    pub fn summary(&self) -> String {
        let lines: Vec<String> = self
            .requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {}{} -> {} ({} events)",
                    r.method,
                    r.path,
                    r.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default(),
                    r.status,
                    r.events().len()
                )
            })
            .collect();
        format!("[{}]", lines.join("; "))
    }
}

impl Drop for FakeAs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn summarise_events(events: &[Value]) -> String {
    let short: Vec<String> = events
        .iter()
        .map(|e| match e["content"]["body"].as_str() {
            Some(body) => format!("{}:{body}", e["type"].as_str().unwrap_or("?")),
            None => format!(
                "{}[{}]",
                e["type"].as_str().unwrap_or("?"),
                e["state_key"].as_str().unwrap_or("")
            ),
        })
        .collect();
    format!("{} [{}]", events.len(), short.join(", "))
}

enum Route {
    Transaction(String),
    User(String),
    Room(String),
    Ping,
}

/// Which AS endpoint a path names, and whether it is on the v1 or the unprefixed route set.
fn parse_route(method: &Method, path: &str) -> (Option<Route>, bool) {
    let (rest, v1) = match path.strip_prefix("/_matrix/app/v1/") {
        Some(rest) => (rest, true),
        None => (path.trim_start_matches('/'), false),
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let route = match (method.as_str(), segments.as_slice()) {
        ("PUT", ["transactions", id]) => Some(Route::Transaction(percent_decode(id))),
        ("GET", ["users", user]) => Some(Route::User(percent_decode(user))),
        ("GET", ["rooms", alias]) => Some(Route::Room(percent_decode(alias))),
        ("POST", ["ping"]) if v1 => Some(Route::Ping),
        _ => None,
    };
    (route, v1)
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let (route, v1) = parse_route(&method, &path);
    let txn_id = match &route {
        Some(Route::Transaction(id)) => Some(id.clone()),
        _ => None,
    };
    let legacy_only = inner.behaviour.lock().expect("behaviour lock").legacy_only;
    let served = route.is_some() && v1 != legacy_only;
    let unrecognized = || {
        (
            404,
            json!({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
        )
    };
    let (status, reply): (u16, Value) = match route {
        _ if !served => unrecognized(),
        None => unrecognized(),
        Some(Route::Transaction(_)) => {
            let status = {
                let mut b = inner.behaviour.lock().expect("behaviour lock");
                let fallback = b.txn_status;
                b.txn_statuses.pop_front().unwrap_or(fallback)
            };
            if (200..300).contains(&status) {
                (status, json!({}))
            } else {
                (
                    status,
                    json!({"errcode": "M_UNKNOWN", "error": "the fake service is down"}),
                )
            }
        }
        Some(Route::Ping) => {
            let status = inner.behaviour.lock().expect("behaviour lock").ping_status;
            (status, json!({}))
        }
        Some(Route::Room(alias)) => {
            let callback = inner.behaviour.lock().expect("behaviour lock").room_query.clone();
            match callback {
                Some(callback) => callback(alias).await,
                None => (404, json!({"errcode": "M_NOT_FOUND", "error": "no such room"})),
            }
        }
        Some(Route::User(user)) => {
            let callback = inner.behaviour.lock().expect("behaviour lock").user_query.clone();
            match callback {
                Some(callback) => callback(user).await,
                None => (404, json!({"errcode": "M_NOT_FOUND", "error": "no such user"})),
            }
        }
    };
    let authorization = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    inner.requests.lock().expect("requests lock").push(Request {
        method: method.as_str().to_owned(),
        path,
        query: uri.query().map(str::to_owned),
        authorization,
        body: body.to_vec(),
        status,
        txn_id,
        v1,
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(reply)).into_response()
}

/// Decodes `%XX` escapes (invalid escapes are kept as they are).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Some(byte) = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Synapse-style registration file, built up field by field.
#[derive(Clone, Debug)]
pub struct Registration {
    pub id: String,
    /// `None` writes `url: null`.
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    /// `(regex, exclusive)` entries.
    pub users: Vec<(String, bool)>,
    pub aliases: Vec<(String, bool)>,
    pub rooms: Vec<(String, bool)>,
    /// Appended verbatim as further top-level keys.
    pub extra: String,
}

impl Registration {
    /// Tokens `as_<id>` / `hs_<id>`, sender `<id>bot`, no namespaces yet.
    pub fn new(id: &str, url: Option<&str>) -> Self {
        Self {
            id: id.to_owned(),
            url: url.map(str::to_owned),
            as_token: format!("as_{id}"),
            hs_token: format!("hs_{id}"),
            sender_localpart: format!("{id}bot"),
            users: Vec::new(),
            aliases: Vec::new(),
            rooms: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn tokens(mut self, as_token: &str, hs_token: &str) -> Self {
        self.as_token = as_token.to_owned();
        self.hs_token = hs_token.to_owned();
        self
    }

    pub fn sender(mut self, localpart: &str) -> Self {
        self.sender_localpart = localpart.to_owned();
        self
    }

    pub fn users(mut self, regex: &str, exclusive: bool) -> Self {
        self.users.push((regex.to_owned(), exclusive));
        self
    }

    pub fn aliases(mut self, regex: &str, exclusive: bool) -> Self {
        self.aliases.push((regex.to_owned(), exclusive));
        self
    }

    pub fn rooms(mut self, regex: &str, exclusive: bool) -> Self {
        self.rooms.push((regex.to_owned(), exclusive));
        self
    }

    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    /// The sender's full user ID on the test server.
    pub fn sender_id(&self) -> String {
        format!("@{}:localhost", self.sender_localpart)
    }

    pub fn yaml(&self) -> String {
        let namespace = |entries: &[(String, bool)]| {
            let items: Vec<String> = entries
                .iter()
                .map(|(regex, exclusive)| format!("{{exclusive: {exclusive}, regex: {}}}", quote(regex)))
                .collect();
            format!("[{}]", items.join(", "))
        };
        let url = self.url.as_deref().map_or_else(|| "null".to_owned(), quote);
        format!(
            "id: {id}
url: {url}
as_token: {as_token}
hs_token: {hs_token}
sender_localpart: {sender}
namespaces:
  users: {users}
  aliases: {aliases}
  rooms: {rooms}
{extra}
",
            id = quote(&self.id),
            as_token = quote(&self.as_token),
            hs_token = quote(&self.hs_token),
            sender = quote(&self.sender_localpart),
            users = namespace(&self.users),
            aliases = namespace(&self.aliases),
            rooms = namespace(&self.rooms),
            extra = self.extra,
        )
    }
}

/// YAML single-quoted scalar (backslashes stay literal, which is what regexes want).
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A registration with one user and one alias namespace (either may be absent), both with the same
/// `exclusive` flag, plus `extra_yaml` appended as further top-level keys. `url: None` writes `url: null`.
#[allow(clippy::too_many_arguments)]
pub fn registration_yaml(
    id: &str,
    url: Option<&str>,
    as_token: &str,
    hs_token: &str,
    sender_localpart: &str,
    user_regex: Option<&str>,
    alias_regex: Option<&str>,
    exclusive: bool,
    extra_yaml: &str,
) -> String {
    let mut registration = Registration::new(id, url)
        .tokens(as_token, hs_token)
        .sender(sender_localpart)
        .extra(extra_yaml);
    if let Some(regex) = user_regex {
        registration = registration.users(regex, exclusive);
    }
    if let Some(regex) = alias_regex {
        registration = registration.aliases(regex, exclusive);
    }
    registration.yaml()
}

/// The `app_service_config_files` key listing `paths`, as a block sequence.
pub fn config_files_yaml(paths: &[PathBuf]) -> String {
    let mut text = String::from("app_service_config_files:\n");
    for path in paths {
        text.push_str(&format!("  - {}\n", quote(&path.display().to_string())));
    }
    text
}

/// Writes each `(file name, YAML)` into a new temporary directory; returns it with the paths.
pub fn write_registrations(files: &[(&str, &str)]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = files
        .iter()
        .map(|(name, yaml)| {
            let path = dir.path().join(name);
            std::fs::write(&path, yaml).expect("write registration");
            path
        })
        .collect();
    (dir, paths)
}

/// Starts a server whose config lists the given registration files. The extra config passed to
/// `Server::start_with` is `app_service_config_files: [...]` followed by `RELAXED_LIMITS`.
/// Keep the returned directory alive as long as the server runs (restarts read the files again).
pub async fn start_server_with_files(files: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let (dir, paths) = write_registrations(files);
    let extra = format!("{}{RELAXED_LIMITS}", config_files_yaml(&paths));
    let server = Server::start_with(&extra).await;
    (server, dir)
}

/// As [`start_server_with_files`], one file `<id>.yaml` per registration.
pub async fn start_server(registrations: &[&Registration]) -> (Server, tempfile::TempDir) {
    let named: Vec<(String, String)> = registrations
        .iter()
        .map(|r| (format!("{}.yaml", r.id), r.yaml()))
        .collect();
    let files: Vec<(&str, &str)> = named.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
    start_server_with_files(&files).await
}

/// Appends `user_id=<user>` to a path that may already carry a query.
pub fn as_user(path: &str, user_id: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}user_id={}", enc(user_id))
}

/// Registers a virtual user the way mautrix does; returns its user ID.
pub async fn register_ghost(s: &Server, as_token: &str, localpart: &str) -> String {
    let (status, body) = s
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/register?kind=user",
            Some(as_token),
            Some(json!({
                "type": "m.login.application_service",
                "username": localpart,
                "inhibit_login": true,
            })),
        )
        .await;
    assert_eq!(
        status,
        reqwest::StatusCode::OK,
        "register ghost {localpart}: {body}"
    );
    body["user_id"].as_str().expect("user_id").to_owned()
}

/// `POST /_matrix/client/v1/appservice/{id}/ping`; the server also uses a successful ping to retry
/// a failed transaction at once.
pub async fn ping(
    s: &Server,
    as_id: &str,
    token: &str,
    transaction_id: &str,
) -> (reqwest::StatusCode, Value) {
    s.call(
        reqwest::Method::POST,
        &format!("/_matrix/client/v1/appservice/{}/ping", enc(as_id)),
        Some(token),
        Some(json!({"transaction_id": transaction_id})),
    )
    .await
}

/// The `content.body` of each `m.room.message` event, in order.
pub fn message_bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}
