//! Application-service delivery benchmark: the real binary, a receiving service on loopback, and
//! HTTP clients sending messages. Prints send throughput and latency, delivered events/s,
//! send-to-delivery latency, events per transaction, catch-up time and peak RSS, with 1, 10 and
//! 100 registered services (one of them interested). Run with
//! `cargo bench -p switchboard --bench appservice` (set `BENCH_SERVICES=1` to run one size).
//! Switchboard runs on SQLite and on PostgreSQL (`BENCH_DATABASES=sqlite,postgres`, the default;
//! a fresh database on 127.0.0.1:5432 as in the tests, see `switchboard_store::testing`).
//! `BENCH_SYNAPSE=1` runs the same load against Synapse (installed into `target/synapse-venv`
//! from PyPI by `tests/interop/setup.sh synapse`) and prints Switchboard/Synapse ratios.
//!
//! Every engine gets the same load: `BENCH_SENDERS` clients (default 32), each in its own room;
//! `BENCH_THROUGHPUT_EVENTS` messages sent as fast as the clients can (default 10,000),
//! `BENCH_PACED_RATE` messages a second for `BENCH_PACED_SECONDS` (default 1,000 for 5 s), and
//! `BENCH_CATCH_UP_EVENTS` messages queued while the service is down (default 10,000); totals are
//! rounded down to a multiple of the senders. Both homeservers run with the rate limits in
//! [`BENCH_LIMITS`] (checked against Synapse's config file).
//!
//! The benchmark asserts what it prints. Each phase (setup, throughput, paced, catch-up) starts
//! with a fresh record at the receiver; a phase fails the run, naming the engine, the phase and
//! the counts, if a message the senders got an `event_id` for is not delivered within
//! `BENCH_DELIVERY_TIMEOUT_SECS` (default 600) of the last send, if any event is delivered twice
//! (in this phase or after an earlier one: a duplicate counts once for throughput and is reported),
//! if a room's messages arrive out of the order they were sent in, if a message nobody sent in the
//! phase arrives, or if a transaction is malformed or reaches a service that should get nothing.
//! A phase ends only once no transaction has arrived for a moment, so a late re-delivery is
//! counted in the phase it belongs to rather than in the next one's figures.

#[path = "../tests/api/harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "../tests/api/fake_as.rs"]
mod fake_as;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    routing::put,
};
use fake_as::Registration;
use harness::{Server, User, enc};
use serde_json::{Value, json};

/// The rate limits both homeservers run with: exactly the `rc_*` lines
/// `harness::Server::start_synapse` writes into Synapse's config (checked when Synapse starts),
/// given to Switchboard too. High enough that no phase of the load is ever limited.
const BENCH_LIMITS: &str = "rc_message: {per_second: 100000, burst_count: 100000}
rc_registration: {per_second: 1000, burst_count: 1000}
rc_login: {address: {per_second: 1000, burst_count: 1000}, account: {per_second: 1000, burst_count: 1000}}
rc_joins: {local: {per_second: 1000, burst_count: 1000}, remote: {per_second: 1000, burst_count: 1000}}
";

/// How long no transaction may arrive before a phase is closed (the last phase waits longer:
/// there is no next phase to see a late re-delivery).
const PHASE_QUIET: Duration = Duration::from_secs(1);
const FINAL_QUIET: Duration = Duration::from_secs(3);
/// The longest a phase waits for the homeserver to fall quiet before moving on anyway.
const QUIET_LIMIT: Duration = Duration::from_secs(60);
/// How many examples of violations a failure message quotes.
const EXAMPLES: usize = 8;

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// The load a run offers. Every engine, Synapse included, gets the same one.
#[derive(Clone, Copy, Debug)]
struct Workload {
    /// Concurrent sending clients, each in its own room, each sending one message at a time.
    senders: usize,
    /// Messages per sender in the throughput phase.
    throughput_per_sender: usize,
    /// Offered messages a second, and for how long, in the paced phase.
    paced_rate: usize,
    paced_seconds: usize,
    /// Messages per sender queued while the service is down.
    catch_up_per_sender: usize,
}

