//! Application-service delivery benchmark: the real binary, a receiving service on loopback, and
//! HTTP clients sending messages. Prints send throughput and latency, delivered events/s,
//! send-to-delivery latency, events per transaction, catch-up time and peak RSS, with 1, 10 and
//! 100 registered services (one of them interested). Run with
//! `cargo bench -p switchboard --bench appservice` (set `BENCH_SERVICES=1` to run one size).
//! Switchboard runs on SQLite and on PostgreSQL (`BENCH_DATABASES=sqlite,postgres`, the default;
//! a fresh database on 127.0.0.1:5432 as in the tests, see `switchboard_store::testing`).
//! `BENCH_SYNAPSE=1` runs the same load against Synapse (installed into `target/synapse-venv`
//! from PyPI by `tests/interop/setup.sh synapse`) and prints Switchboard/Synapse ratios.

#[path = "../tests/api/harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "../tests/api/fake_as.rs"]
mod fake_as;

/// Concurrent sending clients (`BENCH_SENDERS`, default 32), each in its own room.
fn sender_count() -> usize {
    std::env::var("BENCH_SENDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::put};
use fake_as::Registration;
use harness::{Server, User, enc};
use serde_json::{Value, json};

const THROUGHPUT_EVENTS: usize = 10_000;
const PACED_RATE: usize = 1_000;
const PACED_SECONDS: usize = 5;
const CATCH_UP_EVENTS: usize = 10_000;

/// The receiving service: records when each event arrived and how big transactions were.
#[derive(Default)]
struct Receiver {
    arrivals: Mutex<HashMap<String, Instant>>,
    /// The last `seq` seen per room, and how often a room's messages arrived out of order.
    last_seq: Mutex<HashMap<String, u64>>,
    out_of_order: AtomicUsize,
    transactions: AtomicUsize,
    events: AtomicUsize,
    down: AtomicBool,
}

/// Answers `{}` as the spec says (Synapse treats a body that is not JSON as a failure).
async fn transaction(State(receiver): State<Arc<Receiver>>, body: Bytes) -> (StatusCode, axum::Json<Value>) {
    if receiver.down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
    }
    let now = Instant::now();
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let events = body["events"].as_array().cloned().unwrap_or_default();
    receiver.transactions.fetch_add(1, Ordering::Relaxed);
    receiver.events.fetch_add(events.len(), Ordering::Relaxed);
    if let Ok(mut last_seq) = receiver.last_seq.lock() {
        for event in &events {
            let (Some(room), Some(seq)) = (event["room_id"].as_str(), event["content"]["seq"].as_u64())
            else {
                continue;
            };
            let last = last_seq.entry(room.to_owned()).or_insert(0);
            if seq < *last {
                receiver.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *last = seq;
        }
    }
    if let Ok(mut arrivals) = receiver.arrivals.lock() {
        for event in events {
            if let Some(id) = event["event_id"].as_str() {
                arrivals.entry(id.to_owned()).or_insert(now);
            }
        }
    }
    (StatusCode::OK, axum::Json(json!({})))
}

async fn start_receiver() -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", axum::routing::post(|| async { "{}" }))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url)
}

struct Sent {
    at: HashMap<String, Instant>,
    latencies: Vec<Duration>,
}

/// `count` messages from `sender_count()` concurrent clients, paced to `rate` per second if given.
async fn send_load(
    server: &Arc<Server>,
    senders: &[(User, String)],
    count: usize,
    rate: Option<usize>,
) -> (Sent, Duration) {
    let started = Instant::now();
    let per_sender = count / senders.len();
    let client = reqwest::Client::new();
    let tasks: Vec<_> = senders
        .iter()
        .cloned()
        .enumerate()
        .map(|(n, (user, room))| {
            let (client, base) = (client.clone(), server.base.clone());
            tokio::spawn(async move {
                let mut at = HashMap::new();
                let mut latencies = Vec::new();
                for i in 0..per_sender {
                    if let Some(rate) = rate {
                        let due =
                            started + Duration::from_secs_f64((i * sender_count() + n) as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let seq = next_seq();
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                        enc(&room),
                        seq
                    );
                    let sent = Instant::now();
                    let response = client
                        .put(url)
                        .bearer_auth(&user.token)
                        .json(&json!({"msgtype": "m.text", "body": "benchmark", "seq": seq}))
                        .send()
                        .await
                        .expect("send");
                    let body: Value = response.json().await.expect("json");
                    latencies.push(sent.elapsed());
                    at.insert(body["event_id"].as_str().expect("event_id").to_owned(), sent);
                }
                (at, latencies)
            })
        })
        .collect();
    let mut sent = Sent {
        at: HashMap::new(),
        latencies: Vec::new(),
    };
    for task in tasks {
        let (at, latencies) = task.await.expect("sender");
        sent.at.extend(at);
        sent.latencies.extend(latencies);
    }
    (sent, started.elapsed())
}

/// A number that grows with every message of the run: the receiver checks that each room's
/// messages arrive in the order they were sent. Also makes transaction IDs unique.
fn next_seq() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

async fn wait_delivered(
    receiver: &Receiver,
    ids: &HashMap<String, Instant>,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let last = {
            let arrivals = receiver.arrivals.lock().expect("arrivals");
            ids.keys()
                .map(|id| arrivals.get(id).copied())
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().max())
        };
        if let Some(last) = last {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arrivals = receiver.arrivals.lock().expect("arrivals");
    let delivered = ids.keys().filter(|id| arrivals.contains_key(*id)).count();
    eprintln!(
        "only {delivered} of {} events delivered within {timeout:?}",
        ids.len()
    );
    None
}

fn order(receiver: &Receiver) -> String {
    match receiver.out_of_order.load(Ordering::Relaxed) {
        0 => "in order".to_owned(),
        n => format!("with {n} OUT OF ORDER"),
    }
}

fn percentile(values: &mut [Duration], p: f64) -> f64 {
    values.sort();
    values
        .get(((values.len() as f64 - 1.0) * p).round() as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn delivery_latencies(receiver: &Receiver, sent: &HashMap<String, Instant>) -> Vec<Duration> {
    let arrivals = receiver.arrivals.lock().expect("arrivals");
    sent.iter()
        .filter_map(|(id, at)| {
            arrivals
                .get(id)
                .map(|arrived| arrived.saturating_duration_since(*at))
        })
        .collect()
}

/// What one run measured.
struct Figures {
    sent_rate: f64,
    delivered_rate: f64,
    delivery_p50: f64,
    delivery_p99: f64,
    paced_p50: f64,
    paced_p99: f64,
    catch_up_rate: f64,
    peak_rss_kib: u64,
}

/// How much load a run offers: Synapse gets fewer events (it delivers ~100 a second), the same
/// concurrency and offered rate.
#[derive(Clone, Copy)]
struct Workload {
    throughput_events: usize,
    paced_seconds: usize,
    catch_up_events: usize,
}

const SWITCHBOARD_LOAD: Workload = Workload {
    throughput_events: THROUGHPUT_EVENTS,
    paced_seconds: PACED_SECONDS,
    catch_up_events: CATCH_UP_EVENTS,
};
const SYNAPSE_LOAD: Workload = Workload {
    throughput_events: 2_000,
    paced_seconds: 2,
    catch_up_events: 2_000,
};

async fn run(name: &str, services: usize, load: Workload) -> Option<Figures> {
    let (receiver, url) = start_receiver().await;
    let mut registrations = vec![Registration::new("bench", Some(&url)).users("@_bench_.*:localhost", true)];
    for i in 1..services {
        // Services that match nothing here: they cost matching time, nothing else.
        registrations.push(
            Registration::new(&format!("other{i}"), Some(&url))
                .users(&format!("@_other{i}_.*:localhost"), true),
        );
    }
    let named: Vec<(String, String)> = registrations
        .iter()
        .map(|r| (format!("{}.yaml", r.id), r.yaml()))
        .collect();
    let files: Vec<(&str, &str)> = named.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
    let (_files_dir, paths) = fake_as::write_registrations(&files);
    let server = if name == "synapse" {
        Server::start_synapse(&paths).await?
    } else {
        let extra = format!(
            "{}{}",
            fake_as::config_files_yaml(&paths),
            harness::RELAXED_LIMITS
        );
        Server::start_on(name == "sb-postgres", &extra, |text| text).await
    };
    let server = Arc::new(server);
    let as_token = registrations[0].as_token.clone();
    let ghost = fake_as::register_ghost(&server, &as_token, "_bench_ghost").await;

    let mut senders = Vec::new();
    for i in 0..sender_count() {
        let user = server.register(&format!("sender{i}")).await;
        let room = server.create_room(&user, json!({"preset": "public_chat"})).await;
        let join = fake_as::as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &ghost);
        server
            .ok(reqwest::Method::POST, &join, &as_token, json!({}))
            .await;
        senders.push((user, room));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (txns0, events0) = (
        receiver.transactions.load(Ordering::Relaxed),
        receiver.events.load(Ordering::Relaxed),
    );
    let deadline = Duration::from_secs(600);

    // Throughput: as fast as the clients can send.
    let cpu_before = server.cpu_seconds().unwrap_or(0.0);
    let load_cpu_before = harness::cpu_seconds("self").unwrap_or(0.0);
    let (mut sent, elapsed) = send_load(&server, &senders, load.throughput_events, None).await;
    let first = sent.at.values().min().copied().expect("sent");
    let last = wait_delivered(&receiver, &sent.at, deadline)
        .await
        .expect("all delivered");
    let delivered_rate = sent.at.len() as f64 / last.duration_since(first).as_secs_f64();
    let cpu_per_event = (server.cpu_seconds().unwrap_or(0.0) - cpu_before) / sent.at.len() as f64;
    let load_cpu_per_event =
        (harness::cpu_seconds("self").unwrap_or(0.0) - load_cpu_before) / sent.at.len() as f64;
    let mut delivery = delivery_latencies(&receiver, &sent.at);
    let txns = receiver.transactions.load(Ordering::Relaxed) - txns0;
    let events = receiver.events.load(Ordering::Relaxed) - events0;
    let sent_rate = sent.at.len() as f64 / elapsed.as_secs_f64();
    let (delivery_p50, delivery_p99) = (percentile(&mut delivery, 0.5), percentile(&mut delivery, 0.99));
    println!(
        "  {name:<11} {services:>3} services | throughput: sent {sent_rate:.0} events/s (send p50 {:.2} ms, p99 {:.2} ms); delivered {delivered_rate:.0} events/s {}; send→delivery p50 {delivery_p50:.1} ms, p99 {delivery_p99:.1} ms; {:.1} events/transaction; server CPU {:.0} µs/event (load generator and receiver {:.0} µs/event)",
        percentile(&mut sent.latencies, 0.5),
        percentile(&mut sent.latencies, 0.99),
        order(&receiver),
        events as f64 / txns.max(1) as f64,
        cpu_per_event * 1e6,
        load_cpu_per_event * 1e6,
    );

    // Latency under a steady offered load.
    let (sent, _) = send_load(
        &server,
        &senders,
        PACED_RATE * load.paced_seconds,
        Some(PACED_RATE),
    )
    .await;
    wait_delivered(&receiver, &sent.at, deadline)
        .await
        .expect("all delivered");
    let mut delivery = delivery_latencies(&receiver, &sent.at);
    let (paced_p50, paced_p99) = (percentile(&mut delivery, 0.5), percentile(&mut delivery, 0.99));
    println!(
        "  {name:<11} {services:>3} services | {PACED_RATE} msgs/s offered for {} s: send→delivery p50 {paced_p50:.1} ms, p99 {paced_p99:.1} ms",
        load.paced_seconds
    );

    // Catch-up: the service is down while events queue, then comes back and pings.
    receiver.down.store(true, Ordering::Relaxed);
    let (sent, _) = send_load(&server, &senders, load.catch_up_events, None).await;
    receiver.down.store(false, Ordering::Relaxed);
    let back = Instant::now();
    let ping = "/_matrix/client/v1/appservice/bench/ping";
    server.ok(reqwest::Method::POST, ping, &as_token, json!({})).await;
    let done = wait_delivered(&receiver, &sent.at, deadline)
        .await
        .expect("caught up");
    let catch_up = done.duration_since(back).as_secs_f64();
    let catch_up_rate = sent.at.len() as f64 / catch_up;
    let peak_rss_kib = server.peak_rss_kib().unwrap_or(0);
    println!(
        "  {name:<11} {services:>3} services | catch-up of {} queued events: {catch_up:.2} s ({catch_up_rate:.0} events/s), {}; peak RSS {peak_rss_kib} KiB",
        sent.at.len(),
        order(&receiver),
    );
    Some(Figures {
        sent_rate,
        delivered_rate,
        delivery_p50,
        delivery_p99,
        paced_p50,
        paced_p99,
        catch_up_rate,
        peak_rss_kib,
    })
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = match std::env::var("BENCH_SERVICES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1, 10, 100],
    };
    let synapse = std::env::var("BENCH_SYNAPSE").is_ok_and(|v| v == "1");
    if synapse {
        let setup = std::process::Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/interop/setup.sh"
            ))
            .arg("synapse")
            .status()
            .expect("run tests/interop/setup.sh");
        assert!(setup.success(), "installing Synapse failed");
    }
    let databases: Vec<String> = std::env::var("BENCH_DATABASES")
        .unwrap_or_else(|_| "sqlite,postgres".to_owned())
        .split(',')
        .map(|d| format!("sb-{}", d.trim()))
        .collect();
    println!(
        "application-service delivery (loopback, {} senders; Switchboard on {databases:?}: SQLite with \
         synchronous=FULL, PostgreSQL with its default fsync'd commits)",
        sender_count()
    );
    for services in sizes {
        let mut figures = Vec::new();
        for database in &databases {
            figures.push(
                run(database, services, SWITCHBOARD_LOAD)
                    .await
                    .expect("switchboard runs"),
            );
        }
        if let [sqlite, postgres] = &figures[..] {
            println!(
                "  PostgreSQL/SQLite {services:>3} services | delivered {:.2}×, send→delivery p99 at full load {:.2}×, at {PACED_RATE} msgs/s {:.2}×, catch-up {:.2}×",
                postgres.delivered_rate / sqlite.delivered_rate,
                postgres.delivery_p99 / sqlite.delivery_p99,
                postgres.paced_p99 / sqlite.paced_p99,
                postgres.catch_up_rate / sqlite.catch_up_rate,
            );
        }
        let Some(ours) = figures.into_iter().next() else {
            continue;
        };
        if !synapse {
            continue;
        }
        let Some(theirs) = run("synapse", services, SYNAPSE_LOAD).await else {
            println!("  synapse: not installed (target/synapse-venv)");
            continue;
        };
        println!(
            "  Switchboard/Synapse {services:>3} services | sent {:.1}×, delivered {:.1}×, send→delivery p99 at full load {:.1}× lower, at {PACED_RATE} msgs/s {:.1}× lower, catch-up {:.1}× faster, peak RSS {:.2}×",
            ours.sent_rate / theirs.sent_rate,
            ours.delivered_rate / theirs.delivered_rate,
            theirs.delivery_p99 / ours.delivery_p99,
            theirs.paced_p99 / ours.paced_p99,
            ours.catch_up_rate / theirs.catch_up_rate,
            ours.peak_rss_kib as f64 / theirs.peak_rss_kib.max(1) as f64,
        );
        let _ = (
            ours.delivery_p50,
            ours.paced_p50,
            theirs.delivery_p50,
            theirs.paced_p50,
        );
    }
}
