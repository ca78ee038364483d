//! What encrypted bridges need from the homeserver: to-device messages in transactions
//! (MSC4203, under MSC2409's key), one-time-key counts when keys are claimed (MSC3202), device
//! management instead of logins (MSC4190), and the Client-Server API under device masquerading.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    fake_as::{FakeAs, Registration, Request, as_user, register_ghost, start_server},
    harness::{Server, User, enc, errcode},
};

const WAIT: Duration = Duration::from_secs(20);
const TO_DEVICE: &str = "de.sorunome.msc2409.to_device";
const COUNTS: &str = "org.matrix.msc3202.device_one_time_keys_count";

/// A service that encrypts the way mautrix bridges do.
fn encrypting(service: &FakeAs) -> Registration {
    Registration::new("crypto", Some(&service.url))
        .users("@_c_.*:localhost", true)
        .extra("receive_ephemeral: true\norg.matrix.msc3202: true\nio.element.msc4190: true\n")
}

/// `path` as `user` on `device` (device masquerading).
fn as_device(path: &str, user: &str, device: &str) -> String {
    format!("{}&device_id={device}", as_user(path, user))
}

/// Creates `device` for a service user (MSC4190).
async fn create_device(s: &Server, token: &str, user: &str, device: &str) {
    s.ok(
        Method::PUT,
        &as_user(&format!("/_matrix/client/v3/devices/{device}"), user),
        token,
        json!({"display_name": "bridge"}),
    )
    .await;
}

async fn send_to_device(s: &Server, from: &User, txn: &str, messages: Value) {
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/sendToDevice/m.test/{txn}"),
        &from.token,
        json!({ "messages": messages }),
    )
    .await;
}

/// Transactions (attempts, whatever the answer) authenticated with this service's `hs_token`.
fn txns_of<'a>(requests: &'a [Request], id: &str) -> Vec<&'a Request> {
    let token = format!("hs_{id}");
    requests
        .iter()
        .filter(|r| r.txn_id.is_some() && r.authorization.as_deref().is_some_and(|a| a.ends_with(&token)))
        .collect()
}

/// The to-device messages of a transaction whose content has `mark`.
fn marked(txn: &Value, mark: &str) -> Vec<Value> {
    txn[TO_DEVICE]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["content"]["mark"] == mark)
        .cloned()
        .collect()
}

/// Waits until the service accepted a transaction carrying a to-device message marked `mark`;
/// returns every request so far.
async fn delivered(service: &FakeAs, mark: &str) -> Vec<Request> {
    service
        .wait_for_requests(
            |r| {
                txns_of(r, "crypto")
                    .iter()
                    .any(|t| t.succeeded() && !marked(&t.json(), mark).is_empty())
            },
            WAIT,
        )
        .await
}