impl Workload {
    fn from_env() -> Self {
        let senders = env_number("BENCH_SENDERS", 32);
        assert!(senders > 0, "BENCH_SENDERS must be at least 1");
        let per_sender = |name: &str, total: usize| {
            assert!(
                total >= senders,
                "{name}={total} is fewer than one message per sender ({senders} senders)"
            );
            total / senders
        };
        let paced_rate = env_number("BENCH_PACED_RATE", 1_000);
        let paced_seconds = env_number("BENCH_PACED_SECONDS", 5);
        per_sender(
            "BENCH_PACED_RATE × BENCH_PACED_SECONDS",
            paced_rate * paced_seconds,
        );
        Self {
            senders,
            throughput_per_sender: per_sender(
                "BENCH_THROUGHPUT_EVENTS",
                env_number("BENCH_THROUGHPUT_EVENTS", 10_000),
            ),
            paced_rate,
            paced_seconds,
            catch_up_per_sender: per_sender(
                "BENCH_CATCH_UP_EVENTS",
                env_number("BENCH_CATCH_UP_EVENTS", 10_000),
            ),
        }
    }

    fn paced_per_sender(&self) -> usize {
        self.paced_rate * self.paced_seconds / self.senders
    }

    fn describe(&self) -> String {
        format!(
            "{} senders; throughput {} messages; paced {} messages at {} msgs/s ({} s); catch-up {} messages",
            self.senders,
            self.throughput_per_sender * self.senders,
            self.paced_per_sender() * self.senders,
            self.paced_rate,
            self.paced_seconds,
            self.catch_up_per_sender * self.senders,
        )
    }
}

/// What the receiving service saw during one phase of a run.
struct Phase {
    name: &'static str,
    /// When each benchmark message first arrived (a re-delivery does not count again).
    arrivals: HashMap<String, Instant>,
    /// Per room, the highest `seq` delivered so far. Every message carries a number that grows
    /// with each send, and each room has one sender sending one message at a time, so a room's
    /// numbers must arrive increasing.
    last_seq: HashMap<String, u64>,
    /// Accepted transactions and the events in them (re-deliveries included).
    transactions: usize,
    events: usize,
    /// Transaction attempts answered 503 while the service was down.
    refused: usize,
    /// When the last transaction attempt (accepted or refused, any service) arrived.
    last_attempt: Option<Instant>,
    /// Events delivered again: their ID arrived before, in this phase or an earlier one.
    duplicates: usize,
    /// Accepted transactions whose ID had been accepted before.
    resent_transactions: usize,
    /// Messages delivered after a later message of the same room.
    out_of_order: usize,
    /// Bodies that are not a JSON object with `events`, and events without an `event_id`.
    malformed: usize,
    /// Events in transactions to a service that matches nothing (or without the bench
    /// service's `hs_token`).
    foreign: usize,
    /// Events that are not benchmark messages (membership during setup), by type.
    other: BTreeMap<String, usize>,
    /// `(room, state_key)` of every member event delivered.
    members: HashSet<(String, String)>,
    /// A few of the violations above, described, for the failure message.
    examples: Vec<String>,
}

impl Phase {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            arrivals: HashMap::new(),
            last_seq: HashMap::new(),
            transactions: 0,
            events: 0,
            refused: 0,
            last_attempt: None,
            duplicates: 0,
            resent_transactions: 0,
            out_of_order: 0,
            malformed: 0,
            foreign: 0,
            other: BTreeMap::new(),
            members: HashSet::new(),
            examples: Vec::new(),
        }
    }

    fn example(&mut self, text: impl FnOnce() -> String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(text());
        }
    }

    fn events_per_transaction(&self) -> f64 {
        self.events as f64 / self.transactions.max(1) as f64
    }
}

struct Record {
    phase: Phase,
    /// Every event delivered during the run, and the phase it first arrived in.
    seen: HashMap<String, &'static str>,
    /// Every transaction ID the bench service accepted during the run.
    txn_ids: HashSet<String>,
}

