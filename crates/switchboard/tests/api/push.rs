//! Push rules evaluated on the server: unread counts in `/sync` (reset by receipts and by one's
//! own messages, per thread on request, kept across a crash), `/notifications`, and pushers
//! delivering to a Push Gateway API receiver (down, back, rejecting).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, User, enc, errcode};

async fn shared_room(s: &Server, alice: &User, bob: &User) -> String {
    let room = s.create_room(bob, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        &alice.token,
        json!({}),
    )
    .await;
    room
}

async fn send(s: &Server, user: &User, room: &str, txn: &str, content: Value) -> String {
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
        &user.token,
        content,
    )
    .await["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned()
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

/// `unread_notifications` of the room in a full sync (with `filter`).
async fn counts(s: &Server, user: &User, room: &str, filter: &str) -> Value {
    let body = s.sync(user, &format!("filter={}", enc(filter))).await;
    body["rooms"]["join"][room].clone()
}

async fn receipt(s: &Server, user: &User, room: &str, event_id: &str, thread: Option<&str>) {
    let body = thread.map_or(json!({}), |t| json!({ "thread_id": t }));
    s.ok(
        Method::POST,
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(room),
            enc(event_id)
        ),
        &user.token,
        body,
    )
    .await;
}

#[tokio::test]
async fn unread_counts_follow_the_rules_reset_on_reading_and_survive_a_crash() {
    let mut s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = shared_room(&s, &alice, &bob).await;
    let none = "{}";

    send(&s, &bob, &room, "t1", text("hello")).await;
    let mention =
        json!({ "msgtype": "m.text", "body": "alice: look", "m.mentions": { "user_ids": [alice.user_id] } });
    let mention_id = send(&s, &bob, &room, "t2", mention).await;
    let section = counts(&s, &alice, &room, none).await;
    assert_eq!(
        section["unread_notifications"],
        json!({ "notification_count": 2, "highlight_count": 1 }),
        "{section}"
    );
    // Bob's own messages never count for him.
    let bobs = counts(&s, &bob, &room, none).await;
    assert_eq!(bobs["unread_notifications"]["notification_count"], 0);

    // /notifications: newest first, highlights alone, paging.
    let all = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications",
            &alice.token,
            json!({}),
        )
        .await;
    let list = all["notifications"].as_array().expect("notifications");
    assert_eq!(list.len(), 2, "{all}");
    assert_eq!(list[0]["event"]["event_id"], mention_id.as_str());
    assert_eq!(list[0]["room_id"], room.as_str());
    assert_eq!(list[0]["read"], false);
    assert!(
        list[0]["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .any(|a| a["set_tweak"] == "highlight"),
        "{all}"
    );
    let highlights = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications?only=highlight",
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(highlights["notifications"].as_array().map(Vec::len), Some(1));
    let page = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications?limit=1",
            &alice.token,
            json!({}),
        )
        .await;
    let next = page["next_token"].as_str().expect("next_token");
    let rest = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/notifications?limit=1&from={next}"),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(rest["notifications"][0]["event"]["content"]["body"], "hello");

    // A receipt resets the counts, in the next incremental sync too.
    let since = s.sync(&alice, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    receipt(&s, &alice, &room, &mention_id, None).await;
    let incremental = s.sync(&alice, &format!("since={since}&timeout=5000")).await;
    assert_eq!(
        incremental["rooms"]["join"][&room]["unread_notifications"],
        json!({ "notification_count": 0, "highlight_count": 0 }),
        "{incremental}"
    );
    let read = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications",
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(read["notifications"][0]["read"], true);

    // Writing in the room reads it.
    send(&s, &bob, &room, "t3", text("one more")).await;
    assert_eq!(
        counts(&s, &alice, &room, none).await["unread_notifications"]["notification_count"],
        1
    );
    send(&s, &alice, &room, "a1", text("I am here")).await;
    assert_eq!(
        counts(&s, &alice, &room, none).await["unread_notifications"]["notification_count"],
        0
    );

    // Threads: apart on request, together otherwise; a thread receipt reads only its thread.
    let root = send(&s, &bob, &room, "t4", text("thread root")).await;
    let reply = json!({ "msgtype": "m.text", "body": "in thread",
        "m.relates_to": { "rel_type": "m.thread", "event_id": root } });
    let reply_id = send(&s, &bob, &room, "t5", reply).await;
    let threaded_filter = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;
    let section = counts(&s, &alice, &room, threaded_filter).await;
    assert_eq!(
        section["unread_notifications"]["notification_count"], 1,
        "{section}"
    );
    assert_eq!(
        section["unread_thread_notifications"][&root]["notification_count"], 1,
        "{section}"
    );
    assert_eq!(
        counts(&s, &alice, &room, none).await["unread_notifications"]["notification_count"],
        2
    );
    receipt(&s, &alice, &room, &reply_id, Some(&root)).await;
    let section = counts(&s, &alice, &room, threaded_filter).await;
    assert_eq!(
        section["unread_notifications"]["notification_count"], 1,
        "{section}"
    );
    assert!(
        section["unread_thread_notifications"].get(&root).is_none(),
        "{section}"
    );

    // Events sent just before a kill -9 are counted after the restart, once.
    send(&s, &bob, &room, "t6", text("before the crash")).await;
    send(&s, &bob, &room, "t7", text("just before the crash")).await;
    s.crash_and_restart().await;
    let section = counts(&s, &alice, &room, none).await;
    assert_eq!(
        section["unread_notifications"]["notification_count"], 3,
        "{section}"
    );
}

