//! Application services, homeserver side, against an in-test service (`fake_as`): registration
//! loading, transactions (auth, order, batching, byte-identical retries, crashes), interest rules,
//! lazy alias creation on v1 and legacy routes, the client API for services, and ping.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    fake_as::{
        FakeAs, Registration, Request, as_user, config_files_yaml, message_bodies, ping, register_ghost,
        registration_yaml, start_server, write_registrations,
    },
    harness::{Server, User, binary, config_text, enc, errcode, free_port},
};

/// Upper bound for anything the tests wait for (the first retry comes after a 2 s backoff).
const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn has_body(events: &[Value], body: &str) -> bool {
    message_bodies(events).iter().any(|b| b == body)
}

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

/// Sends a text message as a service: as its sender, or as `user` when given. Returns the event ID.
async fn as_send(s: &Server, token: &str, user: Option<&str>, room: &str, txn: &str, text: &str) -> String {
    let path = room_path(room, &format!("send/m.room.message/{txn}"));
    let path = match user {
        Some(user) => as_user(&path, user),
        None => path,
    };
    let sent = s
        .ok(
            Method::PUT,
            &path,
            token,
            json!({"msgtype": "m.text", "body": text}),
        )
        .await;
    sent["event_id"].as_str().expect("event_id").to_owned()
}

async fn send_ok(s: &Server, user: &User, room: &str, txn: &str, text: &str) {
    let (status, body) = s.send_text(user, room, txn, text).await;
    assert_eq!(status, StatusCode::OK, "send {text}: {body}");
}

async fn event_ts(s: &Server, token: &str, room: &str, event_id: &str) -> i64 {
    let event = s
        .ok(
            Method::GET,
            &room_path(room, &format!("event/{}", enc(event_id))),
            token,
            Value::Null,
        )
        .await;
    event["origin_server_ts"].as_i64().expect("origin_server_ts")
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

// ---------------------------------------------------------------------------------------------
// Registration files: validation at startup

/// Puts `app_service_config_files` listing `paths` into a config made by `config_text`.
fn with_registration_files(config: String, paths: &[PathBuf]) -> String {
    let key = config_files_yaml(paths);
    if config.contains("app_service_config_files: []\n") {
        config.replace("app_service_config_files: []\n", &key)
    } else {
        format!("{config}\n{key}")
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs the binary with these registration files; it must stop with a failure. Returns its stderr.
fn startup_fails(files: &[(&str, &str)]) -> String {
    let (_regs, paths) = write_registrations(files);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("homeserver.yaml");
    std::fs::write(
        &config,
        with_registration_files(config_text(free_port(), dir.path(), ""), &paths),
    )
    .expect("write config");
    let (stdout_path, stderr_path) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
    let mut child = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::from(std::fs::File::create(&stdout_path).expect("stdout")))
        .stderr(Stdio::from(std::fs::File::create(&stderr_path).expect("stderr")))
        .spawn()
        .expect("run switchboard");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "switchboard kept running with a bad registration; stderr: {}",
                read(&stderr_path)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = read(&stderr_path);
    assert!(
        !status.success(),
        "exit status {status}; stderr: {stderr}; stdout: {}",
        read(&stdout_path)
    );
    stderr
}

fn valid(id: &str, as_token: &str, prefix: &str) -> Registration {
    Registration::new(id, Some("http://127.0.0.1:9"))
        .tokens(as_token, &format!("hs_{as_token}"))
        .sender(&format!("{prefix}bot"))
        .users(&format!("@_{prefix}_.*:localhost"), true)
}

#[test]
fn duplicate_id_stops_startup_naming_both_files() {
    let (one, two) = (
        valid("twin", "token_one", "one"),
        valid("twin", "token_two", "two"),
    );
    let (one, two) = (one.yaml(), two.yaml());
    let stderr = startup_fails(&[("first.yaml", one.as_str()), ("second.yaml", two.as_str())]);
    assert!(
        stderr.contains("first.yaml") && stderr.contains("second.yaml"),
        "{stderr}"
    );
}

#[test]
fn duplicate_as_token_stops_startup_naming_both_files() {
    let (one, two) = (valid("one", "shared", "one"), valid("two", "shared", "two"));
    let (one, two) = (one.yaml(), two.yaml());
    let stderr = startup_fails(&[("first.yaml", one.as_str()), ("second.yaml", two.as_str())]);
    assert!(
        stderr.contains("first.yaml") && stderr.contains("second.yaml") && stderr.contains("as_token"),
        "{stderr}"
    );
}

#[test]
fn look_around_regex_stops_startup_naming_file_and_field() {
    let good = valid("good", "token_good", "good").yaml();
    let bad = registration_yaml(
        "peeky",
        Some("http://127.0.0.1:9"),
        "token_peeky",
        "hs_peeky",
        "peekybot",
        Some("@(?=x).*"),
        None,
        true,
        "",
    );
    let stderr = startup_fails(&[("good.yaml", good.as_str()), ("lookaround.yaml", bad.as_str())]);
    assert!(
        stderr.contains("lookaround.yaml") && stderr.contains("namespaces.users"),
        "{stderr}"
    );
}

#[test]
fn missing_url_key_stops_startup() {
    let yaml: String = valid("missing", "token_missing", "missing")
        .yaml()
        .lines()
        .filter(|line| !line.starts_with("url:"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(!yaml.contains("url"), "{yaml}");
    let stderr = startup_fails(&[("missing.yaml", yaml.as_str())]);
    assert!(
        stderr.contains("missing.yaml") && stderr.contains("url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn null_url_and_unknown_keys_load() {
    let quiet = Registration::new("quiet", None)
        .sender("quietbot")
        .users("@_quiet_.*:localhost", true)
        .extra(
            "rate_limited: false
receive_ephemeral: true
de.sorunome.msc2409.push_ephemeral: true
io.element.msc4190: false
protocols: [quiet]
heisenbridge: {displayname: Quiet, media_url: 'http://example.org'}
",
        );
    let (s, _regs) = start_server(&[&quiet]).await;
    // The sender exists from the start and the as_token authenticates as it.
    let me = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &quiet.as_token,
            Value::Null,
        )
        .await;
    assert_eq!(me["user_id"], "@quietbot:localhost");
}

// ---------------------------------------------------------------------------------------------
// Transactions

#[tokio::test]
async fn transactions_are_authenticated_ordered_and_catch_up_in_batches() {
    let fake = FakeAs::start().await;
    let reg = Registration::new("bridge", Some(fake.url.as_str()))
        .sender("bridgebot")
        .users("@_bridge_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let ghost = register_ghost(&s, &reg.as_token, "_bridge_ghost").await;
    s.ok(
        Method::POST,
        &as_user(&room_path(&room, "join"), &ghost),
        &reg.as_token,
        json!({}),
    )
    .await;
    fake.wait_for_events(
        |events| {
            events.iter().any(|e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == ghost.as_str()
                    && e["content"]["membership"] == "join"
            })
        },
        WAIT,
    )
    .await;

    // The service goes down; 250 messages queue up.
    fake.set_transaction_status(500);
    for i in 0..250 {
        send_ok(&s, &alice, &room, &format!("t{i}"), &format!("m{i:03}")).await;
    }
    fake.wait_for_requests(|r| r.iter().any(|r| r.txn_id.is_some() && r.status == 500), WAIT)
        .await;
    // It comes back and says so.
    fake.set_transaction_status(200);
    let (status, body) = ping(&s, &reg.id, &reg.as_token, "back").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let expected: Vec<String> = (0..250).map(|i| format!("m{i:03}")).collect();
    let events = fake
        .wait_for_events(|events| message_bodies(events).len() >= 250, WAIT)
        .await;
    assert_eq!(
        message_bodies(&events),
        expected,
        "every message exactly once, in stream order"
    );

    let attempts = fake.transaction_attempts();
    for attempt in &attempts {
        assert_eq!(attempt.method, "PUT");
        assert!(
            attempt.v1 && attempt.path.starts_with("/_matrix/app/v1/transactions/"),
            "{}",
            attempt.path
        );
        assert_eq!(
            attempt.authorization,
            bearer(&reg.hs_token),
            "hs_token as a bearer header"
        );
        assert!(
            attempt
                .query
                .as_deref()
                .is_none_or(|q| !q.contains("access_token")),
            "no token in the query string: {:?}",
            attempt.query
        );
        assert!(
            attempt.events().len() <= 100,
            "{} events in one transaction",
            attempt.events().len()
        );
    }
    let all_ids: Vec<u64> = attempts.iter().map(Request::txn_number).collect();
    assert!(
        all_ids.windows(2).all(|w| w[0] <= w[1]),
        "txnIds never go back: {all_ids:?}"
    );
    let accepted: Vec<&Request> = attempts.iter().filter(|a| a.succeeded()).collect();
    let accepted_ids: Vec<u64> = accepted.iter().map(|a| a.txn_number()).collect();
    assert!(
        accepted_ids.windows(2).all(|w| w[0] < w[1]),
        "txnIds strictly increase: {accepted_ids:?}"
    );
    let batches: Vec<usize> = accepted
        .iter()
        .map(|a| message_bodies(&a.events()).len())
        .filter(|n| *n > 0)
        .collect();
    assert!(
        batches.len() <= 10,
        "catch-up is batched, not one transaction per event: {batches:?}"
    );
    assert_eq!(
        batches.iter().max(),
        Some(&100),
        "a backlog fills transactions to 100 events: {batches:?}"
    );
}

/// What [`RawService`] answers to one request.
#[derive(Clone)]
enum RawAnswer {
    /// These bytes, whole (status line, headers and body), then the connection closes.
    Bytes(String),
    /// `200 OK` and a body that never ends.
    Endless,
}

/// A service on raw sockets, to answer what no well-behaved framework would. Each connection
/// serves one request with the next answer (the last one repeats); request lines are recorded.
struct RawService {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl RawService {
    async fn start(answers: Vec<RawAnswer>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
            while let Ok((mut socket, _)) = listener.accept().await {
                let (answers, seen) = (answers.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 8192];
                    // Headers, then as much body as Content-Length says.
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..n]);
                        let text = String::from_utf8_lossy(&request).into_owned();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().to_owned())
                                })
                                .and_then(|v| v.parse::<usize>().ok())
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                seen.lock()
                                    .expect("lock")
                                    .push(text.lines().next().unwrap_or_default().to_owned());
                                break;
                            }
                        }
                    }
                    let answer = {
                        let mut answers = answers.lock().expect("lock");
                        if answers.len() > 1 {
                            answers.pop_front()
                        } else {
                            answers.front().cloned()
                        }
                    };
                    match answer {
                        Some(RawAnswer::Bytes(bytes)) => {
                            let _ = socket.write_all(bytes.as_bytes()).await;
                        }
                        Some(RawAnswer::Endless) | None => {
                            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
                            let _ = socket.write_all(head.as_bytes()).await;
                            let chunk = vec![b' '; 64 * 1024];
                            while socket.write_all(&chunk).await.is_ok() {}
                        }
                    }
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { url, requests }
    }

    fn transactions(&self) -> Vec<String> {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .filter(|l| l.contains("/transactions/"))
            .cloned()
            .collect()
    }

    async fn wait_for_transactions(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let seen = self.transactions();
            if seen.len() >= count {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the service saw {:?}, not {count} transactions",
            self.transactions()
        );
    }
}