/// The receiving service: records, phase by phase, what arrived when.
struct Receiver {
    /// The bench service's `hs_token`: transactions carrying another are for the idle services.
    hs_token: String,
    record: Mutex<Record>,
    down: AtomicBool,
}

/// The `hs_token` a request carries: `Authorization: Bearer …` or the legacy `access_token`.
fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(token) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(token.to_owned());
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .map(fake_as::percent_decode)
}

/// Answers `{}` as the spec says (Synapse treats a body that is not JSON as a failure).
async fn transaction(
    State(receiver): State<Arc<Receiver>>,
    Path(txn): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let now = Instant::now();
    let ok = (StatusCode::OK, axum::Json(json!({})));
    let mut record = receiver.record.lock().expect("receiver record");
    let Record { phase, seen, txn_ids } = &mut *record;
    phase.last_attempt = Some(now);
    if receiver.down.load(Ordering::Relaxed) {
        phase.refused += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(events) = body["events"].as_array() else {
        phase.malformed += 1;
        phase.example(|| format!("transaction {txn} has no `events` array"));
        return ok;
    };
    if request_token(&headers, query.as_deref()).as_deref() != Some(receiver.hs_token.as_str()) {
        phase.foreign += events.len();
        phase.example(|| {
            format!(
                "transaction {txn} with {} events went to a service that matches nothing",
                events.len()
            )
        });
        return ok;
    }
    phase.transactions += 1;
    phase.events += events.len();
    if !txn_ids.insert(txn.clone()) {
        phase.resent_transactions += 1;
    }
    for event in events {
        let Some(id) = event["event_id"].as_str() else {
            phase.malformed += 1;
            phase.example(|| format!("an event without event_id in transaction {txn}"));
            continue;
        };
        if let Some(first) = seen.get(id) {
            phase.duplicates += 1;
            phase.example(|| {
                format!("{id} delivered again in transaction {txn} (first in the {first} phase)")
            });
            continue;
        }
        seen.insert(id.to_owned(), phase.name);
        let room = event["room_id"].as_str().unwrap_or_default();
        let Some(seq) = event["content"]["seq"].as_u64() else {
            let kind = event["type"].as_str().unwrap_or("<no type>");
            *phase.other.entry(kind.to_owned()).or_default() += 1;
            if let (true, Some(target)) = (kind == "m.room.member", event["state_key"].as_str()) {
                phase.members.insert((room.to_owned(), target.to_owned()));
            }
            continue;
        };
        phase.arrivals.insert(id.to_owned(), now);
        match phase.last_seq.get(room) {
            Some(&last) if seq <= last => {
                phase.out_of_order += 1;
                phase.example(|| format!("message {seq} ({id}) in {room} delivered after message {last}"));
            }
            _ => {
                phase.last_seq.insert(room.to_owned(), seq);
            }
        }
    }
    ok
}

async fn start_receiver(hs_token: &str) -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver {
        hs_token: hs_token.to_owned(),
        record: Mutex::new(Record {
            phase: Phase::new("setup"),
            seen: HashMap::new(),
            txn_ids: HashSet::new(),
        }),
        down: AtomicBool::new(false),
    });
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", axum::routing::post(|| async { "{}" }))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url)
}

impl Receiver {
    fn with<T>(&self, f: impl FnOnce(&Phase) -> T) -> T {
        f(&self.record.lock().expect("receiver record").phase)
    }

    /// Ends the current phase and starts `next`: whatever arrives from now on counts there.
    fn switch(&self, next: &'static str) -> Phase {
        let mut record = self.record.lock().expect("receiver record");
        std::mem::replace(&mut record.phase, Phase::new(next))
    }

