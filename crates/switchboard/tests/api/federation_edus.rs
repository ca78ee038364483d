//! What crosses servers outside room events (EDUs and the device/key API): typing, receipts,
//! presence, device lists and keys, to-device messages — with Synapse and between Switchboards.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use switchboard_core::keys::SigningKey;

use crate::{
    federation::{fed_request, join_alias, two_in_a_room, wait_for_message},
    harness::{User, enc},
    peers::{Peer, log_of, skip_without},
};

/// Syncs `user` on `on` (initial, then incremental) until `found` picks something out of a
/// response; panics after `seconds` with both servers' logs.
async fn sync_until<T>(
    on: &Peer,
    user: &User,
    other: &Peer,
    what: &str,
    seconds: u64,
    found: impl Fn(&Value) -> Option<T>,
) -> T {
    sync_from_until(on, user, other, what, seconds, None, found).await
}

/// [`sync_until`] from the sync token `since` (`None`: an initial sync first).
async fn sync_from_until<T>(
    on: &Peer,
    user: &User,
    other: &Peer,
    what: &str,
    seconds: u64,
    mut since: Option<String>,
    found: impl Fn(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let query = match &since {
            Some(token) => format!("timeout=1000&since={}", enc(token)),
            None => "timeout=0".to_owned(),
        };
        let body = on.server.sync(user, &query).await;
        if let Some(value) = found(&body) {
            return value;
        }
        since = body["next_batch"].as_str().map(str::to_owned);
        assert!(
            Instant::now() < deadline,
            "{what} never reached {} within {seconds} s\n--- {} log:\n{}\n--- {} log:\n{}",
            on.name,
            on.name,
            log_of(on),
            other.name,
            log_of(other)
        );
    }
}

async fn next_batch(on: &Peer, user: &User) -> String {
    on.server.sync(user, "timeout=0").await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

/// The room's ephemeral events of type `kind` in a sync response.
fn ephemeral<'a>(sync: &'a Value, room: &str, kind: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == kind)
        .collect()
}

fn typing_users(sync: &Value, room: &str) -> Option<Vec<String>> {
    ephemeral(sync, room, "m.typing").last().map(|e| {
        e["content"]["user_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect()
    })
}

/// The event `user`'s public read receipt points at, if this response carries it.
fn read_receipt(sync: &Value, room: &str, user: &str) -> Option<String> {
    ephemeral(sync, room, "m.receipt").into_iter().find_map(|e| {
        e["content"].as_object().and_then(|by_event| {
            by_event
                .iter()
                .find(|(_, kinds)| kinds["m.read"][user].is_object())
                .map(|(event, _)| event.clone())
        })
    })
}

fn presence_of(sync: &Value, user: &str) -> Option<Value> {
    sync["presence"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["sender"] == user)
        .map(|e| e["content"].clone())
}

async fn send_id(on: &Peer, user: &User, room: &str, txn: &str, text: &str) -> String {
    let (status, body) = on.server.send_text(user, room, txn, text).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().expect("event_id").to_owned()
}

async fn put(on: &Peer, user: &User, path: &str, body: Value) -> Value {
    on.server.ok(Method::PUT, path, &user.token, body).await
}

async fn post(on: &Peer, user: &User, path: &str, body: Value) -> Value {
    on.server.ok(Method::POST, path, &user.token, body).await
}

/// Sam on Synapse and Alice on Switchboard in Sam's room.
async fn with_synapse() -> Option<(Peer, Peer, User, User, String)> {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return None;
    };
    let ours = Peer::switchboard("").await;
    let sam = synapse.server.register("sam").await;
    let room = synapse
        .server
        .create_room(
            &sam,
            json!({"room_alias_name": "lounge", "preset": "public_chat"}),
        )
        .await;
    let alice = ours.server.register("alice").await;
    join_alias(&ours, &alice, &format!("#lounge:{}", synapse.name), &synapse).await;
    // Both sides know the join before anything ephemeral is said.
    send_id(&ours, &alice, &room, "hello", "alice is here").await;
    wait_for_message(&synapse, &sam, &room, "alice is here", &ours).await;
    Some((synapse, ours, sam, alice, room))
}