#[tokio::test]
async fn push_rules_the_user_changed_decide() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = shared_room(&s, &alice, &bob).await;
    // Alice mutes the room with a room rule that does not notify…
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)),
        &alice.token,
        json!({ "actions": [] }),
    )
    .await;
    send(&s, &bob, &room, "m1", text("muted")).await;
    assert_eq!(
        counts(&s, &alice, &room, "{}").await["unread_notifications"]["notification_count"],
        0
    );
    // …and highlights a keyword everywhere else.
    s.ok(
        Method::DELETE,
        &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)),
        &alice.token,
        json!({}),
    )
    .await;
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/pushrules/global/content/pizza",
        &alice.token,
        json!({ "pattern": "pizza", "actions": ["notify", { "set_tweak": "highlight" }] }),
    )
    .await;
    send(&s, &bob, &room, "m2", text("who wants pizza")).await;
    assert_eq!(
        counts(&s, &alice, &room, "{}").await["unread_notifications"],
        json!({ "notification_count": 1, "highlight_count": 1 })
    );
}

/// A Push Gateway API receiver: records notifications, can be stopped (connections refused)
/// and started again on the same port, and can reject pushkeys.
#[derive(Clone)]
struct Gateway {
    port: u16,
    seen: Arc<Mutex<Vec<(Instant, Value)>>>,
    rejected: Arc<Mutex<Vec<String>>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Gateway {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway = Gateway {
            port: listener.local_addr().expect("addr").port(),
            seen: Arc::default(),
            rejected: Arc::default(),
            task: Arc::default(),
        };
        gateway.serve(listener);
        gateway
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        async fn notify(State(g): State<Gateway>, Json(body): Json<Value>) -> Json<Value> {
            g.seen.lock().expect("lock").push((Instant::now(), body));
            Json(json!({ "rejected": *g.rejected.lock().expect("lock") }))
        }
        let app = Router::new()
            .route("/_matrix/push/v1/notify", post(notify))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.task.lock().expect("lock") = Some(task);
    }

    fn stop(&self) {
        if let Some(task) = self.task.lock().expect("lock").take() {
            task.abort();
        }
    }

    async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind");
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/_matrix/push/v1/notify", self.port)
    }

    fn notifications(&self) -> Vec<Value> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, n)| n["notification"].clone())
            .collect()
    }

    async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.notifications();
            if seen.len() >= count || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn pusher(pushkey: &str, url: &str, data: Value) -> Value {
    let mut data = data;
    data["url"] = json!(url);
    json!({
        "pushkey": pushkey, "kind": "http", "app_id": "org.example.app",
        "app_display_name": "Example", "device_display_name": "Phone", "lang": "en", "data": data,
    })
}