    /// Waits until every message in `sent` arrived in the current phase: the latest arrival, or
    /// the messages still missing at `timeout`.
    async fn wait_for(
        &self,
        sent: &HashMap<String, Instant>,
        timeout: Duration,
    ) -> Result<Instant, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut missing: HashSet<&String> = sent.keys().collect();
        let mut last: Option<Instant> = None;
        loop {
            self.with(|phase| {
                missing.retain(|id| match phase.arrivals.get(*id) {
                    Some(&at) => {
                        last = Some(last.map_or(at, |l| l.max(at)));
                        false
                    }
                    None => true,
                });
            });
            if missing.is_empty() {
                return Ok(last.unwrap_or_else(Instant::now));
            }
            if Instant::now() >= deadline {
                let mut missing: Vec<String> = missing.into_iter().cloned().collect();
                missing.sort();
                return Err(missing);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no transaction attempt arrived for `quiet` (at most `QUIET_LIMIT`), so that
    /// whatever the homeserver still sends for this phase is counted in it.
    async fn settle(&self, quiet: Duration, run: &str) {
        let deadline = Instant::now() + QUIET_LIMIT;
        loop {
            let last = self.with(|phase| phase.last_attempt);
            let since = last.map_or(quiet, |at| at.elapsed());
            if since >= quiet {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "  {run}: transactions still arriving {QUIET_LIMIT:?} after every message was delivered; \
                     the next phase counts them"
                );
                return;
            }
            tokio::time::sleep(quiet - since).await;
        }
    }
}

/// What a closed phase must show: every message in `sent` delivered once, each room's in the
/// order sent, and nothing else wrong. Returns a summary for the printed figures; otherwise
/// fails the run, naming the engine, the phase and the counts.
fn check(
    run: &str,
    phase: &Phase,
    sent: &HashMap<String, Instant>,
    missing: &[String],
    timeout: Duration,
) -> String {
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {} expected deliveries LOST (not there {timeout:?} after the last send), e.g. {:?}",
            missing.len(),
            sent.len().max(missing.len()),
            &missing[..missing.len().min(EXAMPLES)]
        ));
    }
    if phase.duplicates > 0 {
        problems.push(format!(
            "{} events DELIVERED AGAIN ({} transactions re-sent after they were accepted)",
            phase.duplicates, phase.resent_transactions
        ));
    }
    if phase.out_of_order > 0 {
        problems.push(format!(
            "{} messages OUT OF ORDER (delivered after a later message of their room)",
            phase.out_of_order
        ));
    }
    let unexpected: Vec<&String> = phase
        .arrivals
        .keys()
        .filter(|id| !sent.contains_key(*id))
        .collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} messages delivered that this phase did not send, e.g. {:?}",
            unexpected.len(),
            &unexpected[..unexpected.len().min(EXAMPLES)]
        ));
    }
    if phase.malformed > 0 {
        problems.push(format!("{} malformed transactions or events", phase.malformed));
    }
    if phase.foreign > 0 {
        problems.push(format!(
            "{} events delivered to services that match nothing (or without the bench service's hs_token)",
            phase.foreign
        ));
    }
    if !problems.is_empty() {
        panic!(
            "{run}, {} phase FAILED: {}; {} accepted transactions with {} events, {} refused; examples: {:#?}",
            phase.name,
            problems.join("; "),
            phase.transactions,
            phase.events,
            phase.refused,
            phase.examples
        );
    }
    let mut summary = format!("all {} delivered once, in order", sent.len());
    if !phase.other.is_empty() {
        let other: Vec<String> = phase
            .other
            .iter()
            .map(|(kind, n)| format!("{n}× {kind}"))
            .collect();
        summary.push_str(&format!(" (also {})", other.join(", ")));
    }
    if phase.resent_transactions > 0 {
        summary.push_str(&format!(
            " ({} empty transactions re-sent)",
            phase.resent_transactions
        ));
    }
    summary
}

/// Closes the current phase once `delivered` says every message arrived (then waits for quiet,
/// so late re-deliveries count here) and starts `next`. Returns the closed phase, the last
/// arrival and the summary; fails the run on any violation.
async fn close_phase(
    receiver: &Receiver,
    run: &str,
    next: &'static str,
    sent: &HashMap<String, Instant>,
    delivered: Result<Instant, Vec<String>>,
    quiet: Duration,
    timeout: Duration,
) -> (Phase, Instant, String) {
    if delivered.is_ok() {
        receiver.settle(quiet, run).await;
    }
    let phase = receiver.switch(next);
    let missing = delivered.as_ref().err().map_or(&[][..], Vec::as_slice);
    let summary = check(run, &phase, sent, missing, timeout);
    let last = delivered.unwrap_or_else(|_| unreachable!("check fails on missing messages"));
    (phase, last, summary)
}