#[tokio::test]
async fn typing_receipts_and_presence_cross_both_ways_with_synapse() {
    let Some((synapse, ours, sam, alice, room)) = with_synapse().await else {
        return;
    };
    let typing = |user: &User| {
        format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&user.user_id)
        )
    };

    // Typing, ours → Synapse and back.
    put(
        &ours,
        &alice,
        &typing(&alice),
        json!({"typing": true, "timeout": 20000}),
    )
    .await;
    let seen = sync_until(&synapse, &sam, &ours, "Alice typing", 30, |s| {
        typing_users(s, &room).filter(|u| u.contains(&alice.user_id))
    })
    .await;
    assert_eq!(seen, vec![alice.user_id.clone()]);
    put(
        &synapse,
        &sam,
        &typing(&sam),
        json!({"typing": true, "timeout": 20000}),
    )
    .await;
    sync_until(&ours, &alice, &synapse, "Sam typing", 30, |s| {
        typing_users(s, &room).filter(|u| u.contains(&sam.user_id))
    })
    .await;
    put(&ours, &alice, &typing(&alice), json!({"typing": false})).await;
    sync_until(&synapse, &sam, &ours, "Alice stopping", 30, |s| {
        typing_users(s, &room).filter(|u| !u.contains(&alice.user_id))
    })
    .await;

    // Receipts: a private one never leaves the server, the public one after it arrives.
    let first = send_id(&synapse, &sam, &room, "s1", "read me privately").await;
    let second = send_id(&synapse, &sam, &room, "s2", "read me publicly").await;
    wait_for_message(&ours, &alice, &room, "read me publicly", &synapse).await;
    let receipt = |kind: &str, event: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/receipt/{kind}/{}",
            enc(&room),
            enc(event)
        )
    };
    post(&ours, &alice, &receipt("m.read.private", &first), json!({})).await;
    post(&ours, &alice, &receipt("m.read", &second), json!({})).await;
    let read = sync_until(&synapse, &sam, &ours, "Alice's receipt", 30, |s| {
        read_receipt(s, &room, &alice.user_id)
    })
    .await;
    assert_eq!(read, second, "only the public receipt, never the private one");
    let mine = send_id(&ours, &alice, &room, "a2", "read me, Sam").await;
    wait_for_message(&synapse, &sam, &room, "read me, Sam", &ours).await;
    post(&synapse, &sam, &receipt("m.read", &mine), json!({})).await;
    let read = sync_until(&ours, &alice, &synapse, "Sam's receipt", 30, |s| {
        read_receipt(s, &room, &sam.user_id)
    })
    .await;
    assert_eq!(read, mine);

    // Presence, to the servers sharing a room.
    let presence = |user: &User| format!("/_matrix/client/v3/presence/{}/status", enc(&user.user_id));
    put(
        &ours,
        &alice,
        &presence(&alice),
        json!({"presence": "online", "status_msg": "bridging"}),
    )
    .await;
    let seen = sync_until(&synapse, &sam, &ours, "Alice's presence", 30, |s| {
        presence_of(s, &alice.user_id).filter(|p| p["status_msg"] == "bridging")
    })
    .await;
    assert_eq!(seen["presence"], "online", "{seen}");
    put(
        &synapse,
        &sam,
        &presence(&sam),
        json!({"presence": "unavailable", "status_msg": "lunch"}),
    )
    .await;
    let seen = sync_until(&ours, &alice, &synapse, "Sam's presence", 30, |s| {
        presence_of(s, &sam.user_id).filter(|p| p["status_msg"] == "lunch")
    })
    .await;
    assert_eq!(seen["presence"], "unavailable", "{seen}");
    let (status, body) = ours
        .server
        .call(Method::GET, &presence(&sam), Some(&alice.token), None)
        .await;
    assert_eq!(
        (status, &body["status_msg"]),
        (StatusCode::OK, &json!("lunch")),
        "{body}"
    );
}

/// Device keys as a client uploads them (the servers check their shape, not their signatures).
fn device_keys(user: &User, device: &str, seed: &str) -> Value {
    json!({
        "user_id": user.user_id,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): format!("{seed}curve"),
            format!("ed25519:{device}"): format!("{seed}ed"),
        },
        "signatures": { user.user_id.as_str(): { format!("ed25519:{device}"): format!("{seed}sig") } },
    })
}