/// A service whose answer never ends cannot stall its sender nor fill the server's memory:
/// only the start of a reply is read, and a 200 is a 200.
#[tokio::test]
async fn an_endless_reply_body_is_cut_short_and_delivery_goes_on() {
    let service = RawService::start(vec![RawAnswer::Endless]).await;
    let reg = Registration::new("endless", Some(&service.url)).users("@_e_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    let room = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &reg.as_token,
            json!({}),
        )
        .await["room_id"]
        .as_str()
        .expect("room")
        .to_owned();
    let first = service.wait_for_transactions(1).await;
    as_send(&s, &reg.as_token, None, &room, "1", "next").await;
    let seen = service.wait_for_transactions(first.len() + 1).await;
    assert_ne!(
        seen[first.len()],
        seen[first.len() - 1],
        "a new transaction, not a retry of one whose reply never ended"
    );
    assert!(s.rss_kib().expect("rss") < 512 * 1024, "memory stays bounded");
}

/// `Retry-After` far in the future (beyond any clock) neither crashes the sender nor parks it:
/// the wait is capped, and the service's next request retries at once.
#[tokio::test]
async fn a_huge_retry_after_is_capped_and_the_sender_survives() {
    let busy = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 18446744073709551615\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let service = RawService::start(vec![
        RawAnswer::Bytes(busy.to_owned()),
        RawAnswer::Bytes(ok.to_owned()),
    ])
    .await;
    let reg = Registration::new("busy", Some(&service.url)).users("@_b_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    s.ok(
        Method::POST,
        "/_matrix/client/v3/createRoom",
        &reg.as_token,
        json!({}),
    )
    .await;
    service.wait_for_transactions(1).await;
    // A successful ping makes the sender retry at once instead of after the (capped) wait.
    s.ok(
        Method::POST,
        "/_matrix/client/v1/appservice/busy/ping",
        &reg.as_token,
        json!({}),
    )
    .await;
    let seen = service.wait_for_transactions(2).await;
    assert_eq!(seen[0], seen[1], "the same transaction, retried");
    assert!(!s.log().contains("panicked"), "{}", s.log());
}