struct Sent {
    /// When each message was sent, by the `event_id` the homeserver answered with.
    at: HashMap<String, Instant>,
    latencies: Vec<Duration>,
    /// How late each paced send started against its schedule.
    lateness: Vec<Duration>,
    started: Instant,
    /// When the last send started, and when the last answer came.
    last_start: Instant,
    elapsed: Duration,
}

/// `per_sender` messages from each sender in its room, paced to `rate` per second in all if given.
/// Each client sends one message at a time, so a homeserver slower than the pace offers itself
/// less: the achieved rate is measured (see `Sent::lateness`).
async fn send_load(
    run: &str,
    phase: &str,
    server: &Arc<Server>,
    senders: &[(User, String)],
    per_sender: usize,
    rate: Option<usize>,
) -> Sent {
    let started = Instant::now();
    let count = senders.len();
    let client = reqwest::Client::new();
    let tasks: Vec<_> = senders
        .iter()
        .cloned()
        .enumerate()
        .map(|(n, (user, room))| {
            let (client, base) = (client.clone(), server.base.clone());
            let label = format!("{run}, {phase} phase");
            tokio::spawn(async move {
                let mut at = HashMap::new();
                let mut latencies = Vec::new();
                let mut lateness = Vec::new();
                let mut last_start = started;
                for i in 0..per_sender {
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64((i * count + n) as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                        lateness.push(Instant::now().saturating_duration_since(due));
                    }
                    let seq = next_seq();
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                        enc(&room),
                        seq
                    );
                    let sent = Instant::now();
                    last_start = sent;
                    let response = client
                        .put(url)
                        .bearer_auth(&user.token)
                        .json(&json!({"msgtype": "m.text", "body": "benchmark", "seq": seq}))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("{label}: sending message {seq} in {room}: {e}"));
                    let status = response.status();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    latencies.push(sent.elapsed());
                    let Some(id) = body["event_id"].as_str().filter(|_| status.is_success()) else {
                        panic!("{label}: sending message {seq} in {room} answered {status}: {body}");
                    };
                    if at.insert(id.to_owned(), sent).is_some() {
                        panic!(
                            "{label}: message {seq} in {room} got the event ID {id} of an earlier message"
                        );
                    }
                }
                (at, latencies, lateness, last_start)
            })
        })
        .collect();
    let mut sent = Sent {
        at: HashMap::new(),
        latencies: Vec::new(),
        lateness: Vec::new(),
        started,
        last_start: started,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (at, latencies, lateness, last_start) = task.await.expect("sender");
        sent.at.extend(at);
        sent.latencies.extend(latencies);
        sent.lateness.extend(lateness);
        sent.last_start = sent.last_start.max(last_start);
    }
    sent.elapsed = started.elapsed();
    assert_eq!(
        sent.at.len(),
        per_sender * count,
        "{run}, {phase} phase: senders got {} distinct event IDs for {} messages",
        sent.at.len(),
        per_sender * count
    );
    sent
}