#[tokio::test]
async fn pushers_wake_the_gateway_catch_up_after_an_outage_and_go_when_rejected() {
    let s = Server::start_with("ip_range_whitelist: ['127.0.0.1/32']").await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = shared_room(&s, &alice, &bob).await;
    let gateway = Gateway::start().await;

    s.ok(
        Method::POST,
        "/_matrix/client/v3/pushers/set",
        &alice.token,
        pusher("key-1", &gateway.url(), json!({})),
    )
    .await;
    let listed = s
        .ok(Method::GET, "/_matrix/client/v3/pushers", &alice.token, json!({}))
        .await;
    assert_eq!(listed["pushers"][0]["pushkey"], "key-1");
    assert_eq!(listed["pushers"][0]["data"]["url"], gateway.url().as_str());

    let mention =
        json!({ "msgtype": "m.text", "body": "alice!", "m.mentions": { "user_ids": [alice.user_id] } });
    let sent_at = Instant::now();
    let event_id = send(&s, &bob, &room, "p1", mention).await;
    let seen = gateway.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 1, "no notification reached the gateway");
    let latency = gateway.seen.lock().expect("lock")[0].0 - sent_at;
    println!("push latency (send → gateway): {latency:?}");
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    let n = &seen[0];
    assert_eq!(n["event_id"], event_id.as_str());
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["sender"], bob.user_id.as_str());
    assert_eq!(n["content"]["body"], "alice!");
    assert_eq!(n["prio"], "high");
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["devices"][0]["pushkey"], "key-1");
    assert_eq!(n["devices"][0]["app_id"], "org.example.app");
    assert_eq!(n["devices"][0]["tweaks"]["highlight"], true);
    assert!(n["devices"][0]["data"].get("url").is_none(), "{n}");

    // Down: what is sent meanwhile arrives, in order, once the gateway is back.
    gateway.stop();
    send(&s, &bob, &room, "p2", text("while down 1")).await;
    send(&s, &bob, &room, "p3", text("while down 2")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gateway.notifications().len(), 1);
    gateway.restart().await;
    let seen = gateway.wait_for(3, Duration::from_secs(30)).await;
    let bodies: Vec<&str> = seen
        .iter()
        .filter_map(|n| n["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["alice!", "while down 1", "while down 2"]);

    // event_id_only: no content leaves the server.
    s.ok(
        Method::POST,
        "/_matrix/client/v3/pushers/set",
        &alice.token,
        pusher("key-2", &gateway.url(), json!({ "format": "event_id_only" })),
    )
    .await;
    let id = send(&s, &bob, &room, "p4", text("secret")).await;
    let seen = gateway.wait_for(5, Duration::from_secs(10)).await;
    let slim = seen
        .iter()
        .find(|n| n["devices"][0]["pushkey"] == "key-2")
        .expect("key-2 notified");
    assert_eq!(slim["event_id"], id.as_str());
    assert!(
        slim.get("content").is_none() && slim.get("sender").is_none(),
        "{slim}"
    );
    assert_eq!(slim["devices"][0]["data"]["format"], "event_id_only");

    // A pushkey the gateway rejects: the pusher goes.
    gateway.rejected.lock().expect("lock").push("key-1".to_owned());
    send(&s, &bob, &room, "p5", text("last")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = s
            .ok(Method::GET, "/_matrix/client/v3/pushers", &alice.token, json!({}))
            .await;
        let keys: Vec<&str> = listed["pushers"]
            .as_array()
            .expect("pushers")
            .iter()
            .filter_map(|p| p["pushkey"].as_str())
            .collect();
        if keys == ["key-2"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rejected pusher still listed: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kind null deletes.
    let mut delete = pusher("key-2", &gateway.url(), json!({}));
    delete["kind"] = Value::Null;
    s.ok(
        Method::POST,
        "/_matrix/client/v3/pushers/set",
        &alice.token,
        delete,
    )
    .await;
    let listed = s
        .ok(Method::GET, "/_matrix/client/v3/pushers", &alice.token, json!({}))
        .await;
    assert_eq!(listed["pushers"], json!([]));

    // A pusher goes with the device that set it: a phone logged out is not woken.
    let phone = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/login",
            "",
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "password" }),
        )
        .await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    s.ok(
        Method::POST,
        "/_matrix/client/v3/pushers/set",
        &phone,
        pusher("phone", &gateway.url(), json!({})),
    )
    .await;
    s.ok(Method::POST, "/_matrix/client/v3/logout", &phone, json!({}))
        .await;
    let listed = s
        .ok(Method::GET, "/_matrix/client/v3/pushers", &alice.token, json!({}))
        .await;
    assert_eq!(listed["pushers"], json!([]));
}

#[tokio::test]
async fn pushers_with_bad_urls_are_refused() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let cases = [
        (
            pusher("k", "ftp://gateway.example/_matrix/push/v1/notify", json!({})),
            "M_INVALID_PARAM",
        ),
        (
            pusher("k", "https://gateway.example/other/path", json!({})),
            "M_INVALID_PARAM",
        ),
        (pusher("k", "not a url", json!({})), "M_INVALID_PARAM"),
        // Loopback and private ranges are off limits unless whitelisted.
        (
            pusher("k", "http://127.0.0.1:9/_matrix/push/v1/notify", json!({})),
            "M_INVALID_PARAM",
        ),
        (
            pusher("k", "http://10.1.2.3/_matrix/push/v1/notify", json!({})),
            "M_INVALID_PARAM",
        ),
        (
            pusher("k", "http://[::1]/_matrix/push/v1/notify", json!({})),
            "M_INVALID_PARAM",
        ),
        (
            json!({ "pushkey": "k", "kind": "http", "app_id": "a", "app_display_name": "A",
                    "device_display_name": "D", "lang": "en", "data": {} }),
            "M_MISSING_PARAM",
        ),
        (
            json!({ "pushkey": "k", "kind": "http", "app_id": "a", "lang": "en",
                    "data": { "url": "https://gateway.example/_matrix/push/v1/notify" } }),
            "M_MISSING_PARAM",
        ),
        (
            pusher(
                "k",
                "https://gateway.example/_matrix/push/v1/notify",
                json!({ "format": "full" }),
            ),
            "M_INVALID_PARAM",
        ),
        (json!({ "pushkey": "k", "app_id": "a" }), "M_BAD_JSON"),
    ];
    for (body, code) in cases {
        let (status, answer) = s
            .call(
                Method::POST,
                "/_matrix/client/v3/pushers/set",
                Some(&alice.token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (status, errcode(&answer)),
            (StatusCode::BAD_REQUEST, code),
            "{body}: {answer}"
        );
    }
    let listed = s
        .ok(Method::GET, "/_matrix/client/v3/pushers", &alice.token, json!({}))
        .await;
    assert_eq!(listed["pushers"], json!([]));
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/notifications?from=banana",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
}