/// To-device messages for a service's users (and its sender) arrive in its transactions with
/// `to_user_id`/`to_device_id`; unknown devices get nothing; a transaction that failed is sent
/// again byte for byte — after `kill -9` too — and each message is delivered once.
#[tokio::test]
async fn to_device_messages_reach_services_once_and_byte_identical_across_failures_and_kill_9() {
    let service = FakeAs::start().await;
    let registration = encrypting(&service);
    let plain = Registration::new("plain", Some(&service.url))
        .users("@_p_.*:localhost", true)
        .extra("io.element.msc4190: true\n");
    let (mut s, _files) = start_server(&[&registration, &plain]).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&s, &token, "_c_ghost").await;
    create_device(&s, &token, &ghost, "GHOSTDEV").await;
    let bot = registration.sender_id();
    create_device(&s, &token, &bot, "BOTDEV").await;
    let plain_ghost = register_ghost(&s, &plain.as_token, "_p_ghost").await;
    create_device(&s, &plain.as_token, &plain_ghost, "PDEV").await;
    let alice = s.register("alice").await;

    send_to_device(
        &s,
        &alice,
        "t1",
        json!({
            ghost.clone(): { "GHOSTDEV": {"mark": "one"}, "NOSUCHDEV": {"mark": "one"} },
            bot.clone(): { "*": {"mark": "one"} },
            plain_ghost.clone(): { "PDEV": {"mark": "one"} },
        }),
    )
    .await;
    let requests = service
        .wait_for_requests(
            |r| {
                txns_of(r, "crypto")
                    .iter()
                    .any(|t| t.succeeded() && marked(&t.json(), "one").len() == 2)
            },
            WAIT,
        )
        .await;
    let txn = txns_of(&requests, "crypto")
        .into_iter()
        .find(|t| t.succeeded() && !marked(&t.json(), "one").is_empty())
        .expect("the transaction")
        .json();
    let mut messages = marked(&txn, "one");
    messages.sort_by_key(|m| m["to_user_id"].as_str().map(str::to_owned));
    assert_eq!(
        messages,
        vec![
            json!({"type": "m.test", "sender": alice.user_id, "content": {"mark": "one"}, "to_user_id": ghost, "to_device_id": "GHOSTDEV"}),
            json!({"type": "m.test", "sender": alice.user_id, "content": {"mark": "one"}, "to_user_id": bot, "to_device_id": "BOTDEV"}),
        ],
        "the service's two devices, not the unknown one nor another service's: {txn}"
    );
    assert!(
        txn["events"].as_array().is_some_and(Vec::is_empty),
        "a transaction may carry to-device messages only"
    );
    assert!(
        txn[COUNTS][&ghost]["GHOSTDEV"].is_object(),
        "the recipients' key counts come along (Synapse's rule): {txn}"
    );

    // The service goes down: the next message is retried with the same bytes, also after a crash.
    service.set_transaction_status(500);
    send_to_device(
        &s,
        &alice,
        "t2",
        json!({ ghost.clone(): { "GHOSTDEV": {"mark": "two"} } }),
    )
    .await;
    service
        .wait_for_requests(
            |r| {
                txns_of(r, "crypto")
                    .iter()
                    .filter(|t| !marked(&t.json(), "two").is_empty())
                    .count()
                    >= 2
            },
            WAIT,
        )
        .await;
    s.crash_and_restart().await;
    service.set_transaction_status(200);
    // A ping tells the server the service is back (retry now, not after the backoff).
    s.ok(
        Method::POST,
        "/_matrix/client/v1/appservice/crypto/ping",
        &token,
        json!({}),
    )
    .await;
    let requests = delivered(&service, "two").await;
    let attempts: Vec<&Request> = txns_of(&requests, "crypto")
        .into_iter()
        .filter(|t| !marked(&t.json(), "two").is_empty())
        .collect();
    assert!(attempts.len() >= 3, "failed twice, then after the restart");
    for attempt in &attempts {
        assert_eq!(attempt.txn_id, attempts[0].txn_id, "one transaction ID");
        assert_eq!(attempt.body, attempts[0].body, "byte-identical retries");
    }

    // Nothing twice: a last message, then every accepted transaction is counted.
    send_to_device(
        &s,
        &alice,
        "t3",
        json!({ ghost.clone(): { "GHOSTDEV": {"mark": "three"} } }),
    )
    .await;
    let requests = delivered(&service, "three").await;
    let accepted: Vec<Value> = txns_of(&requests, "crypto")
        .into_iter()
        .filter(|t| t.succeeded())
        .map(Request::json)
        .collect();
    for (mark, times) in [("one", 2), ("two", 1), ("three", 1)] {
        let seen: usize = accepted.iter().map(|t| marked(t, mark).len()).sum();
        assert_eq!(seen, times, "{mark}: delivered once per device");
    }
    assert!(
        txns_of(&requests, "plain")
            .iter()
            .all(|t| t.json().get(TO_DEVICE).is_none()),
        "a service without receive_ephemeral gets no to-device messages"
    );
}

/// A claim that takes one-time keys of a service's device sends the new counts at once, with no
/// room traffic at all; a device with none left has an empty map (Synapse's shape).
#[tokio::test]
async fn claims_send_key_counts_without_other_traffic() {
    let service = FakeAs::start().await;
    let registration = encrypting(&service);
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&s, &token, "_c_ghost").await;
    create_device(&s, &token, &ghost, "GHOSTDEV").await;
    let upload = as_device("/_matrix/client/v3/keys/upload", &ghost, "GHOSTDEV");
    let keys = json!({"one_time_keys": {
        "signed_curve25519:A": {"key": "a"},
        "signed_curve25519:B": {"key": "b"},
    }});
    let counts = s.ok(Method::POST, &upload, &token, keys).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);
    let alice = s.register("alice").await;
    let counts_of = |requests: &[Request]| -> Vec<Value> {
        txns_of(requests, "crypto")
            .into_iter()
            .map(|t| t.json()[COUNTS][&ghost]["GHOSTDEV"].clone())
            .filter(|c| !c.is_null())
            .collect()
    };
    let claim = json!({"one_time_keys": { ghost.clone(): { "GHOSTDEV": "signed_curve25519" } }});
    for left in [json!({"signed_curve25519": 1}), json!({})] {
        let claimed = s
            .ok(
                Method::POST,
                "/_matrix/client/v3/keys/claim",
                &alice.token,
                claim.clone(),
            )
            .await;
        assert!(
            claimed["one_time_keys"][&ghost]["GHOSTDEV"].is_object(),
            "{claimed}"
        );
        let started = std::time::Instant::now();
        let requests = service
            .wait_for_requests(|r| counts_of(r).last() == Some(&left), WAIT)
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "counts within seconds of the claim"
        );
        let last = txns_of(&requests, "crypto").last().expect("a transaction").json();
        assert!(
            last["events"].as_array().is_some_and(Vec::is_empty),
            "counts alone: {last}"
        );
    }
}

