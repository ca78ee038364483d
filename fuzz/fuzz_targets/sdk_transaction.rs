//! The SDK's homeserver → service API (`switchboard-appservice`'s receiver): its axum router,
//! driven with `tower::ServiceExt::oneshot` on a current-thread runtime. The input's first line is
//! the request line (`[METHOD ]path[?query]`, PUT when no method is given), the rest the body; the
//! request carries the right `hs_token`.
//!
//! The handled-transaction record is kept in memory by a store that remembers only the last few
//! IDs (and always knows `seen-before`), so nothing touches the disk and nothing grows.
//!
//! Properties: never a panic, hang or unbounded allocation; a transaction acknowledged with 200
//! handed every one of its events (and its ephemeral and to-device items) to the handler exactly
//! once, unless it was seen before.

#![no_main]

use std::{
    collections::VecDeque,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use libfuzzer_sys::fuzz_target;
use ruma::{events::AnyTimelineEvent, serde::Raw};
use serde_json::Value;
use switchboard_appservice::{
    Appservice, Context, Handler, HandlerResult, registration,
    txns::{self, TxnStore},
};
use tower::ServiceExt;

const REGISTRATION: &str = r"
id: fuzz
url: http://127.0.0.1:1
as_token: fuzz_as_token
hs_token: fuzz_hs_token
sender_localpart: bot
receive_ephemeral: true
namespaces:
  users: [{exclusive: true, regex: '@_f_.*:example\.org'}]
  aliases: [{exclusive: true, regex: '#_f_.*:example\.org'}]
";

static EVENTS: AtomicUsize = AtomicUsize::new(0);
static EPHEMERAL: AtomicUsize = AtomicUsize::new(0);
static TO_DEVICE: AtomicUsize = AtomicUsize::new(0);

/// Counts what it is handed; events are parsed as the default `raw_event` does.
struct Counting;

impl Handler for Counting {
    async fn raw_event(&self, _ctx: Context, event: Value) -> HandlerResult {
        EVENTS.fetch_add(1, Ordering::SeqCst);
        let raw = serde_json::value::to_raw_value(&event)?;
        let _ = Raw::<AnyTimelineEvent>::from_json(raw).deserialize();
        Ok(())
    }

    async fn ephemeral(&self, _ctx: Context, _event: Value) -> HandlerResult {
        EPHEMERAL.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn to_device(&self, _ctx: Context, _message: Value) -> HandlerResult {
        TO_DEVICE.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Remembers the last few transaction IDs only.
#[derive(Default)]
struct Recent(Mutex<VecDeque<String>>);

const SEEN_BEFORE: &str = "seen-before";

impl TxnStore for Recent {
    fn seen(&self, txn_id: &str) -> bool {
        txn_id == SEEN_BEFORE || self.0.lock().is_ok_and(|ids| ids.iter().any(|id| id == txn_id))
    }

    fn record(&self, txn_id: &str) -> Result<(), switchboard_appservice::Error> {
        if let Ok(mut ids) = self.0.lock() {
            ids.push_back(txn_id.to_owned());
            if ids.len() > 8 {
                ids.pop_front();
            }
        }
        Ok(())
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    txns: std::sync::Arc<Recent>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let registration = registration::parse(REGISTRATION, "fuzz.yaml").expect("valid");
    let txns = std::sync::Arc::new(Recent::default());
    let store: std::sync::Arc<dyn txns::TxnStore> = txns.clone();
    let router = Appservice::builder(registration, "http://127.0.0.1:1", "example.org")
        .txn_store(store)
        .build(Counting)
        .expect("build")
        .router();
    Fixture {
        runtime,
        router,
        txns,
    }
});

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let (method, uri) = match head.split_once(' ') {
        Some((method, uri)) => match Method::from_bytes(method.as_bytes()) {
            Ok(method) => (method, uri),
            Err(_) => return,
        },
        None => (Method::PUT, head),
    };
    let Ok(request) = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header("authorization", "Bearer fuzz_hs_token")
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    // Whether the transaction route would find this ID already handled (the path as parsed: no
    // query or fragment; an escaped ID is not decoded here, so it counts as maybe seen).
    let seen = request
        .uri()
        .path()
        .rsplit_once("/transactions/")
        .is_some_and(|(_, id)| fixture.txns.seen(id) || id.contains('%'));
    for counter in [&EVENTS, &EPHEMERAL, &TO_DEVICE] {
        counter.store(0, Ordering::SeqCst);
    }
    let status = fixture.runtime.block_on(async {
        let response = fixture
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("response body");
        status
    });
    if method == Method::PUT && status == StatusCode::OK && !seen {
        let body: Value = serde_json::from_slice(body).expect("acknowledged bodies are JSON");
        let count = |key: &str| {
            let unstable = format!("de.sorunome.msc2409.{key}");
            body.get(key)
                .or_else(|| body.get(unstable.as_str()))
                .filter(|v| !v.is_null())
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        };
        let events = body["events"].as_array().map_or(0, Vec::len);
        assert_eq!(EVENTS.load(Ordering::SeqCst), events, "every event handled once");
        assert_eq!(EPHEMERAL.load(Ordering::SeqCst), count("ephemeral"), "ephemeral");
        assert_eq!(TO_DEVICE.load(Ordering::SeqCst), count("to_device"), "to-device");
    }
});
