//! The homeserver → service API of the SDK, driven request by request: authentication, routes
//! (current and legacy), transaction de-duplication, per-room order, unstable-key fallbacks,
//! queries.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use ruma::{OwnedRoomAliasId, OwnedUserId, events::AnyTimelineEvent};
use serde_json::{Value, json};
use switchboard_appservice::{Appservice, Context, CryptoUpdate, Handler, HandlerResult, registration};
use tower::ServiceExt;

const REGISTRATION: &str = r"
id: test
url: http://127.0.0.1:1
as_token: the_as_token
hs_token: the_hs_token
sender_localpart: bot
namespaces:
  users: [{exclusive: true, regex: '@_t_.*:example\.org'}]
  aliases: [{exclusive: true, regex: '#_t_.*:example\.org'}]
";

const HS: Option<&str> = Some("the_hs_token");

#[derive(Clone, Default)]
struct Seen {
    events: Arc<Mutex<Vec<String>>>,
    ephemeral: Arc<Mutex<Vec<Value>>>,
    crypto: Arc<Mutex<Vec<CryptoUpdate>>>,
}

impl Handler for Seen {
    async fn event(&self, _ctx: Context, event: AnyTimelineEvent) -> HandlerResult {
        // The first event of room A is slow: room B's may overtake it, A's second may not.
        match event.event_id().as_str() {
            "$a1" | "$slow" => tokio::time::sleep(Duration::from_millis(100)).await,
            "$panic" => panic!("a handler bug"),
            _ => {}
        }
        self.events
            .lock()
            .expect("lock")
            .push(event.event_id().to_string());
        Ok(())
    }

    async fn ephemeral(&self, _ctx: Context, event: Value) -> HandlerResult {
        self.ephemeral.lock().expect("lock").push(event);
        Ok(())
    }

    async fn crypto(&self, _ctx: Context, update: CryptoUpdate) -> HandlerResult {
        self.crypto.lock().expect("lock").push(update);
        Ok(())
    }

    async fn query_user(&self, _ctx: Context, user_id: OwnedUserId) -> HandlerResult<bool> {
        Ok(user_id.localpart() == "_t_known")
    }

    async fn query_alias(&self, _ctx: Context, alias: OwnedRoomAliasId) -> HandlerResult<bool> {
        Ok(alias.alias() == "_t_known")
    }
}

fn service(seen: Seen, txn_file: &std::path::Path) -> axum::Router {
    let registration = registration::parse(REGISTRATION, "test.yaml").expect("valid");
    Appservice::builder(registration, "http://127.0.0.1:1", "example.org")
        .txn_file(txn_file)
        .build(seen)
        .expect("build")
        .router()
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = auth {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = app
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn errcode(body: &Value) -> Option<&str> {
    body["errcode"].as_str()
}

fn message(id: &str, room: &str) -> Value {
    json!({
        "type": "m.room.message", "event_id": id, "room_id": room, "sender": "@a:example.org",
        "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": id},
    })
}

#[tokio::test]
async fn the_homeserver_must_prove_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = service(Seen::default(), &dir.path().join("txns"));
    let txn = json!({"events": []});
    let path = "/_matrix/app/v1/transactions/1";
    let (status, body) = call(&app, "PUT", path, None, Some(txn.clone())).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, Some("M_UNAUTHORIZED"))
    );
    let (status, body) = call(&app, "PUT", path, Some("the_as_token"), Some(txn.clone())).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
    );
    let legacy = format!("{path}?access_token=the_hs_token");
    let (status, _) = call(&app, "PUT", &legacy, None, Some(txn)).await;
    assert_eq!(status, StatusCode::OK, "the legacy query parameter works too");

    let (status, body) = call(&app, "GET", "/_matrix/app/v1/nothing", HS, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED"))
    );
    let (status, body) = call(&app, "DELETE", path, HS, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, Some("M_UNRECOGNIZED"))
    );
    let (status, body) = call(&app, "PUT", "/_matrix/app/v1/transactions/2", HS, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );
}