/// MSC4190: a service that manages its devices gets `M_APPSERVICE_LOGIN_UNSUPPORTED` for
/// logins and for registrations that would log in; others log in as before.
#[tokio::test]
async fn services_managing_devices_cannot_log_in() {
    let service = FakeAs::start().await;
    let registration = encrypting(&service);
    let old = Registration::new("old", Some(&service.url)).users("@_o_.*:localhost", true);
    let (s, _files) = start_server(&[&registration, &old]).await;
    let ghost = register_ghost(&s, &registration.as_token, "_c_ghost").await;
    let login = |user: &str| json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": user}});
    let register = json!({"type": "m.login.application_service", "username": "_c_other"});
    for (path, request) in [("login", login(&ghost)), ("register", register)] {
        let (status, body) = s
            .call(
                Method::POST,
                &format!("/_matrix/client/v3/{path}"),
                Some(&registration.as_token),
                Some(request),
            )
            .await;
        assert_eq!(
            (status, errcode(&body)),
            (StatusCode::BAD_REQUEST, "M_APPSERVICE_LOGIN_UNSUPPORTED"),
            "{path}: {body}"
        );
    }
    let (status, _) = s
        .call(
            Method::GET,
            &as_user("/_matrix/client/v3/account/whoami", "@_c_other:localhost"),
            Some(&registration.as_token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the refused registration created nobody"
    );

    let old_ghost = register_ghost(&s, &old.as_token, "_o_ghost").await;
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(&old.as_token),
            Some(login(&old_ghost)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "without MSC4190 the login works: {body}");
    assert!(body["access_token"].is_string());
}

/// A bridge's bot in sync mode: a masqueraded `/sync` for its device, and the keys endpoints
/// for that device — keys come back exactly as uploaded, so their signatures verify.
#[tokio::test]
async fn the_bot_syncs_and_manages_keys_as_its_device() {
    let service = FakeAs::start().await;
    let registration = encrypting(&service);
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    let bot = registration.sender_id();
    create_device(&s, &token, &bot, "BOTDEV").await;
    let alice = s.register("alice").await;

    let device_keys = json!({
        "user_id": bot, "device_id": "BOTDEV",
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {"curve25519:BOTDEV": "c25519", "ed25519:BOTDEV": "ed"},
        "signatures": {bot.clone(): {"ed25519:BOTDEV": "sig"}},
        "org.example.extra": {"kept": [1, 2.5, "three"]},
    });
    let upload = as_device("/_matrix/client/v3/keys/upload", &bot, "BOTDEV");
    s.ok(
        Method::POST,
        &upload,
        &token,
        json!({"device_keys": device_keys, "one_time_keys": {"signed_curve25519:K1": {"key": "k1"}}}),
    )
    .await;
    let master = json!({"user_id": bot, "usage": ["master"], "keys": {"ed25519:MASTER": "MASTER"}});
    let self_signing = json!({
        "user_id": bot, "usage": ["self_signing"], "keys": {"ed25519:SELF": "SELF"},
        "signatures": {bot.clone(): {"ed25519:MASTER": "msig"}},
    });
    s.ok(
        Method::POST,
        &as_device("/_matrix/client/v3/keys/device_signing/upload", &bot, "BOTDEV"),
        &token,
        json!({"master_key": master, "self_signing_key": self_signing}),
    )
    .await;

    let query = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &alice.token,
            json!({"device_keys": { bot.clone(): [] }}),
        )
        .await;
    assert_eq!(query["device_keys"][&bot]["BOTDEV"], device_keys, "{query}");
    assert_eq!(query["master_keys"][&bot]["keys"], master["keys"], "{query}");
    assert_eq!(query["self_signing_keys"][&bot], self_signing, "{query}");
    let claimed = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/claim",
            &alice.token,
            json!({"one_time_keys": { bot.clone(): { "BOTDEV": "signed_curve25519" } }}),
        )
        .await;
    assert_eq!(
        claimed["one_time_keys"][&bot]["BOTDEV"],
        json!({"signed_curve25519:K1": {"key": "k1"}})
    );

    // Sync mode: the bot's device reads its to-device messages and rooms with /sync.
    let sync = as_device("/_matrix/client/v3/sync?timeout=0", &bot, "BOTDEV");
    let first = s.ok(Method::GET, &sync, &token, Value::Null).await;
    let since = first["next_batch"].as_str().expect("next_batch").to_owned();
    assert_eq!(
        first["device_one_time_keys_count"]["signed_curve25519"], 0,
        "the masqueraded device's counts: {first}"
    );
    let room = s.create_room(&alice, json!({"invite": [bot]})).await;
    send_to_device(
        &s,
        &alice,
        "t1",
        json!({ bot.clone(): { "BOTDEV": {"mark": "sync"} } }),
    )
    .await;
    let next = s
        .ok(Method::GET, &format!("{sync}&since={since}"), &token, Value::Null)
        .await;
    assert_eq!(
        next["to_device"]["events"][0]["content"]["mark"], "sync",
        "{next}"
    );
    assert!(next["rooms"]["invite"].get(&room).is_some(), "{next}");
    s.ok(
        Method::POST,
        &as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &bot),
        &token,
        json!({}),
    )
    .await;
}