/// Device keys without their `unsigned` part (servers add display names there).
fn without_unsigned(keys: &Value) -> Value {
    let mut keys = keys.clone();
    if let Some(keys) = keys.as_object_mut() {
        keys.remove("unsigned");
    }
    keys
}

async fn upload_keys(on: &Peer, user: &User, device: &str, seed: &str, one_time: usize) -> Value {
    let one_time_keys: serde_json::Map<String, Value> = (0..one_time)
        .map(|i| {
            (
                format!("signed_curve25519:{seed}{i}"),
                json!({"key": format!("{seed}otk{i}"), "signatures": {user.user_id.as_str(): {format!("ed25519:{device}"): "x"}}}),
            )
        })
        .collect();
    post(
        on,
        user,
        "/_matrix/client/v3/keys/upload",
        json!({"device_keys": device_keys(user, device, seed), "one_time_keys": one_time_keys}),
    )
    .await
}

async fn query_keys(on: &Peer, user: &User, of: &User) -> Value {
    post(
        on,
        user,
        "/_matrix/client/v3/keys/query",
        json!({"device_keys": {of.user_id.as_str(): []}}),
    )
    .await
}

/// A signing key of `user`'s as cross-signing uses them: its key ID names its public key.
fn cross_signing_key(user: &User, usage: &str) -> (ruma::signatures::Ed25519KeyPair, Value) {
    use ruma::serde::Base64;
    let document = ruma::signatures::Ed25519KeyPair::generate();
    let draft = ruma::signatures::Ed25519KeyPair::from_der(&document, "x".to_owned()).expect("key");
    let public = Base64::<ruma::serde::base64::Standard>::new(draft.public_key().to_vec()).encode();
    let pair = ruma::signatures::Ed25519KeyPair::from_der(&document, public.clone()).expect("key");
    let key = json!({
        "user_id": user.user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
    });
    (pair, key)
}