#[tokio::test]
async fn a_failed_transaction_is_resent_byte_identical() {
    let fake = FakeAs::start().await;
    fake.queue_transaction_statuses([500]);
    let reg = Registration::new("bridge", Some(fake.url.as_str()))
        .sender("bridgebot")
        .users("@_bridge_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    // The service's own sender creates a room and talks in it: all of that is for the service.
    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &reg.as_token,
            json!({}),
        )
        .await;
    let room = created["room_id"].as_str().expect("room_id").to_owned();
    as_send(&s, &reg.as_token, None, &room, "1", "retry me").await;
    fake.wait_for_events(|events| has_body(events, "retry me"), WAIT)
        .await;

    let attempts = fake.transaction_attempts();
    assert!(attempts.len() >= 2, "{}", fake.summary());
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(first.status, 500);
    assert!(!first.events().is_empty(), "{}", fake.summary());
    assert_eq!(second.txn_id, first.txn_id, "the retry keeps its txnId");
    assert!(
        second.body == first.body,
        "the retry is byte-identical:\n{}\n{}",
        String::from_utf8_lossy(&first.body),
        String::from_utf8_lossy(&second.body)
    );
    assert!(second.succeeded());
    for later in &attempts[2..] {
        assert!(
            later.txn_number() > first.txn_number(),
            "a new transaction gets a new, greater txnId"
        );
    }
}

/// A service (exclusive `@_bridge_.*`) whose ghost sits in alice's public room, so it receives
/// everything said there. Keep `_regs` alive: restarts read the registration again.
struct ServiceInRoom {
    fake: FakeAs,
    reg: Registration,
    s: Server,
    _regs: tempfile::TempDir,
    alice: User,
    room: String,
}

async fn service_in_a_room() -> ServiceInRoom {
    let fake = FakeAs::start().await;
    let reg = Registration::new("bridge", Some(fake.url.as_str()))
        .sender("bridgebot")
        .users("@_bridge_.*:localhost", true);
    let (s, regs) = start_server(&[&reg]).await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let ghost = register_ghost(&s, &reg.as_token, "_bridge_ghost").await;
    s.ok(
        Method::POST,
        &as_user(&room_path(&room, "join"), &ghost),
        &reg.as_token,
        json!({}),
    )
    .await;
    ServiceInRoom {
        fake,
        reg,
        s,
        _regs: regs,
        alice,
        room,
    }
}

#[tokio::test]
async fn kill_9_with_the_service_down_loses_and_reorders_nothing() {
    let ServiceInRoom {
        fake,
        reg,
        mut s,
        _regs,
        alice,
        room,
    } = service_in_a_room().await;
    for i in 0..5 {
        send_ok(&s, &alice, &room, &format!("b{i}"), &format!("before-{i}")).await;
    }
    fake.wait_for_events(|events| message_bodies(events).len() >= 5, WAIT)
        .await;

    fake.set_transaction_status(500);
    for i in 0..50 {
        send_ok(&s, &alice, &room, &format!("d{i}"), &format!("during-{i:02}")).await;
    }
    fake.wait_for_requests(|r| r.iter().any(|r| r.txn_id.is_some() && r.status == 500), WAIT)
        .await;
    let before_crash = fake.transaction_attempts().len();
    s.crash_and_restart().await;
    fake.set_transaction_status(200);
    let (status, body) = ping(&s, &reg.id, &reg.as_token, "back").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let expected: Vec<String> = (0..5)
        .map(|i| format!("before-{i}"))
        .chain((0..50).map(|i| format!("during-{i:02}")))
        .collect();
    let events = fake
        .wait_for_events(|events| message_bodies(events).len() >= expected.len(), WAIT)
        .await;
    assert_eq!(
        message_bodies(&events),
        expected,
        "all once, in order, across kill -9"
    );

    let attempts = fake.transaction_attempts();
    let (old, new) = attempts.split_at(before_crash);
    let max_old = old
        .iter()
        .map(Request::txn_number)
        .max()
        .expect("attempts before the crash");
    for attempt in new {
        let id = attempt.txn_number();
        if id > max_old {
            continue;
        }
        // Only a transaction that never got through may come again, and then unchanged.
        let earlier: Vec<&Request> = old.iter().filter(|o| o.txn_id == attempt.txn_id).collect();
        assert!(
            !earlier.is_empty(),
            "txnId {id} after the restart is not above {max_old} and was never sent before: {}",
            fake.summary()
        );
        assert!(
            earlier.iter().all(|o| !o.succeeded()),
            "txnId {id} was accepted before the crash and is reused: {}",
            fake.summary()
        );
        assert!(
            earlier.iter().all(|o| o.body == attempt.body),
            "txnId {id} re-sent with a different body"
        );
    }
    let accepted: Vec<u64> = attempts
        .iter()
        .filter(|a| a.succeeded())
        .map(Request::txn_number)
        .collect();
    assert!(
        accepted.windows(2).all(|w| w[0] < w[1]),
        "accepted txnIds strictly increase across the restart: {accepted:?}"
    );
}

