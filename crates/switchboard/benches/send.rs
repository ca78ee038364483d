//! Send latency, throughput and idle memory of the real binary over HTTP on loopback.
//! Run with `cargo bench -p switchboard --bench send`; it prints the figures.

#[path = "../tests/api/harness.rs"]
#[allow(dead_code)] // the benchmark uses a part of the test harness
mod harness;

use std::time::{Duration, Instant};

use harness::Server;
use serde_json::json;

const SEQUENTIAL: usize = 500;
const CONCURRENT_ROOMS: usize = 8;
const PER_ROOM: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let s = Server::start().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = s.rss_kib().unwrap_or(0);

    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        let started = Instant::now();
        let (status, _) = s
            .send_text(&alice, &room, &format!("seq{i}"), "benchmark message")
            .await;
        latencies.push(started.elapsed());
        assert!(status.is_success());
    }
    latencies.sort();

    let mut users = Vec::new();
    for i in 0..CONCURRENT_ROOMS {
        let user = s.register(&format!("user{i}")).await;
        let room = s.create_room(&user, json!({})).await;
        users.push((user, room));
    }
    let started = Instant::now();
    let server = std::sync::Arc::new(s);
    let tasks: Vec<_> = users
        .into_iter()
        .map(|(user, room)| {
            let server = server.clone();
            tokio::spawn(async move {
                for i in 0..PER_ROOM {
                    let (status, _) = server
                        .send_text(&user, &room, &format!("c{i}"), "concurrent")
                        .await;
                    assert!(status.is_success());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("sender");
    }
    let elapsed = started.elapsed();
    let total = CONCURRENT_ROOMS * PER_ROOM;
    let loaded = server.rss_kib().unwrap_or(0);

    println!("switchboard send benchmark (SQLite, synchronous=FULL, loopback HTTP)");
    println!("  idle RSS after start:       {:>8} KiB", idle);
    println!(
        "  sequential send, {SEQUENTIAL} events: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    println!(
        "  concurrent send, {CONCURRENT_ROOMS} rooms x {PER_ROOM}: {:.0} events/s ({total} in {:.2} s)",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "  RSS after {} events:      {:>8} KiB",
        SEQUENTIAL + total,
        loaded
    );
}