#[tokio::test]
async fn transactions_are_handled_once_in_room_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = Seen::default();
    let app = service(seen.clone(), &dir.path().join("txns"));
    let txn = json!({
        "events": [
            message("$a1", "!a:example.org"),
            message("$b1", "!b:example.org"),
            message("$a2", "!a:example.org"),
        ],
        "de.sorunome.msc2409.ephemeral": [
            {"type": "m.typing", "room_id": "!a:example.org", "content": {"user_ids": []}}
        ],
        "org.matrix.msc3202.device_lists": {"changed": ["@c:example.org"], "left": []},
        "org.matrix.msc3202.device_one_time_keys_count": {
            "@_t_x:example.org": {"D": {"signed_curve25519": 3}}
        },
    });
    let path = "/_matrix/app/v1/transactions/7";
    let (status, _) = call(&app, "PUT", path, HS, Some(txn.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let events = seen.events.lock().expect("lock").clone();
    assert_eq!(
        events,
        ["$b1", "$a1", "$a2"],
        "rooms concurrently, each room in order"
    );
    assert_eq!(
        seen.ephemeral.lock().expect("lock").len(),
        1,
        "the unstable key is read as a fallback"
    );
    let crypto = seen.crypto.lock().expect("lock").clone();
    assert_eq!(crypto[0].device_lists_changed[0].as_str(), "@c:example.org");
    assert_eq!(
        crypto[0].one_time_keys_count["@_t_x:example.org"]["D"]["signed_curve25519"],
        3
    );

    // The same transaction again (the homeserver missed the answer), on the legacy route too.
    let (status, _) = call(&app, "PUT", path, HS, Some(txn.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "PUT", "/transactions/7", HS, Some(txn.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.events.lock().expect("lock").len(), 3, "not handled again");

    // After a restart of the service too.
    let app = service(seen.clone(), &dir.path().join("txns"));
    let (status, _) = call(&app, "PUT", path, HS, Some(txn)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen.events.lock().expect("lock").len(),
        3,
        "remembered across restarts"
    );
}

#[tokio::test]
async fn queries_answer_found_or_not_found_on_both_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = service(Seen::default(), &dir.path().join("txns"));
    for prefix in ["/_matrix/app/v1", ""] {
        let known = format!("{prefix}/users/@_t_known:example.org");
        assert_eq!(call(&app, "GET", &known, HS, None).await.0, StatusCode::OK);
        let other = format!("{prefix}/users/@_t_other:example.org");
        let (status, body) = call(&app, "GET", &other, HS, None).await;
        assert_eq!(
            (status, errcode(&body)),
            (StatusCode::NOT_FOUND, Some("M_NOT_FOUND"))
        );
        let known = format!("{prefix}/rooms/%23_t_known:example.org");
        assert_eq!(call(&app, "GET", &known, HS, None).await.0, StatusCode::OK);
        let other = format!("{prefix}/rooms/%23_t_other:example.org");
        assert_eq!(call(&app, "GET", &other, HS, None).await.0, StatusCode::NOT_FOUND);
    }
    let ping = json!({"transaction_id": "x"});
    let (status, _) = call(&app, "POST", "/_matrix/app/v1/ping", HS, Some(ping)).await;
    assert_eq!(status, StatusCode::OK);
    let protocol = "/_matrix/app/v1/thirdparty/protocol/irc";
    assert_eq!(
        call(&app, "GET", protocol, HS, None).await.0,
        StatusCode::NOT_FOUND,
        "the default handler knows no protocols"
    );
}

#[tokio::test]
async fn a_panicking_handler_or_an_impatient_homeserver_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = Seen::default();
    let app = service(seen.clone(), &dir.path().join("txns"));
    let txn = json!({"events": [message("$panic", "!a:example.org"), message("$after", "!a:example.org")]});
    let (status, _) = call(&app, "PUT", "/_matrix/app/v1/transactions/p", HS, Some(txn)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        *seen.events.lock().expect("lock"),
        ["$after"],
        "the room's next event is still handled"
    );

    // The homeserver hangs up before the answer; the transaction is finished all the same, and
    // its retry is acknowledged without handling it again.
    let txn = json!({"events": [message("$slow", "!s:example.org")]});
    let path = "/_matrix/app/v1/transactions/slow";
    let hung_up = tokio::time::timeout(
        Duration::from_millis(20),
        call(&app, "PUT", path, HS, Some(txn.clone())),
    )
    .await;
    assert!(hung_up.is_err(), "the request was dropped early");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = call(&app, "PUT", path, HS, Some(txn)).await;
    assert_eq!(status, StatusCode::OK);
    let slow = seen
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| *e == "$slow")
        .count();
    assert_eq!(slow, 1, "handled once, to the end");
}
