//! End-to-end encryption plumbing: keys are stored and served, one-time keys claimed once,
//! to-device messages delivered through /sync exactly until acknowledged.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, User, enc};

fn device_keys(user: &User) -> Value {
    json!({
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{}", user.device_id): "curvekey", format!("ed25519:{}", user.device_id): "edkey" },
        "signatures": {},
    })
}

#[tokio::test]
async fn one_time_keys_are_claimed_once_then_the_fallback_and_uploads_announce_device_changes() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;
    let since = s.sync(&bob, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();

    let upload = json!({
        "device_keys": device_keys(&alice),
        "one_time_keys": { "signed_curve25519:AAA": {"key": "k1"}, "signed_curve25519:AAB": {"key": "k2"} },
        "fallback_keys": { "signed_curve25519:FFF": {"key": "fb", "fallback": true} },
    });
    let counts = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/upload",
            &alice.token,
            upload,
        )
        .await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);

    let queried = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &bob.token,
            json!({"device_keys": {alice.user_id.clone(): []}}),
        )
        .await;
    assert_eq!(
        queried["device_keys"][&alice.user_id][&alice.device_id]["keys"]
            [format!("ed25519:{}", alice.device_id)],
        "edkey"
    );

    let claim =
        json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}});
    let mut seen = Vec::new();
    for _ in 0..3 {
        let claimed = s
            .ok(
                Method::POST,
                "/_matrix/client/v3/keys/claim",
                &bob.token,
                claim.clone(),
            )
            .await;
        let keys = claimed["one_time_keys"][&alice.user_id][&alice.device_id]
            .as_object()
            .expect("a key")
            .clone();
        seen.extend(keys.keys().cloned());
    }
    assert_eq!(
        seen,
        vec![
            "signed_curve25519:AAA",
            "signed_curve25519:AAB",
            "signed_curve25519:FFF"
        ],
        "each once, then the fallback"
    );

    // Bob learns that Alice's devices changed, and Alice sees her key counts in sync.
    let sync = s.sync(&bob, &format!("since={since}&timeout=2000")).await;
    assert!(
        sync["device_lists"]["changed"]
            .as_array()
            .expect("changed")
            .contains(&json!(alice.user_id))
    );
    let alices = s.sync(&alice, "").await;
    assert_eq!(
        alices["device_one_time_keys_count"],
        json!({"signed_curve25519": 0}),
        "all claimed, and said so"
    );
    let changes = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/keys/changes?from={since}&to={}",
                sync["next_batch"].as_str().expect("t")
            ),
            &bob.token,
            Value::Null,
        )
        .await;
    assert!(
        changes["changed"]
            .as_array()
            .expect("changed")
            .contains(&json!(alice.user_id))
    );
}

#[tokio::test]
async fn to_device_messages_until_acknowledged() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let since = s.sync(&bob, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    let message = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"secret": 42}}}});
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/sendToDevice/m.test/t1",
        &alice.token,
        message.clone(),
    )
    .await;
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/sendToDevice/m.test/t1",
        &alice.token,
        message,
    )
    .await;

    let first = s.sync(&bob, &format!("since={since}&timeout=2000")).await;
    let events = first["to_device"]["events"]
        .as_array()
        .expect("to_device")
        .clone();
    assert_eq!(
        events.len(),
        1,
        "a repeated txn is not delivered twice: {events:?}"
    );
    assert_eq!(events[0]["sender"], alice.user_id.as_str());
    assert_eq!(events[0]["type"], "m.test");
    assert_eq!(events[0]["content"]["secret"], 42);

    // Syncing from the old token again re-delivers (not yet acknowledged) …
    let again = s.sync(&bob, &format!("since={since}")).await;
    assert_eq!(again["to_device"]["events"].as_array().expect("events").len(), 1);
    // … and from the new one it is gone.
    let next = first["next_batch"].as_str().expect("t");
    let after = s.sync(&bob, &format!("since={next}&timeout=200")).await;
    assert!(
        after["to_device"]["events"]
            .as_array()
            .expect("events")
            .is_empty()
    );

    let all = json!({"messages": {bob.user_id.clone(): {"*": {"to": "all"}}}});
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/sendToDevice/m.test/t2",
        &alice.token,
        all,
    )
    .await;
    let star = s
        .sync(
            &bob,
            &format!("since={}&timeout=2000", after["next_batch"].as_str().expect("t")),
        )
        .await;
    assert_eq!(star["to_device"]["events"][0]["content"]["to"], "all");
}

