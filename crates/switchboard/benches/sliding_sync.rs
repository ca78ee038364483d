//! Element X's first screen, measured: the initial simplified sliding sync (MSC4186) of a user in
//! `BENCH_ROOMS` rooms (default 1,000) asking for the 20 most recent, as Element X asks (timeline
//! of 1, its required state, the e2ee, to-device, account-data, receipts and typing extensions),
//! beside an initial `/sync` of the same user, on Switchboard and — with Synapse installed in
//! `target/synapse-venv` (`tests/interop/setup.sh synapse`; `BENCH_SYNAPSE=0` to skip) — on
//! Synapse in the same run. Then push latency: `BENCH_PUSHERS` users (default 100), each with a
//! pusher to one gateway on loopback, in a room where another user sends; the time from the
//! send's answer to each notification's arrival.
//!
//! Run with `cargo bench -p switchboard --bench sliding_sync`. Prints median and p90 times and
//! response sizes; the targets (initial sliding sync under 50 ms, ≥ 10× faster than Synapse) are
//! reported as met or not.

#[path = "../tests/api/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use harness::{Server, User, enc};
use reqwest::Method;
use serde_json::{Value, json};

const LIMITS: &str = "rc_message: {per_second: 100000, burst_count: 100000}
rc_registration: {per_second: 1000, burst_count: 1000}
rc_login: {address: {per_second: 1000, burst_count: 1000}, account: {per_second: 1000, burst_count: 1000}}
rc_joins: {local: {per_second: 1000, burst_count: 1000}, remote: {per_second: 1000, burst_count: 1000}}
";
const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const REPEATS: usize = 20;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// What Element X's room list asks for first (matrix-sdk-ui's `RoomListService`).
fn element_x_request() -> Value {
    json!({
        "conn_id": "room-list",
        "lists": { "all_rooms": {
            "ranges": [[0, 19]],
            "timeline_limit": 1,
            "required_state": [
                ["m.room.encryption", ""], ["m.room.member", "$LAZY"], ["m.room.member", "$ME"],
                ["m.room.name", ""], ["m.room.topic", ""], ["m.room.avatar", ""],
                ["m.room.canonical_alias", ""], ["m.room.power_levels", ""], ["m.room.join_rules", ""],
                ["m.room.history_visibility", ""], ["m.room.create", ""], ["m.room.pinned_events", ""],
                ["org.matrix.msc3401.call.member", "*"],
            ],
        } },
        "extensions": {
            "account_data": { "enabled": true },
            "receipts": { "enabled": true, "rooms": ["*"] },
            "typing": { "enabled": true },
            "e2ee": { "enabled": true },
            "to_device": { "enabled": true },
        },
    })
}

struct Figures {
    median_ms: f64,
    p90_ms: f64,
    bytes: usize,
}

fn figures(mut times: Vec<Duration>, bytes: usize) -> Figures {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    Figures {
        median_ms: at(0.5),
        p90_ms: at(0.9),
        bytes,
    }
}

/// `count` rooms for the user, each with one message, made `parallel` at a time.
async fn fill(server: &Server, user: &User, count: usize) {
    let parallel = 8;
    let base = server.base.clone();
    let mut tasks = Vec::new();
    for worker in 0..parallel {
        let (base, token) = (base.clone(), user.token.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in (worker..count).step_by(parallel) {
                let room: Value = http
                    .post(format!("{base}/_matrix/client/v3/createRoom"))
                    .bearer_auth(&token)
                    .json(&json!({ "name": format!("room {i}") }))
                    .send()
                    .await
                    .expect("createRoom")
                    .json()
                    .await
                    .expect("json");
                let room = room["room_id"].as_str().expect("room_id").to_owned();
                let sent = http
                    .put(format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/t{i}",
                        enc(&room)
                    ))
                    .bearer_auth(&token)
                    .json(&json!({ "msgtype": "m.text", "body": format!("hello {i}") }))
                    .send()
                    .await
                    .expect("send");
                assert!(sent.status().is_success(), "send: {}", sent.status());
            }
        }));
    }
    for task in tasks {
        task.await.expect("filler");
    }
}