/// Uploads a master key and a self-signing key it signed (Synapse checks that signature).
async fn upload_cross_signing(on: &Peer, user: &User) -> Value {
    let (master_pair, master) = cross_signing_key(user, "master");
    let (_, self_signing) = cross_signing_key(user, "self_signing");
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(self_signing).expect("canonical");
    ruma::signatures::sign_json(&user.user_id, &master_pair, &mut object).expect("sign");
    let self_signing = serde_json::to_value(object).expect("json");
    let (status, body) = on
        .server
        .call(
            Method::POST,
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&user.token),
            Some(json!({"master_key": master, "self_signing_key": self_signing})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    master
}

/// Queries `owner`'s keys as `viewer` until `device` is among them (a server may announce a
/// change before it has fetched the list that shows it).
async fn query_until_device(on: &Peer, viewer: &User, other: &Peer, owner: &User, device: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = query_keys(on, viewer, owner).await;
        if keys["device_keys"][&owner.user_id][device].is_object() {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "{device} of {} never showed on {}: {keys}\n{}",
            owner.user_id,
            on.name,
            log_of(other)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Logs `user` in again on `on`: a second device.
async fn second_device(on: &Peer, user: &User) -> User {
    let localpart = user.user_id[1..].split(':').next().expect("localpart");
    let (status, body) = on
        .server
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": "password"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    User {
        user_id: user.user_id.clone(),
        token: body["access_token"].as_str().expect("token").to_owned(),
        device_id: body["device_id"].as_str().expect("device").to_owned(),
    }
}

fn to_device_from(sync: &Value, sender: &str, kind: &str) -> Vec<Value> {
    sync["to_device"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["sender"] == sender && e["type"] == kind)
        .map(|e| e["content"].clone())
        .collect()
}

/// Syncs until `count` to-device messages of `kind` from `sender` arrived (over any number of
/// responses), then once more to catch a duplicate; returns their contents.
async fn to_device_until(
    on: &Peer,
    user: &User,
    other: &Peer,
    sender: &str,
    kind: &str,
    count: usize,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut since = on.server.sync(user, "timeout=0").await;
    got.extend(to_device_from(&since, sender, kind));
    let mut extra_round = false;
    loop {
        let token = since["next_batch"].as_str().expect("next_batch").to_owned();
        since = on
            .server
            .sync(user, &format!("timeout=1000&since={}", enc(&token)))
            .await;
        got.extend(to_device_from(&since, sender, kind));
        if extra_round {
            return got;
        }
        extra_round = got.len() >= count;
        assert!(
            Instant::now() < deadline,
            "{count} {kind} from {sender} never reached {} (got {got:?})\n--- {} log:\n{}\n--- {} log:\n{}",
            on.name,
            on.name,
            log_of(on),
            other.name,
            log_of(other)
        );
    }
}

fn changed_includes(sync: &Value, user: &str) -> bool {
    sync["device_lists"]["changed"]
        .as_array()
        .is_some_and(|c| c.iter().any(|u| u == user))
}

/// Both directions between `a` (Alice's server) and `b` (Bob's): keys queried and claimed across
/// servers, to-device messages, a new device seen by the other side.
async fn keys_and_to_device_cross(a: &Peer, b: &Peer, alice: &User, bob: &User) {
    upload_keys(a, alice, &alice.device_id, "alice", 2).await;
    upload_keys(b, bob, &bob.device_id, "bob", 2).await;

    // Each side queries the other's keys: byte-for-byte what was uploaded.
    let theirs = query_keys(b, bob, alice).await;
    assert_eq!(
        without_unsigned(&theirs["device_keys"][&alice.user_id][&alice.device_id]),
        device_keys(alice, &alice.device_id, "alice"),
        "{theirs}\n{}\n{}",
        log_of(a),
        log_of(b)
    );
    let ours = query_keys(a, alice, bob).await;
    assert_eq!(
        without_unsigned(&ours["device_keys"][&bob.user_id][&bob.device_id]),
        device_keys(bob, &bob.device_id, "bob"),
        "{ours}"
    );

    // One-time keys claimed across: each key once.
    let claim = |of: &User| json!({"one_time_keys": {of.user_id.as_str(): {of.device_id.as_str(): "signed_curve25519"}}});
    let claimed = post(b, bob, "/_matrix/client/v3/keys/claim", claim(alice)).await;
    let keys = claimed["one_time_keys"][&alice.user_id][&alice.device_id]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(keys.len(), 1, "{claimed}");
    assert!(
        keys.keys().all(|k| k.starts_with("signed_curve25519:alice")),
        "{claimed}"
    );
    let counts = post(a, alice, "/_matrix/client/v3/keys/upload", json!({})).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 1, "{counts}");
    let claimed = post(a, alice, "/_matrix/client/v3/keys/claim", claim(bob)).await;
    assert_eq!(
        claimed["one_time_keys"][&bob.user_id][&bob.device_id]
            .as_object()
            .map(|k| k.len()),
        Some(1),
        "{claimed}"
    );

    // To-device messages, to one device and to all of them.
    let to_device =
        |to: &User, device: &str, n: u32| json!({"messages": {to.user_id.as_str(): {device: {"n": n}}}});
    put(
        a,
        alice,
        "/_matrix/client/v3/sendToDevice/org.example.ping/t1",
        to_device(bob, &bob.device_id, 1),
    )
    .await;
    // The same transaction again is the same message: it arrives once.
    put(
        a,
        alice,
        "/_matrix/client/v3/sendToDevice/org.example.ping/t1",
        to_device(bob, &bob.device_id, 1),
    )
    .await;
    put(
        a,
        alice,
        "/_matrix/client/v3/sendToDevice/org.example.ping/t2",
        to_device(bob, "*", 2),
    )
    .await;
    let got = to_device_until(b, bob, a, &alice.user_id, "org.example.ping", 2).await;
    assert_eq!(got, vec![json!({"n": 1}), json!({"n": 2})]);
    put(
        b,
        bob,
        "/_matrix/client/v3/sendToDevice/org.example.pong/t1",
        to_device(alice, &alice.device_id, 3),
    )
    .await;
    let got = to_device_until(a, alice, b, &bob.user_id, "org.example.pong", 1).await;
    assert_eq!(got, vec![json!({"n": 3})]);

    // Cross-signing keys: a new master key reaches the other side (`m.signing_key_update`).
    for (here, there, owner, viewer) in [(a, b, alice, bob), (b, a, bob, alice)] {
        let since = next_batch(there, viewer).await;
        let master = upload_cross_signing(here, owner).await;
        sync_from_until(there, viewer, here, "the new master key", 30, Some(since), |s| {
            changed_includes(s, &owner.user_id).then_some(())
        })
        .await;
        let seen = query_keys(there, viewer, owner).await;
        let mut key = seen["master_keys"][&owner.user_id].clone();
        if let Some(key) = key.as_object_mut() {
            key.remove("signatures");
        }
        assert_eq!(key, master, "{seen}");
    }

    // A new device of either is seen by the other side (`device_lists.changed`, then its keys).
    let since = next_batch(b, bob).await;
    let alice2 = second_device(a, alice).await;
    upload_keys(a, &alice2, &alice2.device_id, "alice2", 1).await;
    sync_from_until(b, bob, a, "Alice's new device", 30, Some(since), |s| {
        changed_includes(s, &alice.user_id).then_some(())
    })
    .await;
    let theirs = query_until_device(b, bob, a, alice, &alice2.device_id).await;
    assert_eq!(
        without_unsigned(&theirs["device_keys"][&alice.user_id][&alice2.device_id]),
        device_keys(alice, &alice2.device_id, "alice2"),
        "{theirs}"
    );
    let since = next_batch(a, alice).await;
    let bob2 = second_device(b, bob).await;
    upload_keys(b, &bob2, &bob2.device_id, "bob2", 1).await;
    sync_from_until(a, alice, b, "Bob's new device", 30, Some(since), |s| {
        changed_includes(s, &bob.user_id).then_some(())
    })
    .await;
    let ours = query_until_device(a, alice, b, bob, &bob2.device_id).await;
    let devices = ours["device_keys"][&bob.user_id]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(devices.len(), 2, "{ours}");
    assert_eq!(
        without_unsigned(&devices[&bob2.device_id]),
        device_keys(bob, &bob2.device_id, "bob2")
    );

    // A device logged out is gone on the other side too.
    let (status, body) = a
        .server
        .call(
            Method::POST,
            "/_matrix/client/v3/logout",
            Some(&alice2.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let theirs = query_keys(b, bob, alice).await;
        if !theirs["device_keys"][&alice.user_id][&alice2.device_id].is_object() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still has Alice's logged-out device: {theirs}",
            b.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn keys_devices_and_to_device_messages_cross_both_ways_with_synapse() {
    let Some((synapse, ours, sam, alice, _room)) = with_synapse().await else {
        return;
    };
    keys_and_to_device_cross(&ours, &synapse, &alice, &sam).await;
}

#[tokio::test]
async fn keys_devices_and_to_device_messages_cross_between_switchboards() {
    let (a, b, alice, bob, _room) = two_in_a_room().await;
    keys_and_to_device_cross(&a, &b, &alice, &bob).await;
}

#[tokio::test]
async fn device_updates_and_to_device_messages_sent_while_the_peer_is_down_arrive_afterwards() {
    let (a, mut b, alice, bob, _room) = two_in_a_room().await;
    upload_keys(&a, &alice, &alice.device_id, "alice", 1).await;
    // Bob's server keeps Alice's list from here on (fetched on Bob's query or on the update
    // Alice's upload sent, whichever came first; the other finds it current).
    query_keys(&b, &bob, &alice).await;
    // The sync token to watch from: after the fetches of that list have been announced (a
    // long-poll that comes back without Alice in `changed`).
    let mut since = next_batch(&b, &bob).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sync = b
            .server
            .sync(&bob, &format!("timeout=1000&since={}", enc(&since)))
            .await;
        since = sync["next_batch"].as_str().expect("next_batch").to_owned();
        if !changed_includes(&sync, &alice.user_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Alice's device list never settled on {}",
            b.name
        );
    }
    b.server.terminate();
    put(
        &a,
        &alice,
        "/_matrix/client/v3/sendToDevice/org.example.ping/down",
        json!({"messages": {bob.user_id.as_str(): {bob.device_id.as_str(): {"while": "down"}}}}),
    )
    .await;
    let alice2 = second_device(&a, &alice).await;
    upload_keys(&a, &alice2, &alice2.device_id, "alice2", 1).await;
    // Let the queue fail and back off before the peer returns.
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut since, mut got, mut changed) = (since, Vec::new(), false);
    while got.is_empty() || !changed {
        let sync = b
            .server
            .sync(&bob, &format!("timeout=1000&since={}", enc(&since)))
            .await;
        got.extend(to_device_from(&sync, &alice.user_id, "org.example.ping"));
        changed |= changed_includes(&sync, &alice.user_id);
        since = sync["next_batch"].as_str().expect("next_batch").to_owned();
        assert!(
            Instant::now() < deadline,
            "after the outage: to-device {got:?}, changed {changed}\n{}",
            log_of(&a)
        );
    }
    assert_eq!(got, vec![json!({"while": "down"})]);
    let theirs = query_until_device(&b, &bob, &a, &alice, &alice2.device_id).await;
    assert_eq!(
        without_unsigned(&theirs["device_keys"][&alice.user_id][&alice2.device_id]),
        device_keys(&alice, &alice2.device_id, "alice2"),
        "{theirs}"
    );
}

#[tokio::test]
async fn bad_edus_are_dropped_and_a_broken_device_list_chain_is_fetched_again() {
    let (a, b, alice, bob, room) = two_in_a_room().await;
    let b_key = SigningKey::load(&b.server.dir.path().join("signing.key")).expect("b's key");
    upload_keys(&b, &bob, &bob.device_id, "bob", 1).await;
    // Alice's server keeps Bob's list.
    let kept = query_keys(&a, &alice, &bob).await;
    assert!(
        kept["device_keys"][&bob.user_id][&bob.device_id].is_object(),
        "{kept}"
    );
    let send = |edus: Value, txn: &str| {
        let body = json!({"origin": b.name, "origin_server_ts": 1, "pdus": [], "edus": edus});
        let path = format!("/_matrix/federation/v1/send/{txn}");
        let (a, b_key, b_name) = (&a, &b_key, b.name.clone());
        async move { fed_request(a, b_key, &b_name, "PUT", &path, Some(&body)).await }
    };
    let stranger = format!("@mallory:{}", a.name);
    let (status, body) = send(
        json!([
            // Typing and presence for a user of another server than the origin.
            {"edu_type": "m.typing", "content": {"room_id": room, "user_id": stranger, "typing": true}},
            {"edu_type": "m.presence", "content": {"push": [{"user_id": alice.user_id, "presence": "offline"}]}},
            // To-device for users who do not exist, and without a message ID.
            {"edu_type": "m.direct_to_device", "content": {"sender": bob.user_id, "type": "m.x", "message_id": "m1",
                "messages": {format!("@nobody:{}", a.name): {"DEV": {}}, format!("@far:{}", b.name): {"*": {}}}}},
            {"edu_type": "m.direct_to_device", "content": {"sender": bob.user_id, "type": "m.x", "messages": {}}},
            // Garbage.
            {"edu_type": "m.receipt", "content": "nonsense"},
            {"edu_type": "m.device_list_update", "content": {"user_id": 7}},
            {"edu_type": "org.example.unknown", "content": {}},
            // A device update naming a predecessor Alice's server never saw: the list is fetched.
            {"edu_type": "m.device_list_update", "content": {"user_id": bob.user_id, "device_id": "GHOST",
                "stream_id": 9_000_000_000_000_i64, "prev_id": [8_999_999_999_999_i64], "deleted": false,
                "keys": {"user_id": bob.user_id, "device_id": "GHOST", "keys": {}}}},
            // One naming no predecessor cannot be trusted to follow: fetched too.
            {"edu_type": "m.device_list_update", "content": {"user_id": bob.user_id, "device_id": "GHOST2",
                "stream_id": 9_000_000_000_001_i64, "prev_id": [], "deleted": false,
                "keys": {"user_id": bob.user_id, "device_id": "GHOST2", "keys": {}}}},
        ]),
        "bad1",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let kept = query_keys(&a, &alice, &bob).await;
    let devices = kept["device_keys"][&bob.user_id]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        devices.contains_key(&bob.device_id)
            && !devices.contains_key("GHOST")
            && !devices.contains_key("GHOST2"),
        "the list as Bob's server has it, not the forged device: {kept}"
    );
    let sync = a.server.sync(&alice, "timeout=0").await;
    assert!(typing_users(&sync, &room).is_none_or(|u| u.is_empty()), "{sync}");
    assert!(
        sync["to_device"]["events"]
            .as_array()
            .is_none_or(|e| e.is_empty()),
        "{sync}"
    );
    // Over the spec's 100 EDUs: refused whole.
    let many: Vec<Value> = (0..101)
        .map(|_| json!({"edu_type": "org.example.unknown", "content": {}}))
        .collect();
    let (status, body) = send(Value::Array(many), "bad2").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
}

/// Runs `tests/interop/federated_e2ee.py` (matrix-nio with vodozemac): Alice on `a`, Bob on `b`,
/// Megolm both ways in an encrypted room and DM, then a new device on each side.
async fn nio_e2ee_between(a: &Peer, b: &Peer) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join("target/interop-venv/bin/python");
    if !python.exists() {
        skip_without("matrix-nio (tests/interop/setup.sh interop)");
        return;
    }
    let stores = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(python)
        .arg(root.join("tests/interop/federated_e2ee.py"))
        .arg(&a.server.base)
        .arg(&b.server.base)
        .arg(stores.path())
        .output()
        .expect("run python");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "{stdout}\n{stderr}\n--- {} log:\n{}\n--- {} log:\n{}",
        a.name,
        log_of(a),
        b.name,
        log_of(b)
    );
    assert_eq!(stdout.matches("ok: ").count(), 8, "{stdout}");
}