/// The service's view after de-duplicating by txnId: the events of each distinct accepted
/// transaction, in arrival order. Panics if one txnId ever came with two different bodies.
fn distinct_transaction_events(fake: &FakeAs) -> Vec<Value> {
    let mut seen: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    let mut events = Vec::new();
    for (id, body) in fake.transactions() {
        if let Some(earlier) = seen.get(&id) {
            assert_eq!(earlier, &body, "txnId {id} reused for a different transaction");
            continue;
        }
        events.extend(body["events"].as_array().cloned().unwrap_or_default());
        seen.insert(id, body);
    }
    events
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_accepted_and_delivery_resumes_in_order() {
    let ServiceInRoom {
        fake,
        reg: _,
        mut s,
        _regs,
        alice,
        room,
    } = service_in_a_room().await;

    // Four clients send as fast as they can; the server is killed while they do.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..4)
        .map(|w| {
            let (http, base, token, room, accepted) = (
                s.http.clone(),
                s.base.clone(),
                alice.token.clone(),
                room.clone(),
                accepted.clone(),
            );
            tokio::spawn(async move {
                for i in 0.. {
                    let body = format!("w{w}-{i:05}");
                    let sent = http
                        .put(format!(
                            "{base}{}",
                            room_path(&room, &format!("send/m.room.message/{body}"))
                        ))
                        .bearer_auth(&token)
                        .json(&json!({"msgtype": "m.text", "body": body}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == StatusCode::OK => accepted.lock().expect("lock").push(body),
                        _ => return,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while accepted.lock().expect("lock").len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered_before = fake.transactions().len();
    s.crash();
    for sender in senders {
        sender.await.expect("sender task");
    }
    let accepted = accepted.lock().expect("lock").clone();
    assert!(
        accepted.len() >= 200,
        "the clients were sending when the server died"
    );
    assert!(
        delivered_before > 0,
        "delivery was under way when the server died"
    );
    s.restart().await;

    // Everything the server said it accepted is there, once, in one stream order…
    let mut stored = Vec::new();
    let mut from = String::new();
    loop {
        let page = s
            .ok(
                Method::GET,
                &format!("{}?dir=f&limit=500{from}", room_path(&room, "messages")),
                &alice.token,
                Value::Null,
            )
            .await;
        let chunk = page["chunk"].as_array().map_or(&[][..], Vec::as_slice);
        stored.extend(message_bodies(chunk));
        // `end` is left out at the end of the timeline.
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = format!("&from={end}"),
            _ => break,
        }
    }
    for body in &accepted {
        assert_eq!(
            stored.iter().filter(|b| *b == body).count(),
            1,
            "{body} was accepted before the crash and must be stored once"
        );
    }
    // …and the service receives that stream, in order, each event once per distinct txnId.
    let deadline = Instant::now() + WAIT;
    loop {
        let delivered = message_bodies(&distinct_transaction_events(&fake));
        if delivered == stored {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service got {} of {} events; first difference at {:?}",
            delivered.len(),
            stored.len(),
            delivered.iter().zip(&stored).position(|(a, b)| a != b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<u64> = fake
        .transaction_attempts()
        .iter()
        .filter(|a| a.succeeded())
        .map(Request::txn_number)
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] <= w[1]),
        "txnIds never go back across the crash (a repeat is the same transaction resent): {ids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Interest

#[tokio::test]
async fn interest_follows_the_namespaces() {
    let fake = FakeAs::start().await;
    let reg = Registration::new("watch", Some(fake.url.as_str()))
        .sender("watchbot")
        .users("@_watch_.*:localhost", true)
        .aliases("#bridged_.*:localhost", false);
    let (s, _regs) = start_server(&[&reg]).await;
    let alice = s.register("alice").await;
    let ghost_a = register_ghost(&s, &reg.as_token, "_watch_a").await;
    let ghost_b = register_ghost(&s, &reg.as_token, "_watch_b").await;

    // Sender in the user namespace.
    let created = s
        .ok(
            Method::POST,
            &as_user("/_matrix/client/v3/createRoom", &ghost_a),
            &reg.as_token,
            json!({}),
        )
        .await;
    let ghost_room = created["room_id"].as_str().expect("room_id").to_owned();
    as_send(&s, &reg.as_token, Some(&ghost_a), &ghost_room, "g1", "from-ghost").await;

    // A member event whose state_key is in the namespace: the invite goes to the service; the
    // room's chatter does not while the ghost is only invited.
    let invited_room = s.create_room(&alice, json!({"name": "Invited here"})).await;
    send_ok(&s, &alice, &invited_room, "b1", "before-invite").await;
    s.ok(
        Method::POST,
        &room_path(&invited_room, "invite"),
        &alice.token,
        json!({"user_id": ghost_b}),
    )
    .await;
    send_ok(&s, &alice, &invited_room, "b2", "while-invited").await;
    as_send(&s, &reg.as_token, Some(&ghost_a), &ghost_room, "g2", "barrier-1").await;
    fake.wait_for_events(|events| has_body(events, "barrier-1"), WAIT)
        .await;
    // Once a namespace user has joined, everything in the room is for the service.
    s.ok(
        Method::POST,
        &as_user(&room_path(&invited_room, "join"), &ghost_b),
        &reg.as_token,
        json!({}),
    )
    .await;
    send_ok(&s, &alice, &invited_room, "b3", "after-join").await;

    // A local alias in the alias namespace, no namespace user in the room.
    let aliased = s
        .create_room(&alice, json!({"room_alias_name": "bridged_talk"}))
        .await;
    send_ok(&s, &alice, &aliased, "c1", "in-aliased-room").await;

    // No interest at all.
    let quiet = s.create_room(&alice, json!({})).await;
    send_ok(&s, &alice, &quiet, "d1", "nobody-listens").await;
    send_ok(&s, &alice, &aliased, "c2", "barrier-2").await;

    let events = fake
        .wait_for_events(|events| has_body(events, "barrier-2"), WAIT)
        .await;
    assert_eq!(
        message_bodies(&events),
        vec![
            "from-ghost",
            "barrier-1",
            "after-join",
            "in-aliased-room",
            "barrier-2"
        ]
    );
    let invite = events
        .iter()
        .find(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == ghost_b.as_str()
                && e["content"]["membership"] == "invite"
        })
        .unwrap_or_else(|| panic!("the invite of the ghost reaches the service: {}", fake.summary()));
    assert_eq!(invite["room_id"], invited_room.as_str());
    assert_eq!(invite["sender"], alice.user_id.as_str());
    // As from Synapse: the room's stripped state, so the service knows the room before joining.
    let preview = invite["unsigned"]["invite_room_state"]
        .as_array()
        .unwrap_or_else(|| panic!("no invite_room_state in {invite}"));
    let kinds: Vec<(&str, &str)> = preview
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or(""),
                e["state_key"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for kind in ["m.room.create", "m.room.join_rules", "m.room.name"] {
        assert!(kinds.contains(&(kind, "")), "{kind} missing from {preview:?}");
    }
    assert!(
        kinds.contains(&("m.room.member", alice.user_id.as_str())),
        "the inviter's member event: {preview:?}"
    );
    assert!(
        !kinds.contains(&("m.room.member", ghost_b.as_str())),
        "the invitee's own event: {preview:?}"
    );
    let name = preview.iter().find(|e| e["type"] == "m.room.name");
    assert_eq!(name.map(|e| &e["content"]["name"]), Some(&json!("Invited here")));
    assert!(
        preview
            .iter()
            .all(|e| e.get("event_id").is_none() && e["sender"].is_string()),
        "stripped: {preview:?}"
    );
    assert!(
        events.iter().all(|e| e["room_id"] != quiet.as_str()),
        "nothing from a room without interest"
    );
}

/// An alias added to an existing room makes the room interesting at once: the cached room-level
/// answer, computed for an earlier event, must not hide the very next one.
#[tokio::test]
async fn a_new_alias_makes_the_rooms_next_event_reach_the_service() {
    let fake = FakeAs::start().await;
    // `watch` listens to alice everywhere, so the room's audience is computed and cached before
    // the alias exists; `bridge` is interested through the alias only.
    let watch = Registration::new("watch", Some(fake.url.as_str())).users("@alice:localhost", false);
    let bridge = Registration::new("bridge", Some(fake.url.as_str())).aliases("#bridged_.*:localhost", true);
    let (s, _regs) = start_server(&[&watch, &bridge]).await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    send_ok(&s, &alice, &room, "1", "before-alias").await;
    let to = |id: &str| bearer(&format!("hs_{id}"));
    let bodies_for = |requests: &[Request], id: &str| -> Vec<String> {
        let mine: Vec<Value> = requests
            .iter()
            .filter(|r| r.txn_id.is_some() && r.authorization == to(id))
            .flat_map(|r| r.events())
            .collect();
        message_bodies(&mine)
    };
    fake.wait_for_requests(
        |r| bodies_for(r, "watch").contains(&"before-alias".to_owned()),
        WAIT,
    )
    .await;

    let alias = enc("#bridged_room:localhost");
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/directory/room/{alias}"),
        &bridge.as_token,
        json!({"room_id": room}),
    )
    .await;
    send_ok(&s, &alice, &room, "2", "after-alias").await;
    let requests = fake
        .wait_for_requests(
            |r| bodies_for(r, "bridge").contains(&"after-alias".to_owned()),
            WAIT,
        )
        .await;
    assert_eq!(
        bodies_for(&requests, "bridge"),
        vec!["after-alias"],
        "the first event after the alias, and nothing before it: {}",
        fake.summary()
    );
}

/// Aliases in a service's exclusive namespace are the service's on every path that makes one:
/// the directory, `createRoom` and room upgrades; a service makes aliases only in its own
/// namespace; deleting a reserved alias is for the service (and server admins).
#[tokio::test]
async fn exclusive_alias_namespaces_hold_on_every_path() {
    let bridge = Registration::new("bridge", None).aliases("#_b_.*:localhost", true);
    let (s, _regs) = start_server(&[&bridge]).await;
    let alice = s.register("alice").await;
    let directory = |alias: &str| format!("/_matrix/client/v3/directory/room/{}", enc(alias));
    let exclusive = (StatusCode::BAD_REQUEST, "M_EXCLUSIVE");

    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({"room_alias_name": "_b_mine"})),
        )
        .await;
    assert_eq!((status, errcode(&body)), exclusive, "createRoom: {body}");
    let (status, _) = s
        .call(Method::GET, &directory("#_b_mine:localhost"), None, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the refused alias was not stored");

    let room = s.create_room(&alice, json!({})).await;
    let (status, body) = s
        .call(
            Method::PUT,
            &directory("#_b_mine:localhost"),
            Some(&alice.token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!((status, errcode(&body)), exclusive, "PUT /directory/room: {body}");

    // The service: only inside its namespace, and without being in the room.
    let (status, body) = s
        .call(
            Method::PUT,
            &directory("#elsewhere:localhost"),
            Some(&bridge.as_token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        exclusive,
        "outside its namespace: {body}"
    );
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&bridge.as_token),
            Some(json!({"room_alias_name": "elsewhere"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        exclusive,
        "createRoom outside its namespace: {body}"
    );
    s.ok(
        Method::PUT,
        &directory("#_b_theirs:localhost"),
        &bridge.as_token,
        json!({"room_id": room}),
    )
    .await;
    s.ok(
        Method::POST,
        "/_matrix/client/v3/createRoom",
        &bridge.as_token,
        json!({"room_alias_name": "_b_made"}),
    )
    .await;

    // alice may change the room's canonical alias, which would let her delete other aliases.
    let (status, body) = s
        .call(
            Method::DELETE,
            &directory("#_b_theirs:localhost"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        exclusive,
        "deleting a reserved alias: {body}"
    );

    // An upgrade would create the alias anew in the replacement room.
    let (status, body) = s
        .call(
            Method::POST,
            &room_path(&room, "upgrade"),
            Some(&alice.token),
            Some(json!({"new_version": "10"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        exclusive,
        "upgrade moving a reserved alias: {body}"
    );
    let (status, _) = s
        .call(
            Method::GET,
            &room_path(&room, "state/m.room.tombstone/"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the refused upgrade left the room as it was"
    );

    s.ok(
        Method::DELETE,
        &directory("#_b_theirs:localhost"),
        &bridge.as_token,
        Value::Null,
    )
    .await;
    let upgraded = s
        .ok(
            Method::POST,
            &room_path(&room, "upgrade"),
            &alice.token,
            json!({"new_version": "10"}),
        )
        .await;
    assert!(upgraded["replacement_room"].is_string(), "{upgraded}");
}

#[tokio::test]
async fn rooms_without_interest_produce_no_transaction() {
    let fake = FakeAs::start().await;
    let reg = Registration::new("watch", Some(fake.url.as_str()))
        .sender("watchbot")
        .users("@_watch_.*:localhost", true)
        .aliases("#_watch_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s
        .create_room(
            &alice,
            json!({"preset": "public_chat", "room_alias_name": "chatter"}),
        )
        .await;
    s.ok(Method::POST, &room_path(&room, "join"), &bob.token, json!({}))
        .await;
    for i in 0..5 {
        send_ok(&s, &alice, &room, &format!("a{i}"), "hi").await;
        send_ok(&s, &bob, &room, &format!("b{i}"), "hello").await;
    }
    // A barrier in stream order: once the service has this, it has seen whatever came before.
    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &reg.as_token,
            json!({}),
        )
        .await;
    let own_room = created["room_id"].as_str().expect("room_id").to_owned();
    as_send(&s, &reg.as_token, None, &own_room, "1", "barrier").await;
    fake.wait_for_events(|events| has_body(events, "barrier"), WAIT)
        .await;
    for attempt in fake.transaction_attempts() {
        let events = attempt.events();
        assert!(!events.is_empty(), "no empty transactions: {}", fake.summary());
        assert!(
            events.iter().all(|e| e["room_id"] == own_room.as_str()),
            "only the service's own room: {}",
            fake.summary()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Queries: lazy alias creation (the 2015 blog post's scenario)

fn is_alias_query(r: &Request, alias: &str) -> bool {
    r.method == "GET" && r.decoded_path().ends_with(&format!("/rooms/{alias}"))
}

/// What the logging service of the blog post does when asked about an alias: create the room with
/// that alias (as its sender, with the as_token), remember its ID, and answer 200 `{}`.
pub(crate) async fn create_room_for_alias(
    base: String,
    token: String,
    created: Arc<Mutex<Option<String>>>,
    alias: String,
) -> (u16, Value) {
    let localpart = alias
        .trim_start_matches('#')
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    if localpart == "logged_nothing" {
        return (404, json!({"errcode": "M_NOT_FOUND", "error": "not bridged"}));
    }
    let response = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/createRoom"))
        .bearer_auth(token)
        .json(&json!({"room_alias_name": localpart, "preset": "public_chat"}))
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            *created.lock().expect("lock") = body["room_id"].as_str().map(str::to_owned);
            (200, json!({}))
        }
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            (
                500,
                json!({"error": format!("createRoom answered {status}: {text}")}),
            )
        }
        Err(e) => (500, json!({"error": e.to_string()})),
    }
}

async fn joining_a_missing_alias_creates_it(legacy: bool) {
    let fake = if legacy {
        FakeAs::start_legacy().await
    } else {
        FakeAs::start().await
    };
    let reg = Registration::new("logger", Some(fake.url.as_str()))
        .sender("logbot")
        .aliases("#logged_.*", true);
    let (s, _regs) = start_server(&[&reg]).await;

    // Asked about an alias in its namespace, the service creates the room (with the as_token),
    // then answers 200. It declines `#logged_nothing`.
    let created: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let base = s.base.clone();
        let token = reg.as_token.clone();
        let created = created.clone();
        fake.on_room_query(move |alias: String| {
            create_room_for_alias(base.clone(), token.clone(), created.clone(), alias)
        });
    }

    let alias = "#logged_test2:localhost";
    let alice = s.register("alice").await;
    let (status, joined) = s
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(alias)),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{joined}; service saw {}", fake.summary());
    let room = created
        .lock()
        .expect("lock")
        .clone()
        .expect("the service created the room while answering the query");
    assert_eq!(joined["room_id"], room.as_str(), "joined in the same request");

    let queries: Vec<Request> = fake
        .requests()
        .into_iter()
        .filter(|r| is_alias_query(r, alias))
        .collect();
    let answered: Vec<&Request> = queries.iter().filter(|q| q.succeeded()).collect();
    assert_eq!(answered.len(), 1, "one successful query: {}", fake.summary());
    assert_eq!(answered[0].authorization, bearer(&reg.hs_token));
    assert!(queries[0].v1, "v1 is tried first: {}", fake.summary());
    if legacy {
        assert_eq!(queries.len(), 2, "v1 (404), then legacy: {}", fake.summary());
        assert_eq!(queries[0].status, 404);
        assert_eq!(answered[0].decoded_path(), format!("/rooms/{alias}"));
    } else {
        assert_eq!(queries.len(), 1, "{}", fake.summary());
        assert_eq!(
            answered[0].decoded_path(),
            format!("/_matrix/app/v1/rooms/{alias}")
        );
        assert!(
            answered[0].path.starts_with("/_matrix/app/v1/rooms/%23"),
            "the alias is percent-encoded: {}",
            answered[0].path
        );
    }

    // A message in the room reaches the service: the room has an alias in its namespace.
    send_ok(&s, &alice, &room, "1", "hello logger").await;
    fake.wait_for_events(|events| has_body(events, "hello logger"), WAIT)
        .await;
    let accepted: Vec<Request> = fake
        .transaction_attempts()
        .into_iter()
        .filter(Request::succeeded)
        .collect();
    for txn in &accepted {
        assert_eq!(txn.authorization, bearer(&reg.hs_token));
        if legacy {
            assert!(
                !txn.v1 && txn.decoded_path().starts_with("/transactions/"),
                "{}",
                txn.path
            );
        } else {
            assert!(txn.v1, "{}", txn.path);
        }
    }
    if legacy {
        let v1_attempts = fake.transaction_attempts().iter().filter(|t| t.v1).count();
        assert!(
            v1_attempts <= 1,
            "the legacy route is remembered: {}",
            fake.summary()
        );
    }

    // Now it exists: joining again asks nobody.
    let bob = s.register("bob").await;
    let joined = s
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(alias)),
            &bob.token,
            json!({}),
        )
        .await;
    assert_eq!(joined["room_id"], room.as_str());
    let after = fake
        .requests()
        .iter()
        .filter(|r| is_alias_query(r, alias))
        .count();
    assert_eq!(after, queries.len(), "no query for an existing alias");

    // The service declines: 404 to the client.
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc("#logged_nothing:localhost")),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    if legacy {
        let v1_room_queries = fake
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.v1 && r.decoded_path().contains("/rooms/"))
            .count();
        assert_eq!(
            v1_room_queries,
            1,
            "the legacy query route is remembered: {}",
            fake.summary()
        );
    }

    // Outside every alias namespace: no service is asked.
    let before = fake.requests().len();
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc("#elsewhere:localhost")),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    assert!(
        fake.requests()[before..]
            .iter()
            .all(|r| !r.decoded_path().contains("#elsewhere")),
        "{}",
        fake.summary()
    );
}

#[tokio::test]
async fn joining_a_missing_alias_in_the_namespace_creates_it() {
    joining_a_missing_alias_creates_it(false).await;
}

#[tokio::test]
async fn a_service_without_v1_routes_is_queried_and_sent_transactions_on_legacy_routes() {
    joining_a_missing_alias_creates_it(true).await;
}

// ---------------------------------------------------------------------------------------------
// The client API as a service

fn bridge(url: &str) -> Registration {
    Registration::new("bridge", Some(url))
        .sender("bridgebot")
        .users("@_bot_.*:localhost", true)
        .users("@bridged_.*:localhost", true)
}

async fn as_register(s: &Server, token: Option<&str>, username: &str) -> (StatusCode, Value) {
    s.call(
        Method::POST,
        "/_matrix/client/v3/register",
        token,
        Some(json!({"type": "m.login.application_service", "username": username})),
    )
    .await
}

#[tokio::test]
async fn services_register_their_users_and_humans_cannot() {
    let fake = FakeAs::start().await;
    let reg = bridge(&fake.url);
    let (s, _regs) = start_server(&[&reg]).await;

    let (status, body) = as_register(&s, Some(&reg.as_token), "_bot_alice").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@_bot_alice:localhost");

    let (status, body) = as_register(&s, Some(&reg.as_token), "outsider").await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"));
    let (status, body) = as_register(&s, Some(&reg.as_token), "_bot_alice").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_USER_IN_USE")
    );
    // The sender exists from startup.
    let (status, body) = as_register(&s, Some(&reg.as_token), "bridgebot").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_USER_IN_USE")
    );
    // The service type without the service's token is refused.
    let (status, body) = as_register(&s, None, "_bot_sneaky").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );

    // Humans cannot take IDs in an exclusive namespace.
    let human = |username: &str| json!({"username": username, "password": "password", "auth": {"type": "m.login.dummy"}});
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(human("bridged_x")),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"));
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(human("_bot_x")),
        )
        .await;
    // `_`-prefixed localparts are refused for humans anyway; the namespace is the reason given.
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"));
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/register/available?username=bridged_y",
            None,
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"));
}

#[tokio::test]
async fn services_masquerade_only_as_their_registered_users() {
    let fake = FakeAs::start().await;
    let reg = bridge(&fake.url);
    let (s, _regs) = start_server(&[&reg]).await;
    let ghost = register_ghost(&s, &reg.as_token, "_bot_alice").await;
    s.register("carol").await;
    let whoami = "/_matrix/client/v3/account/whoami";

    let me = s
        .ok(Method::GET, &as_user(whoami, &ghost), &reg.as_token, Value::Null)
        .await;
    assert_eq!(me["user_id"], "@_bot_alice:localhost");
    assert!(
        me.get("device_id").is_none(),
        "no device_id= given: the service acts without a device, and says none: {me}"
    );

    let (status, body) = s
        .call(
            Method::GET,
            &as_user(whoami, "@_bot_nobody:localhost"),
            Some(&reg.as_token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "in the namespace but not registered"
    );
    let (status, body) = s
        .call(
            Method::GET,
            &as_user(whoami, "@carol:localhost"),
            Some(&reg.as_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "outside the namespace: {body}");

    let me = s.ok(Method::GET, whoami, &reg.as_token, Value::Null).await;
    assert_eq!(me["user_id"], reg.sender_id().as_str());
    // The token may also come in the query string.
    let (status, me) = s
        .call(
            Method::GET,
            &format!("{whoami}?access_token={}", enc(&reg.as_token)),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user_id"], reg.sender_id().as_str());
}

#[tokio::test]
async fn services_log_their_users_in() {
    let fake = FakeAs::start().await;
    let reg = bridge(&fake.url);
    let (s, _regs) = start_server(&[&reg]).await;
    register_ghost(&s, &reg.as_token, "_bot_alice").await;
    s.register("carol").await;

    let (status, flows) = s.call(Method::GET, "/_matrix/client/v3/login", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        flows["flows"]
            .as_array()
            .expect("flows")
            .iter()
            .any(|f| f["type"] == "m.login.application_service"),
        "{flows}"
    );

    let login = |user: &str| json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": user}});
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(&reg.as_token),
            Some(login("_bot_alice")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@_bot_alice:localhost");
    let token = body["access_token"].as_str().expect("access_token");
    let me = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            token,
            Value::Null,
        )
        .await;
    assert_eq!(me["user_id"], "@_bot_alice:localhost");

    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(login("_bot_alice")),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "no as_token: {body}"
    );
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(&reg.as_token),
            Some(login("carol")),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"),
        "outside the namespace: {body}"
    );
}

#[tokio::test]
async fn ts_is_honoured_for_services_only() {
    let fake = FakeAs::start().await;
    let reg = bridge(&fake.url);
    let (s, _regs) = start_server(&[&reg]).await;
    let ghost = register_ghost(&s, &reg.as_token, "_bot_alice").await;
    let alice = s.register("alice").await;
    let ts: i64 = 1_600_000_000_000;

    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &reg.as_token,
            json!({"preset": "public_chat"}),
        )
        .await;
    let room = created["room_id"].as_str().expect("room_id").to_owned();
    s.ok(
        Method::POST,
        &as_user(&room_path(&room, "join"), &ghost),
        &reg.as_token,
        json!({}),
    )
    .await;
    s.ok(Method::POST, &room_path(&room, "join"), &alice.token, json!({}))
        .await;

    // The sender.
    let sent = s
        .ok(
            Method::PUT,
            &room_path(&room, &format!("send/m.room.message/s1?ts={ts}")),
            &reg.as_token,
            json!({"msgtype": "m.text", "body": "from the past"}),
        )
        .await;
    let id = sent["event_id"].as_str().expect("event_id");
    assert_eq!(event_ts(&s, &alice.token, &room, id).await, ts);
    // A masqueraded user.
    let sent = s
        .ok(
            Method::PUT,
            &as_user(
                &room_path(&room, &format!("send/m.room.message/g1?ts={}", ts + 1)),
                &ghost,
            ),
            &reg.as_token,
            json!({"msgtype": "m.text", "body": "bridged"}),
        )
        .await;
    let id = sent["event_id"].as_str().expect("event_id");
    assert_eq!(event_ts(&s, &alice.token, &room, id).await, ts + 1);
    // State, too.
    let sent = s
        .ok(
            Method::PUT,
            &room_path(&room, &format!("state/m.room.topic/?ts={}", ts + 2)),
            &reg.as_token,
            json!({"topic": "old news"}),
        )
        .await;
    let id = sent["event_id"].as_str().expect("event_id");
    assert_eq!(event_ts(&s, &alice.token, &room, id).await, ts + 2);

    // A human's `ts` is ignored.
    let sent = s
        .ok(
            Method::PUT,
            &room_path(&room, &format!("send/m.room.message/h1?ts={ts}")),
            &alice.token,
            json!({"msgtype": "m.text", "body": "now"}),
        )
        .await;
    let id = sent["event_id"].as_str().expect("event_id");
    let human_ts = event_ts(&s, &alice.token, &room, id).await;
    assert!(
        human_ts > ts + 86_400_000,
        "ts ignored for a normal user: {human_ts}"
    );
}

// ---------------------------------------------------------------------------------------------
// Ping

#[tokio::test]
async fn https_service_urls_speak_tls() {
    // A listener that records the first bytes a client sends, then hangs up: enough to see
    // that the server opens a TLS handshake (a record of type 0x16) to an https:// URL.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let first = Arc::new(Mutex::new(Vec::new()));
    let seen = first.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 16];
            if let Ok(n) = socket.read(&mut buf).await {
                seen.lock().expect("seen").extend_from_slice(&buf[..n]);
            }
        }
    });
    let url = format!("https://127.0.0.1:{port}");
    let tls = Registration::new("tls", Some(&url)).users("@_tls_.*:localhost", true);
    let (s, _regs) = start_server(&[&tls]).await;

    let (status, body) = ping(&s, "tls", &tls.as_token, "t1").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_GATEWAY, "M_CONNECTION_FAILED"),
        "{body}"
    );
    let first = first.lock().expect("first").clone();
    assert_eq!(
        first.first(),
        Some(&0x16),
        "a TLS handshake, not plain HTTP: {first:?}"
    );
}