async fn timed(
    server: &Server,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (Duration, usize, Value) {
    let started = Instant::now();
    let mut request = server
        .http
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let took = started.elapsed();
    assert!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    (
        took,
        bytes.len(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Initial sliding sync and initial `/sync` of a user in `rooms` rooms.
async fn measure(name: &str, server: &Server, rooms: usize) -> (Figures, Figures) {
    let user = server.register("bench").await;
    let started = Instant::now();
    fill(server, &user, rooms).await;
    println!(
        "{name}: {rooms} rooms made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut sliding = Vec::new();
    let mut size = 0;
    for _ in 0..REPEATS {
        let (took, bytes, body) = timed(
            server,
            Method::POST,
            SLIDING,
            &user.token,
            Some(element_x_request()),
        )
        .await;
        assert_eq!(body["lists"]["all_rooms"]["count"], rooms, "{name}: list count");
        assert_eq!(
            body["rooms"].as_object().map(|r| r.len()),
            Some(20),
            "{name}: rooms sent"
        );
        sliding.push(took);
        size = bytes;
    }
    let sliding = figures(sliding, size);
    let mut sync = Vec::new();
    for _ in 0..3 {
        let (took, bytes, body) =
            timed(server, Method::GET, "/_matrix/client/v3/sync", &user.token, None).await;
        assert_eq!(
            body["rooms"]["join"].as_object().map(|r| r.len()),
            Some(rooms),
            "{name}: /sync rooms"
        );
        sync.push(took);
        size = bytes;
    }
    let sync = figures(sync, size);
    println!(
        "{name}: initial sliding sync (20 of {rooms}) median {:.1} ms, p90 {:.1} ms, {} bytes; initial /sync median {:.0} ms, {} bytes",
        sliding.median_ms, sliding.p90_ms, sliding.bytes, sync.median_ms, sync.bytes
    );
    (sliding, sync)
}

#[derive(Clone, Default)]
struct Gateway {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

async fn gateway() -> (Gateway, String) {
    async fn notify(State(g): State<Gateway>, Json(body): Json<Value>) -> Json<Value> {
        let event = body["notification"]["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Ok(mut seen) = g.seen.lock() {
            seen.push((Instant::now(), event));
        }
        Json(json!({ "rejected": [] }))
    }
    let g = Gateway::default();
    let app = Router::new()
        .route("/_matrix/push/v1/notify", post(notify))
        .with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/_matrix/push/v1/notify",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (g, url)
}

/// Send-to-gateway latency with `pushers` members each having a pusher.
async fn push_latency(pushers: usize) {
    let server = Server::start_with(&format!("{LIMITS}ip_range_whitelist: ['127.0.0.1/32']")).await;
    let (gateway, url) = gateway().await;
    let sender = server.register("sender").await;
    let room = server
        .create_room(&sender, json!({ "preset": "public_chat" }))
        .await;
    for i in 0..pushers {
        let user = server.register(&format!("reader{i}")).await;
        server
            .ok(
                Method::POST,
                &format!("/_matrix/client/v3/join/{}", enc(&room)),
                &user.token,
                json!({}),
            )
            .await;
        server
            .ok(
                Method::POST,
                "/_matrix/client/v3/pushers/set",
                &user.token,
                json!({ "pushkey": format!("key{i}"), "kind": "http", "app_id": "bench", "app_display_name": "b",
                        "device_display_name": "d", "lang": "en", "data": { "url": url } }),
            )
            .await;
    }
    let messages = 20;
    let mut latencies = Vec::new();
    for m in 0..messages {
        let started = Instant::now();
        let (status, body) = server.send_text(&sender, &room, &format!("p{m}"), "ping").await;
        assert!(status.is_success(), "send: {body}");
        let event = body["event_id"].as_str().expect("event_id").to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let arrived: Vec<Instant> = gateway
                .seen
                .lock()
                .map(|s| s.iter().filter(|(_, e)| *e == event).map(|(t, _)| *t).collect())
                .unwrap_or_default();
            if arrived.len() >= pushers {
                latencies.extend(arrived.iter().map(|t| t.duration_since(started)));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {pushers} notifications arrived",
                arrived.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let f = figures(latencies, 0);
    println!(
        "push latency, send → gateway, {pushers} pushers × {messages} messages: median {:.1} ms, p90 {:.1} ms",
        f.median_ms, f.p90_ms
    );
}

#[tokio::main]
async fn main() {
    let rooms = env_number("BENCH_ROOMS", 1000);
    let pushers = env_number("BENCH_PUSHERS", 100);
    let ours = Server::start_with(LIMITS).await;
    let (sliding, sync) = measure("Switchboard", &ours, rooms).await;
    drop(ours);
    println!(
        "Switchboard: sliding sync is {:.0}× faster than /sync and {:.0}× smaller",
        sync.median_ms / sliding.median_ms,
        sync.bytes as f64 / sliding.bytes as f64
    );
    let under = sliding.median_ms < 50.0;
    println!(
        "target: initial sliding sync under 50 ms: {}",
        if under { "met" } else { "NOT met" }
    );
    if std::env::var("BENCH_SYNAPSE").as_deref() != Ok("0") {
        let synapse = Server::start_synapse_edited(&[], |text| {
            text + "rc_room_creation: {per_second: 1000, burst_count: 1000}\nexperimental_features: {msc3575_enabled: true}\n"
        })
        .await;
        match synapse {
            Some(synapse) => {
                let (theirs, their_sync) = measure("Synapse", &synapse, rooms).await;
                let ratio = theirs.median_ms / sliding.median_ms;
                println!(
                    "Switchboard vs Synapse: sliding sync {ratio:.1}× faster ({}), /sync {:.1}× faster",
                    if ratio >= 10.0 {
                        "target ≥ 10× met"
                    } else {
                        "target ≥ 10× NOT met"
                    },
                    their_sync.median_ms / sync.median_ms
                );
            }
            None => println!("Synapse is not installed (tests/interop/setup.sh synapse): no comparison"),
        }
    }
    push_latency(pushers).await;
}
