//! Prometheus metrics in the text exposition format, at `/_synapse/metrics` (where Synapse serves
//! them, so existing scrape configs work) and `/metrics`, on listeners with the `metrics` resource.

use std::{fmt::Write, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use switchboard_core::Homeserver;

pub fn router(hs: Arc<Homeserver>) -> Router {
    Router::new()
        .route("/_synapse/metrics", get(metrics))
        .route("/metrics", get(metrics))
        .with_state(hs)
}

/// `(name, help, type, samples as (labels, value))`.
type Series = (&'static str, &'static str, &'static str, Vec<(String, f64)>);

async fn metrics(State(hs): State<Arc<Homeserver>>) -> Response {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let position = hs.stream.current();
    gauge(
        "switchboard_event_stream_position",
        "Newest announced event stream position.",
        "gauge",
        vec![(String::new(), position as f64)],
    );
    gauge(
        "switchboard_aux_stream_position",
        "Newest auxiliary stream position (account data, receipts, typing, presence, to-device).",
        "gauge",
        vec![(String::new(), hs.stream.current_aux() as f64)],
    );
    if let Some(rss) = resident_bytes() {
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            vec![(String::new(), rss)],
        );
    }

    let mut series: Vec<Series> = vec![
        (
            "switchboard_appservice_up",
            "1 if the service's last transaction succeeded.",
            "gauge",
            vec![],
        ),
        (
            "switchboard_appservice_consecutive_failures",
            "Failed attempts since the last success.",
            "gauge",
            vec![],
        ),
        (
            "switchboard_appservice_sent_transactions_total",
            "Transactions delivered.",
            "counter",
            vec![],
        ),
        (
            "switchboard_appservice_failed_attempts_total",
            "Transaction attempts that failed.",
            "counter",
            vec![],
        ),
        (
            "switchboard_appservice_sent_events_total",
            "Events delivered in transactions.",
            "counter",
            vec![],
        ),
        (
            "switchboard_appservice_undelivered_stream_events",
            "Stream positions not yet considered or acknowledged.",
            "gauge",
            vec![],
        ),
        (
            "switchboard_appservice_oldest_undelivered_age_seconds",
            "Age of the oldest unacknowledged event.",
            "gauge",
            vec![],
        ),
    ];
    for service in hs.appservices.registry().services.clone() {
        let Ok(report) = hs.appservices.report(&service, position).await else {
            continue;
        };
        let label = format!("{{service=\"{}\"}}", service.id().replace(['"', '\\', '\n'], "_"));
        let number = |key: &str| report[key].as_f64().unwrap_or(0.0);
        let values = [
            if report["up"].as_bool().unwrap_or(false) {
                1.0
            } else {
                0.0
            },
            number("consecutive_failures"),
            number("sent_transactions"),
            number("failed_attempts"),
            number("sent_events"),
            number("undelivered_stream_events"),
            report["oldest_undelivered_age_ms"]
                .as_f64()
                .map_or(0.0, |ms| ms / 1000.0),
        ];
        for (entry, value) in series.iter_mut().zip(values) {
            entry.3.push((label.clone(), value));
        }
    }
    for (name, help, kind, samples) in series {
        gauge(name, help, kind, samples);
    }
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Resident set size from `/proc/self/statm` (Linux; pages × 4 KiB).
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}