#[tokio::test]
async fn replacing_cross_signing_keys_needs_uia_and_others_see_signatures_not_user_signing_keys() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    s.ok(
        Method::POST,
        "/_matrix/client/v3/keys/upload",
        &alice.token,
        json!({"device_keys": device_keys(&alice)}),
    )
    .await;
    let master =
        json!({"user_id": alice.user_id, "usage": ["master"], "keys": {"ed25519:MASTERPUB": "MASTERPUB"}});
    let self_signing =
        json!({"user_id": alice.user_id, "usage": ["self_signing"], "keys": {"ed25519:SSPUB": "SSPUB"}});
    let user_signing =
        json!({"user_id": alice.user_id, "usage": ["user_signing"], "keys": {"ed25519:USPUB": "USPUB"}});
    let upload =
        json!({"master_key": master, "self_signing_key": self_signing, "user_signing_key": user_signing});
    s.ok(
        Method::POST,
        "/_matrix/client/v3/keys/device_signing/upload",
        &alice.token,
        upload.clone(),
    )
    .await;

    // Replacing keys needs the password.
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.token),
            Some(upload),
        )
        .await;
    assert!(
        crate::harness::is_password_challenge(status, &body),
        "{status} {body}"
    );

    let signature = json!({alice.user_id.clone(): {alice.device_id.clone(): {
        "user_id": alice.user_id, "device_id": alice.device_id,
        "signatures": {alice.user_id.clone(): {"ed25519:SSPUB": "sig-of-device"}},
    }}});
    let result = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/signatures/upload",
            &alice.token,
            signature,
        )
        .await;
    assert_eq!(result["failures"], json!({}));

    let query = json!({"device_keys": {alice.user_id.clone(): []}});
    let seen_by_bob = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &bob.token,
            query.clone(),
        )
        .await;
    assert_eq!(
        seen_by_bob["master_keys"][&alice.user_id]["keys"]["ed25519:MASTERPUB"],
        "MASTERPUB"
    );
    assert!(seen_by_bob["self_signing_keys"][&alice.user_id].is_object());
    assert!(
        seen_by_bob
            .get("user_signing_keys")
            .is_none_or(|u| u.get(&alice.user_id).is_none()),
        "not bob's business"
    );
    let device = &seen_by_bob["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(
        device["signatures"][&alice.user_id]["ed25519:SSPUB"],
        "sig-of-device"
    );
    let own = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &alice.token,
            query.clone(),
        )
        .await;
    assert!(own["user_signing_keys"][&alice.user_id].is_object());

    // Bob signs Alice's master key with his user-signing key: only Bob sees that signature.
    let signed_master = json!({alice.user_id.clone(): {"MASTERPUB": {
        "user_id": alice.user_id, "usage": ["master"], "keys": {"ed25519:MASTERPUB": "MASTERPUB"},
        "signatures": {bob.user_id.clone(): {"ed25519:BOBUSK": "bob-trusts-alice"}},
    }}});
    let result = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/signatures/upload",
            &bob.token,
            signed_master,
        )
        .await;
    assert_eq!(result["failures"], json!({}));
    let seen_by_bob = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            &bob.token,
            query.clone(),
        )
        .await;
    assert_eq!(
        seen_by_bob["master_keys"][&alice.user_id]["signatures"][&bob.user_id]["ed25519:BOBUSK"],
        "bob-trusts-alice",
        "{seen_by_bob}"
    );
    let seen_by_alice = s
        .ok(Method::POST, "/_matrix/client/v3/keys/query", &alice.token, query)
        .await;
    assert!(
        seen_by_alice["master_keys"][&alice.user_id]["signatures"]
            .get(&bob.user_id)
            .is_none(),
        "{seen_by_alice}"
    );
}