/// Bad input: keys for another user's device, one-time keys beyond the limit, and to-device
/// messages for devices that do not exist.
#[tokio::test]
async fn bad_key_uploads_and_to_device_targets_get_the_spec_errors() {
    let service = FakeAs::start().await;
    let registration = encrypting(&service);
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&s, &token, "_c_ghost").await;
    create_device(&s, &token, &ghost, "GHOSTDEV").await;
    let alice = s.register("alice").await;

    // Keys naming alice's device, uploaded as the ghost's, and the ghost masquerading a device
    // that is alice's.
    let upload = as_device("/_matrix/client/v3/keys/upload", &ghost, "GHOSTDEV");
    let foreign = json!({"device_keys": {
        "user_id": alice.user_id, "device_id": alice.device_id,
        "algorithms": [], "keys": {}, "signatures": {},
    }});
    let (status, body) = s.call(Method::POST, &upload, Some(&token), Some(foreign)).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    let (status, body) = s
        .call(
            Method::POST,
            &as_device("/_matrix/client/v3/keys/upload", &ghost, &alice.device_id),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNKNOWN_DEVICE"),
        "{body}"
    );

    // 500 one-time keys per algorithm and device: an upload beyond it stores nothing.
    let batch = |from: usize, n: usize| -> Value {
        let keys: serde_json::Map<String, Value> = (from..from + n)
            .map(|i| (format!("signed_curve25519:K{i}"), json!({"key": format!("k{i}")})))
            .collect();
        json!({ "one_time_keys": keys })
    };
    let counts = s.ok(Method::POST, &upload, &token, batch(0, 450)).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 450);
    let (status, body) = s
        .call(Method::POST, &upload, Some(&token), Some(batch(450, 51)))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
        "{body}"
    );
    let counts = s.ok(Method::POST, &upload, &token, json!({})).await;
    assert_eq!(
        counts["one_time_key_counts"]["signed_curve25519"], 450,
        "nothing of it kept"
    );
    let counts = s.ok(Method::POST, &upload, &token, batch(450, 50)).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 500);
    // Repeating an upload (its answer was lost) at the limit adds nothing and is not refused.
    let counts = s.ok(Method::POST, &upload, &token, batch(450, 50)).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 500);

    // To-device messages for unknown devices and users are dropped; a malformed body is refused.
    send_to_device(
        &s,
        &alice,
        "t1",
        json!({
            ghost.clone(): { "NOSUCHDEV": {"mark": "lost"} },
            "@nobody:localhost": { "*": {"mark": "lost"} },
        }),
    )
    .await;
    let (status, body) = s
        .call(
            Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.test/t2",
            Some(&alice.token),
            Some(json!({"messages": ["not", "a", "map"]})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    send_to_device(
        &s,
        &alice,
        "t3",
        json!({ ghost.clone(): { "GHOSTDEV": {"mark": "kept"} } }),
    )
    .await;
    let requests = delivered(&service, "kept").await;
    assert!(
        txns_of(&requests, "crypto")
            .iter()
            .all(|t| marked(&t.json(), "lost").is_empty()),
        "nothing for devices that do not exist"
    );
}