/// A number that grows with every message of the run: the receiver checks that each room's
/// messages arrive in the order they were sent. Also makes transaction IDs unique.
fn next_seq() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn percentile(values: &mut [Duration], p: f64) -> f64 {
    values.sort();
    values
        .get(((values.len() as f64 - 1.0) * p).round() as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// Send-to-first-delivery time of each message sent.
fn delivery_latencies(phase: &Phase, sent: &HashMap<String, Instant>) -> Vec<Duration> {
    sent.iter()
        .filter_map(|(id, at)| {
            phase
                .arrivals
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
    paced_achieved: f64,
    paced_p50: f64,
    paced_p99: f64,
    catch_up_rate: f64,
    catch_up_first: f64,
    peak_rss_kib: u64,
}

/// Synapse must run under the same rate limits as Switchboard: its config's `rc_*` lines must be
/// exactly [`BENCH_LIMITS`].
fn check_synapse_limits(server: &Server) {
    let path = server.dir.path().join("homeserver.yaml");
    let config = std::fs::read_to_string(&path).expect("Synapse's config");
    let rate_lines = |text: &str| -> HashSet<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("rc_"))
            .map(str::to_owned)
            .collect()
    };
    let (synapse, ours) = (rate_lines(&config), rate_lines(BENCH_LIMITS));
    assert!(
        synapse == ours,
        "Synapse's rate limits ({}, written by harness::Server::start_synapse) differ from the ones \
         Switchboard gets in this benchmark: only Synapse has {:?}, only Switchboard {:?}",
        path.display(),
        synapse.difference(&ours).collect::<Vec<_>>(),
        ours.difference(&synapse).collect::<Vec<_>>()
    );
}

async fn run(engine: &str, services: usize, load: &Workload, timeout: Duration) -> Option<Figures> {
    let label = format!("{engine}, {services} services");
    let bench = Registration::new("bench", None).users("@_bench_.*:localhost", true);
    let (receiver, url) = start_receiver(&bench.hs_token).await;
    let mut registrations = vec![Registration {
        url: Some(url.clone()),
        ..bench
    }];
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
    let server = if engine == "synapse" {
        let server = Server::start_synapse(&paths).await?;
        check_synapse_limits(&server);
        server
    } else {
        let extra = format!("{}{BENCH_LIMITS}", fake_as::config_files_yaml(&paths));
        Server::start_on(engine == "sb-postgres", &extra, |text| text).await
    };
    let server = Arc::new(server);
    let as_token = registrations[0].as_token.clone();
    let ghost = fake_as::register_ghost(&server, &as_token, "_bench_ghost").await;

    // Setup: one room per sender, which the service's ghost joins. The service must get each
    // join; whatever else setup causes is over before the first measured phase starts.
    let mut senders = Vec::new();
    for i in 0..load.senders {
        let user = server.register(&format!("sender{i}")).await;
        let room = server.create_room(&user, json!({"preset": "public_chat"})).await;
        let join = fake_as::as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &ghost);
        server
            .ok(reqwest::Method::POST, &join, &as_token, json!({}))
            .await;
        senders.push((user, room));
    }
    let deadline = Instant::now() + timeout;
    let joins_missing = loop {
        let missing: Vec<String> = receiver.with(|phase| {
            senders
                .iter()
                .filter(|(_, room)| !phase.members.contains(&(room.clone(), ghost.clone())))
                .map(|(_, room)| format!("{ghost}'s join of {room}"))
                .collect()
        });
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if joins_missing.is_empty() {
        receiver.settle(Duration::from_secs(2), &label).await;
    }
    let setup = receiver.switch("throughput");
    check(&label, &setup, &HashMap::new(), &joins_missing, timeout);

    // Throughput: as fast as the clients can send.
    let cpu_before = server.cpu_seconds().unwrap_or(0.0);
    let load_cpu_before = harness::cpu_seconds("self").unwrap_or(0.0);
    let mut sent = send_load(
        &label,
        "throughput",
        &server,
        &senders,
        load.throughput_per_sender,
        None,
    )
    .await;
    let delivered = receiver.wait_for(&sent.at, timeout).await;
    let cpu = server.cpu_seconds().unwrap_or(0.0) - cpu_before;
    let load_cpu = harness::cpu_seconds("self").unwrap_or(0.0) - load_cpu_before;
    let (phase, last, check_summary) = close_phase(
        &receiver,
        &label,
        "paced",
        &sent.at,
        delivered,
        PHASE_QUIET,
        timeout,
    )
    .await;
    let n = sent.at.len() as f64;
    let first = sent.at.values().min().copied().unwrap_or(sent.started);
    let delivered_rate = n / last.duration_since(first).as_secs_f64();
    let mut delivery = delivery_latencies(&phase, &sent.at);
    let sent_rate = n / sent.elapsed.as_secs_f64();
    let (delivery_p50, delivery_p99) = (percentile(&mut delivery, 0.5), percentile(&mut delivery, 0.99));
    println!(
        "  {engine:<11} {services:>3} services | throughput, {} messages: sent {sent_rate:.0} events/s (send p50 {:.2} ms, p99 {:.2} ms); delivered {delivered_rate:.0} events/s, {check_summary}; send→delivery p50 {delivery_p50:.1} ms, p99 {delivery_p99:.1} ms; {} transactions, {:.1} events/transaction; server CPU {:.0} µs/event (load generator and receiver {:.0} µs/event)",
        sent.at.len(),
        percentile(&mut sent.latencies, 0.5),
        percentile(&mut sent.latencies, 0.99),
        phase.transactions,
        phase.events_per_transaction(),
        cpu / n * 1e6,
        load_cpu / n * 1e6,
    );

    // Latency under a steady offered load.
    let rate = load.paced_rate;
    let mut sent = send_load(
        &label,
        "paced",
        &server,
        &senders,
        load.paced_per_sender(),
        Some(rate),
    )
    .await;
    let delivered = receiver.wait_for(&sent.at, timeout).await;
    let (phase, _, check_summary) = close_phase(
        &receiver,
        &label,
        "catch-up",
        &sent.at,
        delivered,
        PHASE_QUIET,
        timeout,
    )
    .await;
    let mut delivery = delivery_latencies(&phase, &sent.at);
    let (paced_p50, paced_p99) = (percentile(&mut delivery, 0.5), percentile(&mut delivery, 0.99));
    let n = sent.at.len() as f64;
    // On schedule, the last send starts (n - 1)/rate after the first.
    let paced_achieved = n / (sent.last_start.duration_since(sent.started).as_secs_f64() + 1.0 / rate as f64);
    let max_late = sent.lateness.iter().max().copied().unwrap_or_default();
    let behind = if paced_achieved < 0.95 * rate as f64 {
        format!(
            " — BEHIND SCHEDULE: each client waits for its answer, so this engine was offered {paced_achieved:.0} msgs/s, not {rate}; the latencies are at that rate"
        )
    } else {
        String::new()
    };
    println!(
        "  {engine:<11} {services:>3} services | {rate} msgs/s offered for {} s, {} messages: sent at {paced_achieved:.0} msgs/s (start lag p99 {:.1} ms, max {:.1} ms){behind}; {check_summary}; send→delivery p50 {paced_p50:.1} ms, p99 {paced_p99:.1} ms; {:.1} events/transaction",
        load.paced_seconds,
        sent.at.len(),
        percentile(&mut sent.lateness, 0.99),
        max_late.as_secs_f64() * 1e3,
        phase.events_per_transaction(),
    );

    // Catch-up: the service is down while events queue, then comes back and pings.
    receiver.down.store(true, Ordering::Relaxed);
    let sent = send_load(
        &label,
        "catch-up",
        &server,
        &senders,
        load.catch_up_per_sender,
        None,
    )
    .await;
    receiver.down.store(false, Ordering::Relaxed);
    let back = Instant::now();
    let ping = "/_matrix/client/v1/appservice/bench/ping";
    server.ok(reqwest::Method::POST, ping, &as_token, json!({})).await;
    let delivered = receiver.wait_for(&sent.at, timeout).await;
    let (phase, done, check_summary) = close_phase(
        &receiver,
        &label,
        "after catch-up",
        &sent.at,
        delivered,
        FINAL_QUIET,
        timeout,
    )
    .await;
    let catch_up = done.duration_since(back).as_secs_f64();
    let catch_up_rate = sent.at.len() as f64 / catch_up;
    let first_back = sent
        .at
        .keys()
        .filter_map(|id| phase.arrivals.get(id))
        .min()
        .map_or(0.0, |at| at.saturating_duration_since(back).as_secs_f64());
    let peak_rss_kib = server.peak_rss_kib().unwrap_or(0);
    println!(
        "  {engine:<11} {services:>3} services | catch-up of {} queued events ({} attempts refused while down): {catch_up:.2} s from the ping ({catch_up_rate:.0} events/s), first delivery {first_back:.2} s after it; {check_summary}; {:.1} events/transaction; peak RSS {peak_rss_kib} KiB",
        sent.at.len(),
        phase.refused,
        phase.events_per_transaction(),
    );
    Some(Figures {
        sent_rate,
        delivered_rate,
        delivery_p50,
        delivery_p99,
        paced_achieved,
        paced_p50,
        paced_p99,
        catch_up_rate,
        catch_up_first: first_back,
        peak_rss_kib,
    })
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = match std::env::var("BENCH_SERVICES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1, 10, 100],
    };
    let load = Workload::from_env();
    let timeout = Duration::from_secs(env_number("BENCH_DELIVERY_TIMEOUT_SECS", 600) as u64);
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
        .map(|d| match d.trim() {
            "sqlite" | "postgres" => format!("sb-{}", d.trim()),
            other => panic!("BENCH_DATABASES: unknown engine {other:?} (sqlite or postgres)"),
        })
        .collect();
    println!(
        "application-service delivery (loopback; Switchboard on {databases:?}: SQLite with \
         synchronous=FULL, PostgreSQL with its default fsync'd commits)\n  load for every engine: {}; \
         every message must be delivered once, in order, within {timeout:?}",
        load.describe()
    );
    if synapse {
        println!(
            "  Synapse gets the same load, services and rate limits; it differs in: its database \
             (SQLite in WAL mode with the library's default synchronous setting), and its ping \
             does not retry a failed transaction (it resends after its own backoff; see \"first \
             delivery\" in the catch-up lines)"
        );
    }
    for services in sizes {
        let mut figures: Vec<(String, Figures)> = Vec::new();
        for database in &databases {
            let measured = run(database, services, &load, timeout)
                .await
                .expect("switchboard runs");
            figures.push((database.clone(), measured));
        }
        let find = |name: &str| figures.iter().find(|(n, _)| n == name).map(|(_, f)| f);
        if let (Some(sqlite), Some(postgres)) = (find("sb-sqlite"), find("sb-postgres")) {
            println!(
                "  PostgreSQL/SQLite {services:>3} services | delivered {:.2}×, send→delivery p99 at full load {:.2}×, at {} msgs/s {:.2}×, catch-up {:.2}×",
                postgres.delivered_rate / sqlite.delivered_rate,
                postgres.delivery_p99 / sqlite.delivery_p99,
                load.paced_rate,
                postgres.paced_p99 / sqlite.paced_p99,
                postgres.catch_up_rate / sqlite.catch_up_rate,
            );
        }
        if !synapse {
            continue;
        }
        let Some(theirs) = run("synapse", services, &load, timeout).await else {
            println!("  synapse: not installed (target/synapse-venv)");
            continue;
        };
        for (engine, ours) in &figures {
            println!(
                "  Switchboard ({engine})/Synapse {services:>3} services | sent {:.1}×, delivered {:.1}×, send→delivery p50/p99 at full load {:.1}×/{:.1}× lower, at {} msgs/s offered (achieved {:.0} vs {:.0}) {:.1}×/{:.1}× lower, catch-up {:.1}× faster (first delivery after the ping {:.2} s vs {:.2} s), peak RSS {:.2}×",
                ours.sent_rate / theirs.sent_rate,
                ours.delivered_rate / theirs.delivered_rate,
                theirs.delivery_p50 / ours.delivery_p50,
                theirs.delivery_p99 / ours.delivery_p99,
                load.paced_rate,
                ours.paced_achieved,
                theirs.paced_achieved,
                theirs.paced_p50 / ours.paced_p50,
                theirs.paced_p99 / ours.paced_p99,
                ours.catch_up_rate / theirs.catch_up_rate,
                ours.catch_up_first,
                theirs.catch_up_first,
                ours.peak_rss_kib as f64 / theirs.peak_rss_kib.max(1) as f64,
            );
        }
    }
}
