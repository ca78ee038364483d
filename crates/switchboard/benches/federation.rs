//! Federation benchmark: messages sent by users of one server, read by a user of another through
//! `/sync`, for each pair of Switchboard and Synapse (Synapse from `target/synapse-venv`, made by
//! `tests/interop/setup.sh synapse`, which this benchmark runs): Switchboard→Switchboard,
//! Switchboard→Synapse, Synapse→Switchboard and Synapse→Synapse, all on 127.0.0.1 with TLS from a
//! CA made for the run. Run with `cargo bench -p switchboard --bench federation`.
//!
//! Per pair, `BENCH_FED_ROOMS` rooms (default 16), each with its own sender on the sending server
//! and one reader on the receiving server who joined them all by alias:
//! - throughput: `BENCH_FED_EVENTS` messages (default 2,000) sent as fast as the senders can
//!   (one at a time per room); delivered events/s from the first send to the last arrival;
//! - latency: `BENCH_FED_RATE` messages a second offered for `BENCH_FED_SECONDS` (default 20/s for
//!   10 s); p50/p99 of send→arrival in the reader's `/sync`;
//! - catch-up: the receiving server down for `BENCH_FED_OUTAGE_SECS` (default 60) while
//!   `BENCH_FED_CATCH_UP` messages (default 500) are sent; the time from its restart until the
//!   reader has all of them.
//!
//! `BENCH_FED_PAIRS` picks pairs (`sb-sb,sb-synapse,synapse-sb,synapse-synapse`, the default).
//!
//! The benchmark asserts what it prints: a phase fails the run if a message the sender got an
//! `event_id` for has not reached the reader within `BENCH_FED_TIMEOUT_SECS` (default 300), or
//! reached it twice.

#[path = "../tests/api/harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "../tests/api/peers.rs"]
#[allow(dead_code)]
mod peers;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use harness::{User, enc};
use peers::Peer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// What the reader has seen: each message body with the moment it arrived, and repeats.
#[derive(Default)]
struct Arrivals {
    at: HashMap<String, Instant>,
    repeats: Vec<String>,
}

/// Follows the reader's `/sync` on its server until stopped, noting every message's arrival.
fn follow(server: String, reader: User, arrivals: Arc<Mutex<Arrivals>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let filter = json!({"room": {"timeline": {"limit": 1000}}, "presence": {"types": []}}).to_string();
        let mut since: Option<String> = None;
        loop {
            let mut url = format!(
                "{server}/_matrix/client/v3/sync?timeout=10000&filter={}",
                enc(&filter)
            );
            if let Some(token) = &since {
                url.push_str(&format!("&since={}", enc(token)));
            }
            let Ok(response) = client.get(&url).bearer_auth(&reader.token).send().await else {
                // The server is down (the catch-up phase): try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(body) = response.json::<Value>().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let now = Instant::now();
            let mut seen = arrivals.lock().expect("arrivals");
            for room in body["rooms"]["join"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, r)| r)
            {
                for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                    let Some(text) = event["content"]["body"].as_str() else {
                        continue;
                    };
                    if event["type"] != "m.room.message" || !text.starts_with("bench ") {
                        continue;
                    }
                    if seen.at.insert(text.to_owned(), now).is_some() {
                        seen.repeats.push(text.to_owned());
                    }
                }
            }
            drop(seen);
            if let Some(next) = body["next_batch"].as_str() {
                since = Some(next.to_owned());
            }
        }
    })
}

/// One pair's room set: senders on `from`, the reader on `to`.
struct Setup {
    rooms: Vec<(String, User)>,
    reader: User,
}

async fn setup(from: &Peer, to: &Peer, rooms: usize, tag: &str) -> Setup {
    let reader = to.server.register(&format!("reader_{tag}")).await;
    let mut set = Vec::new();
    for i in 0..rooms {
        let sender = from.server.register(&format!("sender{i}_{tag}")).await;
        let alias = format!("bench{i}_{tag}");
        let room = from
            .server
            .create_room(
                &sender,
                json!({"room_alias_name": alias, "preset": "public_chat"}),
            )
            .await;
        let (status, body) = to
            .server
            .call(
                Method::POST,
                &format!(
                    "/_matrix/client/v3/join/{}",
                    enc(&format!("#{alias}:{}", from.name))
                ),
                Some(&reader.token),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "join: {body}");
        set.push((room, sender));
    }
    Setup { rooms: set, reader }
}