#[tokio::test]
async fn ping_reaches_the_service() {
    let fake = FakeAs::start().await;
    let pinged = Registration::new("pinged", Some(fake.url.as_str()))
        .sender("pingbot")
        .users("@_pinged_.*:localhost", true);
    let silent = Registration::new("silent", None)
        .sender("silentbot")
        .users("@_silent_.*:localhost", true);
    let (s, _regs) = start_server(&[&pinged, &silent]).await;

    let (status, body) = ping(&s, "pinged", &pinged.as_token, "t1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["duration_ms"].is_u64(), "{body}");
    let pings: Vec<Request> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/_matrix/app/v1/ping")
        .collect();
    assert_eq!(pings.len(), 1, "{}", fake.summary());
    assert_eq!(pings[0].json(), json!({"transaction_id": "t1"}));
    assert_eq!(pings[0].authorization, bearer(&pinged.hs_token));

    let (status, body) = ping(&s, "silent", &silent.as_token, "t2").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_URL_NOT_SET")
    );
    let (status, body) = ping(&s, "silent", &pinged.as_token, "t3").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "another service's id"
    );
    let (status, body) = ping(&s, "nobody", &pinged.as_token, "t4").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let alice = s.register("alice").await;
    let (status, body) = ping(&s, "pinged", &alice.token, "t5").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "not a service"
    );

    // The service answers with an error: the client learns its status.
    fake.set_ping_status(500);
    let (status, body) = ping(&s, "pinged", &pinged.as_token, "t6").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_GATEWAY, "M_BAD_STATUS")
    );
    assert_eq!(body["status"], 500, "{body}");

    // mautrix only pings when the server advertises it.
    let (_, versions) = s.call(Method::GET, "/_matrix/client/versions", None, None).await;
    let minor_versions: Vec<u64> = versions["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v.as_str()?.strip_prefix("v1.")?.parse().ok())
        .collect();
    assert!(minor_versions.iter().any(|m| *m >= 7), "{versions}");
    assert_eq!(versions["unstable_features"]["fi.mau.msc2659.stable"], true);
}