/// MSC3202: a service that encrypts learns its devices' one-time-key counts and the device-list
/// changes of people it shares rooms with from its transactions, without a `/sync` per user.
#[tokio::test]
async fn encrypting_services_get_key_counts_and_device_lists_in_transactions() {
    use std::time::Duration;

    use crate::fake_as::{FakeAs, Registration, as_user, register_ghost, start_server};
    let service = FakeAs::start().await;
    let registration = Registration::new("crypto", Some(&service.url))
        .users("@_c_.*:localhost", true)
        .extra("org.matrix.msc3202: true\nio.element.msc4190: true\n");
    let plain = Registration::new("plain", Some(&service.url)).users("@_p_.*:localhost", true);
    let (s, _files) = start_server(&[&registration, &plain]).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&s, &token, "_c_ghost").await;
    // The mautrix way (MSC4190): the service creates its ghost's device, then uploads keys as it.
    let device = as_user("/_matrix/client/v3/devices/GHOSTDEV", &ghost);
    s.ok(Method::PUT, &device, &token, json!({})).await;
    let upload = format!(
        "{}&device_id=GHOSTDEV",
        as_user("/_matrix/client/v3/keys/upload", &ghost)
    );
    let keys = json!({
        "one_time_keys": { "signed_curve25519:A": {"key": "a"}, "signed_curve25519:B": {"key": "b"} },
        "fallback_keys": { "signed_curve25519:F": {"key": "f", "fallback": true} },
    });
    s.ok(Method::POST, &upload, &token, keys).await;

    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let join = as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &ghost);
    s.ok(Method::POST, &join, &token, json!({})).await;
    // The plain service has a user in the room too, so it gets transactions to compare with.
    let plain_ghost = register_ghost(&s, &plain.as_token, "_p_ghost").await;
    let plain_join = as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &plain_ghost);
    s.ok(Method::POST, &plain_join, &plain.as_token, json!({})).await;
    let (status, _) = s.send_text(&alice, &room, "1", "hello").await;
    assert_eq!(status, reqwest::StatusCode::OK);

    let wait = Duration::from_secs(20);
    let crypto_txns = |requests: &[crate::fake_as::Request]| -> Vec<Value> {
        requests
            .iter()
            .filter(|r| {
                r.txn_id.is_some()
                    && r.authorization
                        .as_deref()
                        .is_some_and(|a| a.ends_with("hs_crypto"))
            })
            .map(|r| r.json())
            .collect()
    };
    let requests = service
        .wait_for_requests(
            |r| crypto_txns(r).iter().any(|t| t.to_string().contains("\"hello\"")),
            wait,
        )
        .await;
    let txn = crypto_txns(&requests)
        .into_iter()
        .find(|t| t.to_string().contains("\"hello\""))
        .expect("transaction with the message");
    let counts = &txn["org.matrix.msc3202.device_one_time_keys_count"][&ghost]["GHOSTDEV"];
    assert_eq!(counts["signed_curve25519"], 2, "{txn}");
    assert_eq!(
        txn["org.matrix.msc3202.device_one_time_key_counts"],
        txn["org.matrix.msc3202.device_one_time_keys_count"],
        "Synapse's older spelling too"
    );
    assert_eq!(
        txn["org.matrix.msc3202.device_unused_fallback_key_types"][&ghost]["GHOSTDEV"],
        json!(["signed_curve25519"])
    );

    // Alice's new device keys: a device-list change the service must hear about.
    s.ok(
        Method::POST,
        "/_matrix/client/v3/keys/upload",
        &alice.token,
        json!({"device_keys": device_keys(&alice)}),
    )
    .await;
    let changed = |t: &Value| {
        t["org.matrix.msc3202.device_lists"]["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == alice.user_id.as_str()))
    };
    service
        .wait_for_requests(|r| crypto_txns(r).iter().any(changed), wait)
        .await;

    // Alice leaves the only room she shared with the service's users.
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        &alice.token,
        json!({}),
    )
    .await;
    let left = |t: &Value| {
        t["org.matrix.msc3202.device_lists"]["left"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == alice.user_id.as_str()))
    };
    let requests = service
        .wait_for_requests(|r| crypto_txns(r).iter().any(left), wait)
        .await;

    // A service without the flag gets the same events and none of the extensions.
    let plain_txns: Vec<Value> = requests
        .iter()
        .filter(|r| {
            r.txn_id.is_some()
                && r.authorization
                    .as_deref()
                    .is_some_and(|a| a.ends_with("hs_plain"))
        })
        .map(|r| r.json())
        .collect();
    assert!(
        plain_txns.iter().any(|t| t.to_string().contains("\"hello\"")),
        "the plain service got the message: {}",
        service.summary()
    );
    assert!(
        plain_txns.iter().all(|t| !t.to_string().contains("msc3202")),
        "only services that asked get the extensions"
    );
}

/// A service replaces its own users' cross-signing keys without user-interactive auth, but a
/// human whom a non-exclusive namespace merely matches keeps her password as the gate.
#[tokio::test]
async fn services_replace_cross_signing_keys_without_uia_only_for_users_they_own() {
    use crate::fake_as::{Registration, as_user, register_ghost, start_server};
    let registration = Registration::new("crypto", None)
        .users("@_c_.*:localhost", true)
        .users("@alice:localhost", false);
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    let alice = s.register("alice").await;
    let ghost = register_ghost(&s, &token, "_c_ghost").await;
    let upload_for = |user: &str| {
        json!({
            "master_key": {"user_id": user, "usage": ["master"], "keys": {"ed25519:M": "M"}},
            "self_signing_key": {"user_id": user, "usage": ["self_signing"], "keys": {"ed25519:S": "S"}},
        })
    };
    let path = "/_matrix/client/v3/keys/device_signing/upload";
    for attempt in ["first upload", "replacement"] {
        let (status, body) = s
            .call(
                Method::POST,
                &as_user(path, &ghost),
                Some(&token),
                Some(upload_for(&ghost)),
            )
            .await;
        assert_eq!(
            status,
            reqwest::StatusCode::OK,
            "{attempt} for the service's own user: {body}"
        );
    }
    s.ok(Method::POST, path, &alice.token, upload_for(&alice.user_id))
        .await;
    let (status, body) = s
        .call(
            Method::POST,
            &as_user(path, &alice.user_id),
            Some(&token),
            Some(upload_for(&alice.user_id)),
        )
        .await;
    assert!(
        crate::harness::is_password_challenge(status, &body),
        "replacing a human's keys needs her password, whoever asks: {status} {body}"
    );
}