#[tokio::test]
async fn nio_users_on_switchboard_and_synapse_exchange_megolm_messages_and_see_new_devices() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    // The rooms on Switchboard, then on Synapse.
    nio_e2ee_between(&ours, &synapse).await;
    let (synapse2, ours2) = (
        Peer::synapse().await.expect("synapse"),
        Peer::switchboard("").await,
    );
    nio_e2ee_between(&synapse2, &ours2).await;
}

#[tokio::test]
async fn nio_users_on_two_switchboards_exchange_megolm_messages_and_see_new_devices() {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    nio_e2ee_between(&a, &b).await;
}

/// The `ephemeral` items of every transaction a fake service accepted.
fn service_ephemeral(service: &crate::fake_as::FakeAs) -> Vec<Value> {
    service
        .transactions()
        .into_iter()
        .flat_map(|(_, body)| {
            let mut items = body["ephemeral"].as_array().cloned().unwrap_or_default();
            items.extend(
                body["de.sorunome.msc2409.ephemeral"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
            items
        })
        .collect()
}

#[tokio::test]
async fn a_service_hears_typing_receipts_presence_and_to_device_messages_of_synapse_users() {
    use crate::fake_as::{
        FakeAs, Registration, as_user, config_files_yaml, register_ghost, write_registrations,
    };
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let service = FakeAs::start().await;
    let fed_port = crate::harness::free_port();
    let registration = Registration::new("bridge", Some(&service.url))
        .users(&format!("@_b_.*:localhost:{fed_port}"), true)
        .extra(
            "receive_ephemeral: true\nde.sorunome.msc2409.push_ephemeral: true\nio.element.msc4190: true\n",
        );
    let (_dir, paths) = write_registrations(&[("bridge.yaml", &registration.yaml())]);
    let ours = Peer::switchboard_on(fed_port, &config_files_yaml(&paths)).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&ours.server, &token, "_b_ghost").await;
    ours.server
        .ok(
            Method::PUT,
            &as_user("/_matrix/client/v3/devices/GHOSTDEV", &ghost),
            &token,
            json!({}),
        )
        .await;
    let sam = synapse.server.register("sam").await;
    let room = synapse
        .server
        .create_room(
            &sam,
            json!({"room_alias_name": "bridged", "preset": "public_chat"}),
        )
        .await;
    let alias = format!("#bridged:{}", synapse.name);
    ours.server
        .ok(
            Method::POST,
            &as_user(&format!("/_matrix/client/v3/join/{}", enc(&alias)), &ghost),
            &token,
            json!({}),
        )
        .await;
    let said = send_id(&synapse, &sam, &room, "s1", "hello, bridge").await;
    service
        .wait_for_events(
            |events| events.iter().any(|e| e["event_id"] == said.as_str()),
            Duration::from_secs(30),
        )
        .await;
    put(
        &synapse,
        &sam,
        &format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&sam.user_id)
        ),
        json!({"typing": true, "timeout": 20000}),
    )
    .await;
    post(
        &synapse,
        &sam,
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&room),
            enc(&said)
        ),
        json!({}),
    )
    .await;
    put(
        &synapse,
        &sam,
        &format!("/_matrix/client/v3/presence/{}/status", enc(&sam.user_id)),
        json!({"presence": "online", "status_msg": "on Synapse"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = service_ephemeral(&service);
        let typing = items.iter().any(|e| {
            e["type"] == "m.typing"
                && e["room_id"] == room.as_str()
                && e["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u == sam.user_id.as_str()))
        });
        let receipt = items.iter().any(|e| {
            e["type"] == "m.receipt"
                && e["content"][said.as_str()]["m.read"][sam.user_id.as_str()].is_object()
        });
        let presence = items.iter().any(|e| {
            e["type"] == "m.presence"
                && e["sender"] == sam.user_id.as_str()
                && e["content"]["status_msg"] == "on Synapse"
        });
        if typing && receipt && presence {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "typing {typing}, receipt {receipt}, presence {presence}: {items:?}\n{}",
            log_of(&ours)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A to-device message from Synapse's user to the service's ghost reaches the service.
    put(
        &synapse,
        &sam,
        "/_matrix/client/v3/sendToDevice/org.example.ping/t1",
        json!({"messages": { ghost.clone(): { "GHOSTDEV": {"from": "synapse"} } }}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let messages: Vec<Value> = service
            .transactions()
            .into_iter()
            .flat_map(|(_, body)| {
                body["de.sorunome.msc2409.to_device"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let expected = json!({
            "type": "org.example.ping", "sender": sam.user_id, "content": {"from": "synapse"},
            "to_user_id": ghost, "to_device_id": "GHOSTDEV",
        });
        if messages.contains(&expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no to-device message from Synapse in the transactions: {messages:?}\n{}",
            log_of(&ours)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn device_lists_name_who_came_to_share_a_room_and_who_left_every_shared_room() {
    let (a, b, alice, bob, room) = two_in_a_room().await;
    let carol = b.server.register("carol").await;
    let since = next_batch(&a, &alice).await;
    let carols = next_batch(&b, &carol).await;
    join_alias(&b, &carol, &format!("#hall:{}", a.name), &a).await;
    // Carol, joining, meets everyone in the room.
    sync_from_until(
        &b,
        &carol,
        &a,
        "Alice and Bob in Carol's changed",
        30,
        Some(carols),
        |s| (changed_includes(s, &alice.user_id) && changed_includes(s, &bob.user_id)).then_some(()),
    )
    .await;
    let changed = sync_from_until(&a, &alice, &b, "Carol in changed", 30, Some(since.clone()), |s| {
        changed_includes(s, &carol.user_id).then(|| s["device_lists"].clone())
    })
    .await;
    assert!(
        !changed_includes(&json!({"device_lists": changed}), &alice.user_id),
        "never oneself"
    );
    let middle = next_batch(&a, &alice).await;
    post(
        &b,
        &bob,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        json!({}),
    )
    .await;
    let left = sync_from_until(&a, &alice, &b, "Bob in left", 30, Some(middle.clone()), |s| {
        s["device_lists"]["left"]
            .as_array()
            .filter(|l| l.iter().any(|u| u == bob.user_id.as_str()))
            .cloned()
    })
    .await;
    assert_eq!(left, vec![json!(bob.user_id)]);
    // `/keys/changes` over the same stretch says the same.
    let now = next_batch(&a, &alice).await;
    let changes = a
        .server
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(&since),
                enc(&now)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(changes["left"], json!([bob.user_id]), "{changes}");
    assert!(
        changes["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == carol.user_id.as_str())),
        "{changes}"
    );
    // When Alice leaves, Carol (in no other room with her) is left too.
    let later = next_batch(&b, &carol).await;
    post(
        &a,
        &alice,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        json!({}),
    )
    .await;
    sync_from_until(&b, &carol, &a, "Alice in Carol's left", 30, Some(later), |s| {
        s["device_lists"]["left"]
            .as_array()
            .filter(|l| l.iter().any(|u| u == alice.user_id.as_str()))
            .map(|_| ())
    })
    .await;
}