/// New events for a service that is down do not cut its backoff short: it is retried after 2 s,
/// not once per event.
#[tokio::test]
async fn new_events_do_not_shorten_the_backoff_of_a_failing_service() {
    let fake = FakeAs::start().await;
    fake.set_transaction_status(500);
    let reg = Registration::new("down", Some(fake.url.as_str())).users("@_down_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    let ghost = register_ghost(&s, &reg.as_token, "_down_ghost").await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let join = as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &ghost);
    s.ok(Method::POST, &join, &reg.as_token, json!({})).await;
    fake.wait_for_requests(|r| !r.is_empty(), WAIT).await;
    let first_failure = Instant::now();
    for i in 0..15 {
        send_ok(&s, &alice, &room, &format!("b{i}"), "busy room").await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let attempts = fake.transaction_attempts().len();
    // The first retry is due 1.8–2.2 s after the failure; by then at most one more attempt.
    assert!(
        attempts <= 2,
        "{attempts} attempts within {:?} of the first failure",
        first_failure.elapsed()
    );
    // And the retry does come, after the backoff: the sender is alive, only waiting.
    fake.wait_for_requests(|r| r.iter().filter(|r| r.txn_id.is_some()).count() >= 2, WAIT)
        .await;
    assert!(
        first_failure.elapsed() >= Duration::from_millis(1700),
        "retried after {:?}, before the backoff",
        first_failure.elapsed()
    );
}

/// Inviting an unknown user of a service's namespace asks the service, which may create the
/// user (how people start private chats with bridged users), on `/invite` and in `createRoom`.
#[tokio::test]
async fn inviting_an_unknown_namespaced_user_asks_the_service() {
    let fake = FakeAs::start().await;
    let reg = Registration::new("dm", Some(fake.url.as_str())).users("@_dm_.*:localhost", true);
    let (s, _regs) = start_server(&[&reg]).await;
    {
        let (base, token) = (s.base.clone(), reg.as_token.clone());
        fake.on_user_query(move |user: String| {
            let (base, token) = (base.clone(), token.clone());
            async move {
                if !user.starts_with("@_dm_bob") {
                    return (404, json!({"errcode": "M_NOT_FOUND"}));
                }
                let localpart = user.trim_start_matches('@').split(':').next().unwrap_or_default().to_owned();
                let registered = reqwest::Client::new()
                    .post(format!("{base}/_matrix/client/v3/register"))
                    .bearer_auth(token)
                    .json(&json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true}))
                    .send()
                    .await
                    .expect("register");
                assert!(registered.status().is_success());
                (200, json!({}))
            }
        });
    }
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "private_chat"})).await;
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(&room));
    s.ok(
        Method::POST,
        &invite,
        &alice.token,
        json!({"user_id": "@_dm_bob:localhost"}),
    )
    .await;
    let (status, body) = s
        .call(
            Method::POST,
            &invite,
            Some(&alice.token),
            Some(json!({"user_id": "@_dm_nobody:localhost"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
        "declined by the service"
    );
    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &alice.token,
            json!({"is_direct": true, "invite": ["@_dm_bob2:localhost"]}),
        )
        .await;
    let dm = created["room_id"].as_str().expect("room_id");
    let asked: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/users/"))
        .map(Request::decoded_path)
        .collect();
    for user in [
        "@_dm_bob:localhost",
        "@_dm_bob2:localhost",
        "@_dm_nobody:localhost",
    ] {
        assert!(
            asked.iter().any(|p| p.ends_with(user)),
            "the service was asked about {user}: {asked:?}"
        );
    }
    for (room, user) in [(room.as_str(), "@_dm_bob:localhost"), (dm, "@_dm_bob2:localhost")] {
        assert_eq!(
            s.state(&alice, room, "m.room.member", user).await["membership"],
            "invite",
            "{user} is invited"
        );
    }
}