/// Sends `count` messages named `bench <phase> <n>` spread over the rooms, one at a time per
/// room, every `gap` apart per room; returns each message's send time.
async fn send(
    from: &Peer,
    setup: &Setup,
    phase: &str,
    count: usize,
    gap: Option<Duration>,
) -> HashMap<String, Instant> {
    let per_room = count / setup.rooms.len();
    let mut tasks = Vec::new();
    for (r, (room, sender)) in setup.rooms.iter().enumerate() {
        let (base, token, room) = (from.server.base.clone(), sender.token.clone(), room.clone());
        let phase = phase.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut sent = HashMap::new();
            let start = Instant::now();
            for n in 0..per_room {
                if let Some(gap) = gap {
                    let due = start + gap * n as u32;
                    tokio::time::sleep_until(due.into()).await;
                }
                let text = format!("bench {phase} {r}-{n}");
                let at = Instant::now();
                let response = client
                    .put(format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{phase}{r}-{n}",
                        enc(&room)
                    ))
                    .bearer_auth(&token)
                    .json(&json!({"msgtype": "m.text", "body": text}))
                    .send()
                    .await
                    .expect("send");
                assert!(
                    response.status().is_success(),
                    "send: {}",
                    response.text().await.unwrap_or_default()
                );
                sent.insert(text, at);
            }
            sent
        }));
    }
    let mut sent = HashMap::new();
    for task in tasks {
        sent.extend(task.await.expect("sender"));
    }
    sent
}

/// Waits until every sent message arrived; returns the last arrival. Fails on a timeout or a repeat.
async fn all_arrived(
    arrivals: &Mutex<Arrivals>,
    sent: &HashMap<String, Instant>,
    timeout: Duration,
    what: &str,
) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        {
            let seen = arrivals.lock().expect("arrivals");
            assert!(
                seen.repeats.is_empty(),
                "{what}: delivered twice: {:?}",
                &seen.repeats[..seen.repeats.len().min(5)]
            );
            let missing = sent.keys().filter(|k| !seen.at.contains_key(*k)).count();
            if missing == 0 {
                return sent
                    .keys()
                    .filter_map(|k| seen.at.get(k))
                    .max()
                    .copied()
                    .expect("arrivals");
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {missing} of {} messages never arrived",
                sent.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    achieved: f64,
    catch_up_s: f64,
}

async fn start(kind: &str) -> Option<Peer> {
    match kind {
        "sb" => Some(Peer::switchboard("").await),
        _ => Peer::synapse().await,
    }
}

async fn restart(peer: &mut Peer, kind: &str) {
    if kind == "sb" {
        peer.server.restart().await;
    } else {
        peer.server.spawn_synapse().await;
    }
}

async fn run(from_kind: &str, to_kind: &str) -> Option<Figures> {
    let rooms = env_number("BENCH_FED_ROOMS", 16).max(1);
    let events = env_number("BENCH_FED_EVENTS", 2_000);
    let rate = env_number("BENCH_FED_RATE", 20).max(1);
    let seconds = env_number("BENCH_FED_SECONDS", 10);
    let outage = Duration::from_secs(env_number("BENCH_FED_OUTAGE_SECS", 60) as u64);
    let catch_up = env_number("BENCH_FED_CATCH_UP", 500);
    let timeout = Duration::from_secs(env_number("BENCH_FED_TIMEOUT_SECS", 300) as u64);
    let from = start(from_kind).await?;
    let mut to = start(to_kind).await?;
    let pair = format!("{from_kind}→{to_kind}");
    let setup = setup(&from, &to, rooms, "fed").await;
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let follower = follow(to.server.base.clone(), setup.reader.clone(), arrivals.clone());

    // Throughput.
    let sent = send(&from, &setup, "t", events, None).await;
    let first = sent.values().min().copied().expect("sent");
    let last = all_arrived(&arrivals, &sent, timeout, &format!("{pair} throughput")).await;
    let rate_delivered = sent.len() as f64 / (last - first).as_secs_f64();

    // Latency at a fixed offered load.
    let gap = Duration::from_secs_f64(rooms as f64 / rate as f64);
    let paced_started = Instant::now();
    let sent = send(&from, &setup, "p", rate * seconds, Some(gap)).await;
    let paced_last = all_arrived(&arrivals, &sent, timeout, &format!("{pair} latency")).await;
    let achieved = sent.len() as f64 / (paced_last - paced_started).as_secs_f64();
    let mut latencies: Vec<f64> = {
        let seen = arrivals.lock().expect("arrivals");
        sent.iter()
            .map(|(k, at)| (seen.at[k] - *at).as_secs_f64() * 1000.0)
            .collect()
    };
    let p50 = percentile(&mut latencies, 0.50);
    let p99 = percentile(&mut latencies, 0.99);

    // Catch-up after an outage of the receiving server.
    assert!(
        to.server.terminate().success(),
        "{pair}: the receiver did not stop cleanly"
    );
    let down = Instant::now();
    let sent = send(&from, &setup, "c", catch_up, None).await;
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    restart(&mut to, to_kind).await;
    let back = Instant::now();
    let caught_up = all_arrived(&arrivals, &sent, timeout, &format!("{pair} catch-up")).await;
    follower.abort();
    Some(Figures {
        rate: rate_delivered,
        p50_ms: p50,
        p99_ms: p99,
        achieved,
        catch_up_s: (caught_up - back).as_secs_f64(),
    })
}

#[tokio::main]
async fn main() {
    let setup = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/interop/setup.sh"
        ))
        .arg("synapse")
        .status()
        .expect("run tests/interop/setup.sh");
    assert!(setup.success(), "installing Synapse failed");
    let pairs: Vec<(String, String)> = std::env::var("BENCH_FED_PAIRS")
        .unwrap_or_else(|_| "sb-sb,sb-synapse,synapse-sb,synapse-synapse".to_owned())
        .split(',')
        .map(|p| {
            let (a, b) = p
                .trim()
                .split_once('-')
                .unwrap_or_else(|| panic!("BENCH_FED_PAIRS: {p:?} is not from-to"));
            for side in [a, b] {
                assert!(
                    side == "sb" || side == "synapse",
                    "BENCH_FED_PAIRS: {side:?} is sb or synapse"
                );
            }
            (a.to_owned(), b.to_owned())
        })
        .collect();
    println!(
        "federation (loopback, TLS; Switchboard on SQLite, Synapse 1.163 on SQLite): every message must \
         reach the reader's /sync once"
    );
    let mut results: Vec<(String, Figures)> = Vec::new();
    for (from, to) in &pairs {
        let Some(figures) = run(from, to).await else {
            println!("  {from}→{to}: Synapse is not installed");
            continue;
        };
        println!(
            "  {from:>7}→{to:<7} delivered {:>8.1} events/s | send→remote sync at {:.0} msgs/s offered: p50 {:>7.1} ms, p99 {:>7.1} ms | catch-up after the outage {:>6.2} s",
            figures.rate, figures.achieved, figures.p50_ms, figures.p99_ms, figures.catch_up_s
        );
        results.push((format!("{from}-{to}"), figures));
    }
    let find = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, f)| f);
    if let (Some(ours), Some(theirs)) = (find("sb-sb"), find("synapse-synapse")) {
        println!(
            "  Switchboard→Switchboard / Synapse→Synapse: delivered {:.1}× (target ≥ 20×), p99 {:.2}× (target ≤ 0.1×), catch-up {:.1}× faster",
            ours.rate / theirs.rate,
            ours.p99_ms / theirs.p99_ms,
            theirs.catch_up_s / ours.catch_up_s.max(0.001),
        );
    }
}
