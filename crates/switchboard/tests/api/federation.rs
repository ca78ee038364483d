//! Federation between real servers on loopback: each has the server name `localhost:<port>` (the
//! port of its TLS federation listener) and a certificate from a CA made for this test run, which
//! every server trusts (`federation_custom_ca_list`); see `peers.rs`.

use reqwest::{Method, StatusCode};
use ruma::{
    OwnedServerName,
    api::federation::authentication::{XMatrix, XMatrixSigningInput},
};
use serde_json::{Value, json};
use switchboard_core::keys::SigningKey;

use crate::{
    harness::{enc, errcode},
    peers::{Peer, log_of, skip_without, tls_client},
};

/// A federation request signed with `key` as `origin`, for `destination` (which may differ from
/// where it is sent, to test that), optionally with its URI changed after signing.
async fn signed(
    to: &Peer,
    key: &SigningKey,
    origin: &str,
    destination: &str,
    path: &str,
    signed_path: Option<&str>,
) -> (StatusCode, Value) {
    let origin = OwnedServerName::try_from(origin).expect("origin");
    let destination = OwnedServerName::try_from(destination).expect("destination");
    let request = http::Request::builder()
        .method("GET")
        .uri(signed_path.unwrap_or(path))
        .body(Vec::<u8>::new())
        .expect("request");
    let x_matrix = XMatrix::sign_http_request(
        &request,
        XMatrixSigningInput::new(origin, destination, &key.key_pair),
    )
    .expect("sign");
    let header = http::HeaderValue::from(&x_matrix);
    let response = tls_client()
        .get(to.federation_url(path))
        .header("Authorization", header.to_str().expect("header"))
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn keys_and_version_are_served_over_tls_self_signed() {
    let peer = Peer::switchboard("").await;
    let client = tls_client();
    let version: Value = client
        .get(peer.federation_url("/_matrix/federation/v1/version"))
        .send()
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    assert_eq!(version["server"]["name"], "Switchboard");
    let keys: Value = client
        .get(peer.federation_url("/_matrix/key/v2/server"))
        .send()
        .await
        .expect("keys")
        .json()
        .await
        .expect("json");
    assert_eq!(keys["server_name"], peer.name);
    let key_id = keys["verify_keys"]
        .as_object()
        .expect("verify_keys")
        .keys()
        .next()
        .expect("a key")
        .clone();
    assert!(key_id.starts_with("ed25519:"), "{keys}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as i64;
    let valid_until = keys["valid_until_ts"].as_i64().expect("valid_until_ts");
    assert!(valid_until > now + 23 * 3600 * 1000, "a day, by default: {keys}");
    // The document verifies with the key it publishes.
    let public = keys["verify_keys"][&key_id]["key"].as_str().expect("key");
    let map = ruma::signatures::PublicKeyMap::from([(
        peer.name.clone(),
        ruma::signatures::PublicKeySet::from([(
            key_id.clone(),
            ruma::serde::Base64::parse(public).expect("base64"),
        )]),
    )]);
    let object: ruma::CanonicalJsonObject = serde_json::from_value(keys.clone()).expect("canonical");
    ruma::signatures::verify_json(&map, &object).expect("self-signed");
    // The client listener does not serve federation, nor the federation listener the client API.
    let (status, body) = peer
        .server
        .call(Method::GET, "/_matrix/key/v2/server", None, None)
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_UNRECOGNIZED")
    );
    let response = client
        .get(peer.federation_url("/_matrix/client/versions"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn two_switchboards_query_profiles_aliases_and_keys_of_each_other() {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    a.server
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            &alice.token,
            json!({"displayname": "Alice of A"}),
        )
        .await;
    assert!(
        alice.user_id.ends_with(&format!(":{}", a.name)),
        "{}",
        alice.user_id
    );
    // Bob's server asks Alice's, signed; Alice's fetches Bob's server's key to check it.
    let profile = b
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(profile["displayname"], "Alice of A");
    let (status, body) = b
        .server
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v3/profile/{}",
                enc(&format!("@nobody:{}", a.name))
            ),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
        "{body}"
    );

    let room = a
        .server
        .create_room(&alice, json!({"room_alias_name": "hall"}))
        .await;
    let alias = format!("#hall:{}", a.name);
    let found = b
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(found["room_id"], room.as_str());
    assert_eq!(found["servers"], json!([a.name]));

    // B as a notary for A's keys: A's signature and B's on the same document.
    let answer: Value = tls_client()
        .get(b.federation_url(&format!("/_matrix/key/v2/query/{}", a.name)))
        .send()
        .await
        .expect("notary")
        .json()
        .await
        .expect("json");
    let keys = &answer["server_keys"][0];
    assert_eq!(keys["server_name"], a.name, "{answer}");
    let signers: Vec<&String> = keys["signatures"]
        .as_object()
        .expect("signatures")
        .keys()
        .collect();
    assert_eq!(signers.len(), 2, "{answer}");
    assert!(
        signers.contains(&&a.name) && signers.contains(&&b.name),
        "{answer}"
    );
}

#[tokio::test]
async fn unsigned_misdirected_and_forged_requests_are_refused() {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        enc(&alice.user_id)
    );
    let b_key = SigningKey::load(&b.server.dir.path().join("signing.key")).expect("b's key");

    // Signed with B's real key, for A: accepted (A fetches B's key from B).
    let (status, body) = signed(&a, &b_key, &b.name, &a.name, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["displayname"], "alice");

    let no_auth = tls_client()
        .get(a.federation_url(&path))
        .send()
        .await
        .expect("request");
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);
    let body: Value = no_auth.json().await.expect("json");
    assert_eq!(errcode(&body), "M_UNAUTHORIZED");

    // Signed for another destination.
    let (status, body) = signed(&a, &b_key, &b.name, "localhost:1", &path, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
        "{body}"
    );
    // A signature over another URI.
    let (status, body) = signed(
        &a,
        &b_key,
        &b.name,
        &a.name,
        &path,
        Some("/_matrix/federation/v1/version"),
    )
    .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
        "{body}"
    );
    // Someone else's key under B's name.
    let forger =
        SigningKey::parse(&switchboard_core::keys::generate_key_file_contents(), "forger").expect("key");
    let (status, body) = signed(&a, &forger, &b.name, &a.name, &path, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
        "{body}"
    );
    // A garbled header.
    let response = tls_client()
        .get(a.federation_url(&path))
        .header("Authorization", "X-Matrix origin=")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Unknown endpoints are the spec's 404.
    let (status, body) = signed(
        &a,
        &b_key,
        &b.name,
        &a.name,
        "/_matrix/federation/v1/no_such_thing",
        None,
    )
    .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
        "{body}"
    );

    // A server outside federation_domain_whitelist is refused both ways.
    let c = Peer::switchboard("federation_domain_whitelist: ['example.org']").await;
    let (status, body) = signed(&c, &b_key, &b.name, &c.name, &path, None).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );
    let carol = c.server.register("carol").await;
    let (status, body) = c
        .server
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            Some(&carol.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );
}

#[tokio::test]
async fn outbound_requests_never_reach_a_blacklisted_address() {
    // Without the loopback whitelist, Synapse's default blacklist keeps every request off 127/8.
    let a = Peer::switchboard("").await;
    let b = Peer::switchboard("ip_range_whitelist: []").await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let (status, body) = b
        .server
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("ip_range_blacklist"),
        "{body}"
    );
}

#[tokio::test]
async fn synapse_and_switchboard_query_each_other_with_signed_requests() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let alice = ours.server.register("alice").await;
    ours.server
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            &alice.token,
            json!({"displayname": "Alice on Switchboard"}),
        )
        .await;
    let room = ours
        .server
        .create_room(&alice, json!({"room_alias_name": "lobby"}))
        .await;
    let sam = synapse.server.register("sam").await;
    synapse
        .server
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&sam.user_id)),
            &sam.token,
            json!({"displayname": "Sam on Synapse"}),
        )
        .await;

    // Synapse asks us (it verifies our X-Matrix signature with the keys it fetched from us).
    let profile = synapse
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            &sam.token,
            Value::Null,
        )
        .await;
    assert_eq!(
        profile["displayname"],
        "Alice on Switchboard",
        "synapse log: {}",
        synapse_log(&synapse)
    );
    let found = synapse
        .server
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc(&format!("#lobby:{}", ours.name))
            ),
            &sam.token,
            Value::Null,
        )
        .await;
    assert_eq!(found["room_id"], room.as_str());

    // We ask Synapse (we verify its signature on nothing here, but it verifies ours).
    let profile = ours
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&sam.user_id)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(profile["displayname"], "Sam on Synapse", "{}", ours.server.log());

    // Synapse as our notary's subject: we fetched its keys for its requests to us.
    let answer: Value = tls_client()
        .get(ours.federation_url(&format!("/_matrix/key/v2/query/{}", synapse.name)))
        .send()
        .await
        .expect("notary")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["server_keys"][0]["server_name"], synapse.name, "{answer}");
}

fn synapse_log(peer: &Peer) -> String {
    std::fs::read_to_string(peer.server.dir.path().join("synapse.log")).unwrap_or_default()
}

/// Polls `/messages` (newest first) until an `m.room.message` with `body` shows up; returns its
/// sender. Panics after 30 s with the logs of both servers.
pub(crate) async fn wait_for_message(
    on: &Peer,
    user: &crate::harness::User,
    room: &str,
    body: &str,
    other: &Peer,
) -> String {
    wait_for_message_within(on, user, room, body, other, 30).await
}

/// [`wait_for_message`] with a deadline of `seconds`.
async fn wait_for_message_within(
    on: &Peer,
    user: &crate::harness::User,
    room: &str,
    body: &str,
    other: &Peer,
    seconds: u64,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(room));
    loop {
        let (status, page) = on.server.call(Method::GET, &path, Some(&user.token), None).await;
        if status == StatusCode::OK
            && let Some(event) = page["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["type"] == "m.room.message" && e["content"]["body"] == body)
        {
            return event["sender"].as_str().unwrap_or_default().to_owned();
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "{body:?} never reached {} ({status}: {page})\n--- {} log:\n{}\n--- {} log:\n{}",
                on.name,
                on.name,
                log_of(on),
                other.name,
                log_of(other)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_synapse_user_joins_a_switchboard_room_by_alias_and_they_talk() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let alice = ours.server.register("alice").await;
    let room = ours
        .server
        .create_room(
            &alice,
            json!({"room_alias_name": "town", "preset": "public_chat"}),
        )
        .await;
    for i in 0..3 {
        let text = format!("said before Sam came {i}");
        ours.server
            .send_text(&alice, &room, &format!("h{i}"), &text)
            .await;
    }
    let sam = synapse.server.register("sam").await;
    let alias = format!("#town:{}", ours.name);
    let (status, joined) = synapse
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&alias)),
            Some(&sam.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{joined}\n{}\n{}",
        log_of(&synapse),
        log_of(&ours)
    );
    assert_eq!(joined["room_id"], room.as_str());
    // Alice's server took Sam's join.
    let members = ours
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert!(members["joined"].get(&sam.user_id).is_some(), "{members}");

    // History from before the join: Synapse backfills it from this server when Sam pages back.
    wait_for_message(&synapse, &sam, &room, "said before Sam came 0", &ours).await;

    // Both ways.
    let (status, body) = synapse
        .server
        .send_text(&sam, &room, "s1", "hello from Synapse")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&ours, &alice, &room, "hello from Synapse", &synapse).await,
        sam.user_id
    );
    let (status, body) = ours
        .server
        .send_text(&alice, &room, "a1", "hello from Switchboard")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&synapse, &sam, &room, "hello from Switchboard", &ours).await,
        alice.user_id
    );
    // A burst arrives whole and in order.
    for i in 0..20 {
        ours.server
            .send_text(&alice, &room, &format!("b{i}"), &format!("burst {i}"))
            .await;
    }
    wait_for_message(&synapse, &sam, &room, "burst 19", &ours).await;
    let page = synapse
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=40", enc(&room)),
            &sam.token,
            Value::Null,
        )
        .await;
    let bursts: Vec<&str> = page["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str())
        .filter(|b| b.starts_with("burst "))
        .collect();
    let expected: Vec<String> = (0..20).rev().map(|i| format!("burst {i}")).collect();
    assert_eq!(bursts, expected, "Synapse holds each once, in order");
}

/// `user` on `on` joins `alias` (of another server) and gets the room ID.
pub(crate) async fn join_alias(on: &Peer, user: &crate::harness::User, alias: &str, other: &Peer) -> String {
    let (status, joined) = on
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(alias)),
            Some(&user.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{joined}\n--- {}:\n{}\n--- {}:\n{}",
        on.name,
        log_of(on),
        other.name,
        log_of(other)
    );
    joined["room_id"].as_str().expect("room_id").to_owned()
}

#[tokio::test]
async fn a_switchboard_user_joins_a_room_on_another_switchboard_and_they_talk() {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice,
            json!({"room_alias_name": "hall", "preset": "public_chat", "name": "The Hall"}),
        )
        .await;
    // More than one `/backfill` request's worth (100) said before Bob comes.
    let before: Vec<String> = (0..130).map(|i| format!("said before Bob came {i}")).collect();
    for (i, text) in before.iter().enumerate() {
        let (status, body) = a.server.send_text(&alice, &room, &format!("p{i}"), text).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let joined = join_alias(&b, &bob, &format!("#hall:{}", a.name), &a).await;
    assert_eq!(joined, room);
    // History from before the join, fetched from A as Bob pages back, page after page.
    let mut seen = Vec::new();
    let mut from = String::new();
    for _ in 0..20 {
        let page = b
            .server
            .ok(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=25{from}",
                    enc(&room)
                ),
                &bob.token,
                Value::Null,
            )
            .await;
        seen.extend(
            page["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["content"]["body"].as_str())
                .filter(|b| b.starts_with("said before"))
                .map(str::to_owned),
        );
        match page["end"].as_str() {
            Some(end) => from = format!("&from={end}"),
            None => break,
        }
    }
    seen.reverse();
    assert_eq!(seen, before, "each once, in order\n{}", log_of(&b));
    // Bob's server holds the room's state now: its name, and both members.
    assert_eq!(
        b.server.state(&bob, &room, "m.room.name", "").await["name"],
        "The Hall"
    );
    let members = b
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert!(
        members["joined"].get(&alice.user_id).is_some() && members["joined"].get(&bob.user_id).is_some(),
        "{members}"
    );

    let (status, body) = b.server.send_text(&bob, &room, "b1", "hello from B").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&a, &alice, &room, "hello from B", &b).await,
        bob.user_id
    );
    let (status, body) = a.server.send_text(&alice, &room, "a1", "hello from A").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&b, &bob, &room, "hello from A", &a).await,
        alice.user_id
    );
    // Bob's sync carries the room, its state and the message.
    let sync = b.server.sync(&bob, "timeout=0").await;
    let joined_room = &sync["rooms"]["join"][&room];
    assert!(joined_room.is_object(), "{sync}");
}

#[tokio::test]
async fn a_switchboard_user_joins_a_synapse_room_and_they_talk() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let sam = synapse.server.register("sam").await;
    let room = synapse
        .server
        .create_room(
            &sam,
            json!({"room_alias_name": "plaza", "preset": "public_chat", "name": "Plaza"}),
        )
        .await;
    let before: Vec<String> = (0..30).map(|i| format!("said before Alice came {i}")).collect();
    for (i, text) in before.iter().enumerate() {
        let (status, body) = synapse
            .server
            .send_text(&sam, &room, &format!("p{i}"), text)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let alice = ours.server.register("alice").await;
    let joined = join_alias(&ours, &alice, &format!("#plaza:{}", synapse.name), &synapse).await;
    assert_eq!(joined, room);
    // History from before the join: fetched from Synapse (`/backfill`) as Alice pages back.
    let seen: Vec<String> = bodies(&ours, &alice, &room)
        .await
        .into_iter()
        .filter(|b| b.starts_with("said before"))
        .collect();
    assert_eq!(seen, before, "each once, in order\n{}", log_of(&ours));
    assert_eq!(
        ours.server.state(&alice, &room, "m.room.name", "").await["name"],
        "Plaza"
    );
    // Synapse's default: room version 12, whose room ID is its create event's hash.
    let create = ours.server.state(&alice, &room, "m.room.create", "").await;
    assert_eq!(create["room_version"], "12", "{create}");
    let (status, body) = ours
        .server
        .send_text(&alice, &room, "a1", "hello from Switchboard")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&synapse, &sam, &room, "hello from Switchboard", &ours).await,
        alice.user_id
    );
    let (status, body) = synapse
        .server
        .send_text(&sam, &room, "s1", "hello from Synapse")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        wait_for_message(&ours, &alice, &room, "hello from Synapse", &synapse).await,
        sam.user_id
    );
}

/// Polls `user`'s membership in `room` on `on` (from the room's state) until it is `want`.
async fn wait_for_membership(
    on: &Peer,
    user: &crate::harness::User,
    room: &str,
    whose: &str,
    want: &str,
    other: &Peer,
) {
    wait_for_state(
        on,
        user,
        room,
        ("m.room.member", whose),
        |c| c["membership"] == want,
        other,
    )
    .await;
}

/// Polls `/sync` until `room` is among `user`'s invites; returns the invite's state.
async fn wait_for_invite(on: &Peer, user: &crate::harness::User, room: &str, other: &Peer) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sync = on.server.sync(user, "timeout=0").await;
        let invite = &sync["rooms"]["invite"][room];
        if invite.is_object() {
            return invite["invite_state"]["events"].clone();
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "no invite to {room} on {}: {sync}\n--- {}:\n{}",
                on.name,
                other.name,
                log_of(other)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn invites_kicks_bans_and_leaves_cross_between_switchboards() {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice,
            json!({"preset": "private_chat", "name": "Secret", "invite": [bob.user_id]}),
        )
        .await;
    // Bob's server signed the invite and shows it with the room's name.
    let state = wait_for_invite(&b, &bob, &room, &a).await;
    assert!(
        state
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Secret"),
        "{state}"
    );
    // Sliding sync lists the invite to a room this server does not hold, with its state.
    let sliding = b
        .server
        .ok(
            Method::POST,
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            &bob.token,
            json!({ "lists": { "all": { "ranges": [[0, 9]], "timeline_limit": 1 } } }),
        )
        .await;
    assert!(
        sliding["rooms"][&room]["invite_state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|e| e["type"] == "m.room.name")),
        "{sliding}"
    );
    let (status, body) = b
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", log_of(&a));
    wait_for_membership(&a, &alice, &room, &bob.user_id, "join", &b).await;
    let (status, _) = b.server.send_text(&bob, &room, "b1", "inside").await;
    assert_eq!(status, StatusCode::OK);
    wait_for_message(&a, &alice, &room, "inside", &b).await;

    // A kick reaches the kicked user's server; its user can say nothing more.
    a.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            &alice.token,
            json!({"user_id": bob.user_id, "reason": "out"}),
        )
        .await;
    wait_for_membership(&b, &bob, &room, &bob.user_id, "leave", &a).await;
    let (status, body) = b.server.send_text(&bob, &room, "b2", "still here?").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );

    // Invited again, Bob refuses: Alice's server sees the leave.
    a.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            &alice.token,
            json!({"user_id": bob.user_id}),
        )
        .await;
    wait_for_invite(&b, &bob, &room, &a).await;
    b.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
            &bob.token,
            json!({}),
        )
        .await;
    wait_for_membership(&a, &alice, &room, &bob.user_id, "leave", &b).await;

    // Banned, Bob cannot come back.
    a.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            &alice.token,
            json!({"user_id": bob.user_id}),
        )
        .await;
    wait_for_membership(&b, &bob, &room, &bob.user_id, "ban", &a).await;
    let (status, body) = b
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );
}

#[tokio::test]
async fn invites_and_refusals_cross_between_synapse_and_switchboard() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let alice = ours.server.register("alice").await;
    let sam = synapse.server.register("sam").await;

    // Sam invites Alice into a Synapse room; she accepts and they talk.
    let room = synapse
        .server
        .create_room(
            &sam,
            json!({"preset": "private_chat", "name": "Tea", "room_version": "11", "invite": [alice.user_id]}),
        )
        .await;
    let state = wait_for_invite(&ours, &alice, &room, &synapse).await;
    assert!(
        state
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Tea"),
        "{state}"
    );
    let (status, body) = ours
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", log_of(&synapse));
    ours.server
        .send_text(&alice, &room, "a1", "thanks for the tea")
        .await;
    wait_for_message(&synapse, &sam, &room, "thanks for the tea", &ours).await;
    ours.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
            &alice.token,
            json!({}),
        )
        .await;
    wait_for_membership(&synapse, &sam, &room, &alice.user_id, "leave", &ours).await;

    // A second invite, refused without ever joining (make_leave / send_leave to Synapse).
    let other = synapse
        .server
        .create_room(
            &sam,
            json!({"preset": "private_chat", "room_version": "11", "invite": [alice.user_id]}),
        )
        .await;
    wait_for_invite(&ours, &alice, &other, &synapse).await;
    ours.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(&other)),
            &alice.token,
            json!({}),
        )
        .await;
    wait_for_membership(&synapse, &sam, &other, &alice.user_id, "leave", &ours).await;

    // Alice invites Sam into a Switchboard room; Synapse signs, Sam joins.
    let ours_room = ours
        .server
        .create_room(&alice, json!({"preset": "private_chat", "invite": [sam.user_id]}))
        .await;
    wait_for_invite(&synapse, &sam, &ours_room, &ours).await;
    let (status, body) = synapse
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&ours_room)),
            Some(&sam.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", log_of(&ours));
    wait_for_membership(&ours, &alice, &ours_room, &sam.user_id, "join", &synapse).await;
}

/// The bodies of `m.room.message` events in `room` as `user` on `on` sees them, oldest first.
async fn bodies(on: &Peer, user: &crate::harness::User, room: &str) -> Vec<String> {
    let page = on
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room)),
            &user.token,
            Value::Null,
        )
        .await;
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.reverse();
    bodies
}

/// Two Switchboards with Bob (of B) in Alice's room on A.
pub(crate) async fn two_in_a_room() -> (Peer, Peer, crate::harness::User, crate::harness::User, String) {
    let (a, b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice,
            json!({"room_alias_name": "hall", "preset": "public_chat"}),
        )
        .await;
    join_alias(&b, &bob, &format!("#hall:{}", a.name), &a).await;
    (a, b, alice, bob, room)
}

#[tokio::test]
async fn a_peer_down_for_a_minute_gets_everything_sent_meanwhile_once_and_in_order() {
    let (a, mut b, alice, bob, room) = two_in_a_room().await;
    assert!(b.server.terminate().success());
    let started = std::time::Instant::now();
    let mut sent = Vec::new();
    let mut i = 0;
    while started.elapsed() < std::time::Duration::from_secs(60) {
        let text = format!("while down {i}");
        let (status, body) = a.server.send_text(&alice, &room, &format!("d{i}"), &text).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent.push(text);
        i += 1;
        // More than a transaction's worth (50), so A catches up latest first.
        tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    }
    assert!(sent.len() > 50, "{}", sent.len());
    b.server.restart().await;
    let last = sent.last().expect("sent").clone();
    // The queue retries at most 30 s apart during the first minutes of an outage; the margin
    // is for a loaded machine.
    wait_for_message_within(&b, &bob, &room, &last, &a, 75).await;
    let seen: Vec<String> = bodies(&b, &bob, &room)
        .await
        .into_iter()
        .filter(|t| t.starts_with("while down"))
        .collect();
    assert_eq!(seen, sent, "each once, in order");
}

#[tokio::test]
async fn after_a_long_outage_the_latest_go_first_and_the_peer_fills_the_gap_in_order() {
    let (a, mut b, alice, bob, room) = two_in_a_room().await;
    assert!(b.server.terminate().success());
    // More than ten transactions' worth (500) waiting.
    let sent: Vec<String> = (0..520).map(|i| format!("backlog {i}")).collect();
    for (i, text) in sent.iter().enumerate() {
        let (status, body) = a.server.send_text(&alice, &room, &format!("l{i}"), text).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    b.server.restart().await;
    wait_for_message_within(&b, &bob, &room, "backlog 519", &a, 75).await;
    // The latest went first and B fetched the gap before it itself, oldest first.
    assert!(
        a.server.log().contains("the latest events sent first"),
        "{}",
        log_of(&a)
    );
    let seen: Vec<String> = bodies(&b, &bob, &room)
        .await
        .into_iter()
        .filter(|t| t.starts_with("backlog "))
        .collect();
    assert_eq!(seen, sent, "each once, in order");
}

#[tokio::test]
async fn a_crash_mid_stream_loses_nothing_of_the_outbound_queue() {
    let (mut a, mut b, alice, bob, room) = two_in_a_room().await;
    // B is away, so A's queue surely holds undelivered events when A is killed.
    assert!(b.server.terminate().success());
    let mut sent = Vec::new();
    for i in 0..60 {
        if i == 30 {
            a.server.crash_and_restart().await;
        }
        let text = format!("stream {i}");
        let (status, body) = a.server.send_text(&alice, &room, &format!("s{i}"), &text).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent.push(text);
    }
    b.server.restart().await;
    wait_for_message(&b, &bob, &room, "stream 59", &a).await;
    let seen: Vec<String> = bodies(&b, &bob, &room)
        .await
        .into_iter()
        .filter(|t| t.starts_with("stream "))
        .collect();
    assert_eq!(seen, sent, "each once, in order");
}

/// A federation request with a body, signed with `key` as `origin` for `to`.
pub(crate) async fn fed_request(
    to: &Peer,
    key: &SigningKey,
    origin: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("json"))
        .unwrap_or_default();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(bytes.clone())
        .expect("request");
    let x_matrix = XMatrix::sign_http_request(
        &request,
        XMatrixSigningInput::new(
            OwnedServerName::try_from(origin).expect("origin"),
            OwnedServerName::try_from(to.name.as_str()).expect("destination"),
            &key.key_pair,
        ),
    )
    .expect("sign");
    let header = http::HeaderValue::from(&x_matrix);
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut builder = tls_client()
        .request(method, to.federation_url(path))
        .header("Authorization", header.to_str().expect("header"));
    if body.is_some() {
        builder = builder.header("Content-Type", "application/json").body(bytes);
    }
    let response = builder.send().await.expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A message event of `sender` in `room` as `room`'s server holds it, signed with `key` as
/// the sender's server; `tamper` changes it after signing. Returns the event and its ID.
async fn crafted_message(
    on: &Peer,
    viewer: &crate::harness::User,
    room: &str,
    sender: &str,
    key: &SigningKey,
    body: &str,
    tamper: impl FnOnce(&mut ruma::CanonicalJsonObject),
) -> (Value, String) {
    crafted_message_after(on, viewer, room, sender, key, body, None, tamper).await
}

/// [`crafted_message`] following `after` (`(prev event, depth)`) instead of the room's last
/// event at depth 1000.
#[allow(clippy::too_many_arguments)]
async fn crafted_message_after(
    on: &Peer,
    viewer: &crate::harness::User,
    room: &str,
    sender: &str,
    key: &SigningKey,
    body: &str,
    after: Option<(String, u64)>,
    tamper: impl FnOnce(&mut ruma::CanonicalJsonObject),
) -> (Value, String) {
    // Signed by the sender's server.
    let origin = sender.split_once(':').expect("user ID").1;
    let state = on
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(room)),
            &viewer.token,
            Value::Null,
        )
        .await;
    let id_of = |kind: &str, key: &str| {
        state
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == kind && e["state_key"] == key)
            .map(|e| e["event_id"].as_str().expect("id").to_owned())
    };
    let mut auth: Vec<String> = [
        id_of("m.room.create", ""),
        id_of("m.room.power_levels", ""),
        id_of("m.room.member", sender),
    ]
    .into_iter()
    .flatten()
    .collect();
    auth.sort();
    let last = on
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(room)),
            &viewer.token,
            Value::Null,
        )
        .await;
    let last_id = last["chunk"][0]["event_id"].as_str().expect("prev").to_owned();
    let (prev, depth) = after.unwrap_or((last_id, 1000));
    let event = json!({
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": body},
        "origin_server_ts": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("t").as_millis() as u64,
        "depth": depth,
        "prev_events": [prev],
        "auth_events": auth,
    });
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(event).expect("canonical");
    let rules = ruma::RoomVersionId::V11.rules().expect("rules");
    ruma::signatures::hash_and_sign_event(origin, &key.key_pair, &mut object, &rules.redaction)
        .expect("sign");
    let id = format!(
        "${}",
        ruma::signatures::reference_hash(&object, &rules).expect("hash")
    );
    tamper(&mut object);
    (serde_json::to_value(&object).expect("json"), id)
}

#[tokio::test]
async fn bad_pdus_and_transactions_are_refused_with_the_specs_errors_and_never_stored() {
    let (a, b, alice, bob, room) = two_in_a_room().await;
    let b_key = SigningKey::load(&b.server.dir.path().join("signing.key")).expect("b's key");
    let send = |pdus: Vec<Value>, txn: &'static str| {
        let body = json!({"origin": b.name, "origin_server_ts": 1, "pdus": pdus, "edus": []});
        let (a, b_key, b_name) = (&a, &b_key, b.name.clone());
        async move {
            fed_request(
                a,
                b_key,
                &b_name,
                "PUT",
                &format!("/_matrix/federation/v1/send/{txn}"),
                Some(&body),
            )
            .await
        }
    };
    let stored = |id: String| {
        let (a, alice, room) = (&a, &alice, room.clone());
        async move {
            a.server
                .call(
                    Method::GET,
                    &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&id)),
                    Some(&alice.token),
                    None,
                )
                .await
        }
    };

    // A well-made one is taken (the control).
    let (good, good_id) = crafted_message(
        &a,
        &alice,
        &room,
        &bob.user_id,
        &b_key,
        "crafted but fine",
        |_| {},
    )
    .await;
    let (status, result) = send(vec![good], "t1").await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["pdus"][&good_id], json!({}), "{result}");
    assert_eq!(stored(good_id).await.0, StatusCode::OK);

    // A broken signature: refused, not stored.
    let (forged, forged_id) = crafted_message(&a, &alice, &room, &bob.user_id, &b_key, "forged", |o| {
        let Some(ruma::CanonicalJsonValue::Object(sigs)) = o.get_mut("signatures") else {
            panic!("signatures")
        };
        let Some(ruma::CanonicalJsonValue::Object(by_key)) = sigs.values_mut().next() else {
            panic!("by key")
        };
        for sig in by_key.values_mut() {
            *sig = ruma::CanonicalJsonValue::String("A".repeat(86));
        }
    })
    .await;
    let (status, result) = send(vec![forged], "t2").await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert!(result["pdus"][&forged_id]["error"].is_string(), "{result}");
    assert_eq!(stored(forged_id).await.0, StatusCode::NOT_FOUND);

    // Content changed after hashing: the signature (over the redacted form) holds, the hash
    // does not: stored, redacted.
    let (changed, changed_id) = crafted_message(&a, &alice, &room, &bob.user_id, &b_key, "original", |o| {
        o.insert(
            "content".to_owned(),
            ruma::CanonicalJsonValue::Object(
                [
                    (
                        "msgtype".to_owned(),
                        ruma::CanonicalJsonValue::String("m.text".to_owned()),
                    ),
                    (
                        "body".to_owned(),
                        ruma::CanonicalJsonValue::String("swapped".to_owned()),
                    ),
                ]
                .into(),
            ),
        );
    })
    .await;
    let (status, result) = send(vec![changed], "t3").await;
    assert_eq!(status, StatusCode::OK, "{result}");
    let (status, event) = stored(changed_id).await;
    assert_eq!(status, StatusCode::OK, "{event}");
    assert_eq!(event["content"], json!({}), "kept redacted: {event}");

    // Someone who is not in the room: fails the auth rules.
    let mallory = format!("@mallory:{}", b.name);
    let (stranger, stranger_id) =
        crafted_message(&a, &alice, &room, &mallory, &b_key, "let me in", |_| {}).await;
    let (_, result) = send(vec![stranger], "t4").await;
    assert!(result["pdus"][&stranger_id]["error"].is_string(), "{result}");
    assert_eq!(stored(stranger_id).await.0, StatusCode::NOT_FOUND);

    // Made by Bob's server before the ban reached it, arriving after: it follows the events
    // before the ban, so the state before it allows it, the room's current state does not.
    let (concurrent, concurrent_id) =
        crafted_message(&a, &alice, &room, &bob.user_id, &b_key, "crossed the ban", |_| {}).await;
    // Banned, Bob's server's events for him are refused.
    a.server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
            &alice.token,
            json!({"user_id": bob.user_id}),
        )
        .await;
    let (banned, banned_id) =
        crafted_message(&a, &alice, &room, &bob.user_id, &b_key, "from the banned", |_| {}).await;
    let (_, result) = send(vec![banned], "t5").await;
    assert!(result["pdus"][&banned_id]["error"].is_string(), "{result}");
    assert_eq!(stored(banned_id).await.0, StatusCode::NOT_FOUND);
    // The concurrent one is soft-failed: taken (the transaction answers for it without an
    // error) but kept out of the timeline, and the room goes on from the ban.
    let (status, result) = send(vec![concurrent], "t5b").await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["pdus"][&concurrent_id], json!({}), "{result}");
    let (status, _) = a.server.send_text(&alice, &room, "z0", "after the ban").await;
    assert_eq!(status, StatusCode::OK);
    let seen = bodies(&a, &alice, &room).await;
    assert!(seen.contains(&"after the ban".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"crossed the ban".to_owned()), "{seen:?}");
    let synced = a
        .server
        .ok(Method::GET, "/_matrix/client/v3/sync", &alice.token, Value::Null)
        .await;
    assert!(!synced.to_string().contains("crossed the ban"), "{synced}");

    // Over the spec's limits.
    let (status, result) = send(vec![json!({}); 51], "t6").await;
    assert_eq!(
        (status, errcode(&result)),
        (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
        "{result}"
    );
    // Not JSON at all.
    let response = tls_client()
        .put(a.federation_url("/_matrix/federation/v1/send/t7"))
        .header(
            "Authorization",
            format!(
                "X-Matrix origin=\"{}\",key=\"ed25519:x\",sig=\"{}\"",
                b.name,
                "A".repeat(86)
            ),
        )
        .body("{not json")
        .send()
        .await
        .expect("request");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
        "{body}"
    );
    // A room version the joining server does not name.
    let (status, body) = fed_request(
        &a,
        &b_key,
        &b.name,
        "GET",
        &format!(
            "/_matrix/federation/v1/make_join/{}/{}?ver=1",
            enc(&room),
            enc(&format!("@carol:{}", b.name))
        ),
        None,
    )
    .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION"),
        "{body}"
    );
    assert_eq!(body["room_version"], "11");
    // The server is still fine.
    let (status, _) = a.server.send_text(&alice, &room, "z", "still standing").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_server_the_rooms_acl_denies_is_refused_in_everything_about_the_room() {
    let (a, b, alice, bob, room) = two_in_a_room().await;
    let (status, _) = b.server.send_text(&bob, &room, "b0", "before the ACL").await;
    assert_eq!(status, StatusCode::OK);
    wait_for_message(&a, &alice, &room, "before the ACL", &b).await;
    // Both servers are "localhost" to an ACL (it matches hosts, not ports): B is denied.
    a.server
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.server_acl/", enc(&room)),
            &alice.token,
            json!({"allow": ["*"], "deny": ["localhost"], "allow_ip_literals": false}),
        )
        .await;
    // B's PDUs are dropped...
    let (status, _) = b.server.send_text(&bob, &room, "b1", "after the ACL").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = a
        .server
        .send_text(&alice, &room, "a1", "alice after the ACL")
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let seen = bodies(&a, &alice, &room).await;
    assert!(seen.contains(&"before the ACL".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"after the ACL".to_owned()), "{seen:?}");
    // ...and its requests about the room refused.
    let b_key = SigningKey::load(&b.server.dir.path().join("signing.key")).expect("b's key");
    let create = a.server.state(&alice, &room, "m.room.create", "").await;
    assert!(create.is_object());
    let last = a
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    let event_id = last["chunk"][0]["event_id"].as_str().expect("id").to_owned();
    for path in [
        format!(
            "/_matrix/federation/v1/state_ids/{}?event_id={}",
            enc(&room),
            enc(&event_id)
        ),
        format!(
            "/_matrix/federation/v1/backfill/{}?v={}&limit=5",
            enc(&room),
            enc(&event_id)
        ),
        format!(
            "/_matrix/federation/v1/make_join/{}/{}?ver=11",
            enc(&room),
            enc(&format!("@carol:{}", b.name))
        ),
    ] {
        let (status, body) = fed_request(&a, &b_key, &b.name, "GET", &path, None).await;
        assert_eq!(
            (status, errcode(&body)),
            (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            "{path}: {body}"
        );
    }
}

#[tokio::test]
async fn a_synapse_user_joining_a_bridged_alias_makes_the_service_create_it_and_the_service_hears_them() {
    use std::sync::{Arc, Mutex};

    use crate::fake_as::{FakeAs, Registration, config_files_yaml, write_registrations};
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let fake = FakeAs::start().await;
    let reg = Registration::new("logger", Some(fake.url.as_str()))
        .sender("logbot")
        .aliases("#logged_.*", true);
    let (_dir, paths) = write_registrations(&[("logger.yaml", reg.yaml().as_str())]);
    let ours = Peer::switchboard(&config_files_yaml(&paths)).await;
    let created: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let (base, token, created) = (ours.server.base.clone(), reg.as_token.clone(), created.clone());
        fake.on_room_query(move |alias: String| {
            crate::appservice::create_room_for_alias(base.clone(), token.clone(), created.clone(), alias)
        });
    }
    let sam = synapse.server.register("sam").await;
    // The room does not exist until Synapse asks this server about the alias.
    let room = join_alias(&synapse, &sam, &format!("#logged_fed:{}", ours.name), &ours).await;
    assert_eq!(
        created.lock().expect("lock").as_deref(),
        Some(room.as_str()),
        "created by the service"
    );
    for i in 0..5 {
        let (status, body) = synapse
            .server
            .send_text(&sam, &room, &format!("s{i}"), &format!("remote line {i}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The service hears the remote user, in order.
    let events = fake
        .wait_for_events(
            |events| crate::appservice::has_body(events, "remote line 4"),
            std::time::Duration::from_secs(30),
        )
        .await;
    let lines: Vec<&str> = events
        .iter()
        .filter(|e| e["sender"] == sam.user_id.as_str())
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(
        lines,
        (0..5).map(|i| format!("remote line {i}")).collect::<Vec<_>>(),
        "{}",
        log_of(&ours)
    );
}

/// Polls the state event `(kind, key)` on `on` until `check` holds (60 s); returns its content.
async fn wait_for_state(
    on: &Peer,
    user: &crate::harness::User,
    room: &str,
    (kind, key): (&str, &str),
    check: impl Fn(&Value) -> bool,
    other: &Peer,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key));
    loop {
        let (status, content) = on.server.call(Method::GET, &path, Some(&user.token), None).await;
        if status == StatusCode::OK && check(&content) {
            return content;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "{kind} {key} on {} never matched ({status}: {content})\n--- {}:\n{}\n--- {}:\n{}",
                on.name,
                on.name,
                log_of(on),
                other.name,
                log_of(other)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn concurrent_state_changes_on_both_sides_converge_to_the_same_state() {
    let (mut a, mut b) = (Peer::switchboard("").await, Peer::switchboard("").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice,
            json!({
                "room_alias_name": "fork", "preset": "public_chat", "name": "Before",
                "power_level_content_override": {"users": {alice.user_id.clone(): 100, bob.user_id.clone(): 100}},
            }),
        )
        .await;
    join_alias(&b, &bob, &format!("#fork:{}", a.name), &a).await;
    wait_for_membership(&a, &alice, &room, &bob.user_id, "join", &b).await;

    // A partition: each side changes state while the other cannot hear it.
    assert!(b.server.terminate().success());
    let put = |peer: &Peer, user: &crate::harness::User, kind: &str, content: Value| {
        let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(&room));
        let (peer, token) = (peer.server.base.clone(), user.token.clone());
        async move {
            let response = reqwest::Client::new()
                .put(format!("{peer}{path}"))
                .bearer_auth(token)
                .json(&content)
                .send()
                .await
                .expect("put state");
            assert!(response.status().is_success(), "{:?}", response.text().await);
        }
    };
    put(&a, &alice, "m.room.name", json!({"name": "Named on A"})).await;
    put(&a, &alice, "m.room.topic", json!({"topic": "topic from A"})).await;
    assert!(a.server.terminate().success());
    b.server.restart().await;
    put(&b, &bob, "m.room.name", json!({"name": "Named on B"})).await;
    put(&b, &bob, "org.example.note", json!({"from": "B"})).await;
    a.server.restart().await;

    // Both sides end with the same resolved state, each branch's unconflicted change kept.
    let name_a = wait_for_state(
        &a,
        &alice,
        &room,
        ("org.example.note", ""),
        |c| c["from"] == "B",
        &b,
    )
    .await;
    assert_eq!(name_a["from"], "B");
    wait_for_state(
        &b,
        &bob,
        &room,
        ("m.room.topic", ""),
        |c| c["topic"] == "topic from A",
        &a,
    )
    .await;
    let name_on_a = a.server.state(&alice, &room, "m.room.name", "").await;
    let name_on_b = b.server.state(&bob, &room, "m.room.name", "").await;
    assert_eq!(
        name_on_a, name_on_b,
        "the two servers resolved the conflict alike"
    );
    // Each side took the other's branch as a fork, not as a continuation.
    for peer in [&a, &b] {
        assert!(
            peer.server.log().contains("state resolved after a fork"),
            "{}",
            log_of(peer)
        );
    }
    assert!(
        name_on_a["name"] == "Named on A" || name_on_a["name"] == "Named on B",
        "{name_on_a}"
    );
    // And the room goes on: each side's next event merges the branches.
    a.server
        .send_text(&alice, &room, "m1", "after the fork, from A")
        .await;
    b.server
        .send_text(&bob, &room, "m2", "after the fork, from B")
        .await;
    wait_for_message(&b, &bob, &room, "after the fork, from A", &a).await;
    wait_for_message(&a, &alice, &room, "after the fork, from B", &b).await;
    let name_on_a = a.server.state(&alice, &room, "m.room.name", "").await;
    let name_on_b = b.server.state(&bob, &room, "m.room.name", "").await;
    assert_eq!(name_on_a, name_on_b);
}

#[tokio::test]
async fn public_rooms_are_listed_over_federation_only_where_allowed() {
    let a = Peer::switchboard("allow_public_rooms_over_federation: true").await;
    let b = Peer::switchboard("").await;
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = a
        .server
        .create_room(
            &alice,
            json!({"preset": "public_chat", "visibility": "public", "name": "Lobby"}),
        )
        .await;
    b.server
        .create_room(
            &bob,
            json!({"preset": "public_chat", "visibility": "public", "name": "Hidden"}),
        )
        .await;
    let list = b
        .server
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/publicRooms?server={}", enc(&a.name)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert!(
        list["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["room_id"] == room.as_str() && r["name"] == "Lobby"),
        "{list}"
    );
    let searched = b
        .server
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/publicRooms?server={}", enc(&a.name)),
            &bob.token,
            json!({"filter": {"generic_search_term": "lob"}}),
        )
        .await;
    assert_eq!(searched["chunk"].as_array().map(Vec::len), Some(1), "{searched}");
    // B does not let other servers list its rooms.
    let (status, body) = a
        .server
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/publicRooms?server={}", enc(&b.name)),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );
}

/// A binary of the workspace, built next to this test's (`cargo build -p <name>`), if it is.
pub(crate) fn workspace_binary(name: &str) -> Option<std::path::PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(name)))
        .filter(|path| path.exists())
}

/// A child process, stopped when dropped (also when a test panics).
pub(crate) struct Process(pub(crate) std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// ngircd on a loopback port.
struct Ngircd {
    _process: Process,
    port: u16,
}

const NGIRCD: &str = "/usr/sbin/ngircd";

impl Ngircd {
    async fn start(dir: &std::path::Path) -> Self {
        let port = crate::harness::free_port();
        let config = dir.join("ngircd.conf");
        std::fs::write(
            &config,
            format!(
                "[Global]\n\tName = irc.test\n\tInfo = test\n\tListen = 127.0.0.1\n\tPorts = {port}\n\
                 \tMotdPhrase = \"test\"\n\tPidFile = {}\n[Limits]\n\tMaxNickLength = 30\n\
                 [Options]\n\tPAM = no\n\tDNS = no\n\tIdent = no\n",
                dir.join("ngircd.pid").display()
            ),
        )
        .expect("ngircd config");
        let process = Process(
            std::process::Command::new(NGIRCD)
                .args(["--nodaemon", "--config"])
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("ngircd"),
        );
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Self {
                    _process: process,
                    port,
                };
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("ngircd does not listen on {port}");
    }
}

/// A service of this workspace (its binary `bin`) registered with a Switchboard peer: the
/// registration is generated first (it names the server), then the server starts with it.
struct ServiceSetup {
    dir: tempfile::TempDir,
    registration: std::path::PathBuf,
    port: u16,
    name: String,
    ours: Peer,
}

impl ServiceSetup {
    async fn new(bin: &std::path::Path, file: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let fed_port = crate::harness::free_port();
        let name = format!("localhost:{fed_port}");
        let port = crate::harness::free_port();
        let registration = dir.path().join(file);
        let generated = std::process::Command::new(bin)
            .arg("generate-registration")
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .args(["--server-name", &name])
            .arg("--output")
            .arg(&registration)
            .output()
            .expect("generate-registration");
        assert!(generated.status.success(), "{generated:?}");
        let ours = Peer::switchboard_on(
            fed_port,
            &crate::fake_as::config_files_yaml(std::slice::from_ref(&registration)),
        )
        .await;
        Self {
            dir,
            registration,
            port,
            name,
            ours,
        }
    }

    /// Starts the service (`command` with its arguments), its stderr in the data directory,
    /// and waits until it says it is ready. Returns the process and a reader of its stderr.
    async fn start(&self, mut command: std::process::Command) -> (Process, impl Fn() -> String + use<>) {
        let stderr = self.dir.path().join("service.stderr");
        let process = Process(
            command
                .current_dir(self.dir.path())
                .env("NO_COLOR", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("service"),
        );
        let log = move || std::fs::read_to_string(&stderr).unwrap_or_default();
        for _ in 0..300 {
            if log().contains("application service ready") {
                return (process, log);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the service did not start: {}", log());
    }
}

/// A person on IRC, on a raw socket.
struct IrcPerson {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    seen: Vec<String>,
}

impl IrcPerson {
    async fn connect(port: u16, nick: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("IRC connection");
        let (read, writer) = stream.into_split();
        let mut person = Self {
            lines: tokio::io::BufReader::new(read).lines(),
            writer,
            seen: Vec::new(),
        };
        person.send(&format!("NICK {nick}")).await;
        person.send(&format!("USER {nick} 0 * :{nick}")).await;
        person.expect(&format!(" 001 {nick} ")).await;
        person
    }

    async fn send(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("IRC write");
    }

    /// Reads lines (answering PINGs) until one contains `needle`.
    async fn expect(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no IRC line with {needle:?}; last: {:?}", self.seen))
                .expect("IRC read")
                .expect("IRC connection open");
            if let Some(rest) = line.strip_prefix("PING") {
                self.send(&format!("PONG{rest}")).await;
            }
            if line.contains(needle) {
                return line;
            }
            self.seen.push(line);
            if self.seen.len() > 20 {
                self.seen.remove(0);
            }
        }
    }
}

#[tokio::test]
async fn a_synapse_user_joins_an_irc_bridged_room_and_talks_with_an_irc_person() {
    let bridge_bin = workspace_binary("switchboard-irc");
    let (Some(bridge_bin), true) = (bridge_bin, std::path::Path::new(NGIRCD).exists()) else {
        skip_without("ngircd (tests/interop/setup.sh irc) or the bridge (cargo build -p switchboard-irc)");
        return;
    };
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let setup = ServiceSetup::new(&bridge_bin, "irc.yaml").await;
    let irc = Ngircd::start(setup.dir.path()).await;
    let (ours, name) = (&setup.ours, &setup.name);
    let config = setup.dir.path().join("irc-bridge.yaml");
    std::fs::write(
        &config,
        format!(
            "homeserver: {{url: \"{}\", domain: \"{name}\"}}\nlisten: 127.0.0.1:{}\n\
             registration: irc.yaml\ndata_dir: irc-state\nnetworks:\n  - {{id: test, name: Test IRC, \
             host: 127.0.0.1, port: {}, bot_nick: MatrixBridge, flood_burst: 20, flood_interval_ms: 50}}\n",
            ours.server.base, setup.port, irc.port
        ),
    )
    .expect("bridge config");
    let mut command = std::process::Command::new(&bridge_bin);
    command.arg("--config").arg(&config);
    let (_bridge, bridge_log) = setup.start(command).await;

    let mut carol = IrcPerson::connect(irc.port, "carol").await;
    carol.send("JOIN #room").await;
    carol.expect(" JOIN").await;
    // A Synapse user joins the channel's alias: the bridge makes the room on the fly.
    let sam = synapse.server.register("sam").await;
    let room = join_alias(&synapse, &sam, &format!("#irc_test_#room:{name}"), ours).await;
    carol.expect("MatrixBridge").await;
    let (status, body) = synapse
        .server
        .send_text(&sam, &room, "s1", "hi from synapse")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let line = carol.expect("PRIVMSG #room :hi from synapse").await;
    assert!(line.starts_with(":sam"), "{line}: {}", bridge_log());
    carol.send("PRIVMSG #room :hello sam, from IRC").await;
    wait_for_message(&synapse, &sam, &room, "hello sam, from IRC", ours).await;
}

#[tokio::test]
async fn joins_through_another_server_are_limited_by_rc_joins_remote() {
    let a = Peer::switchboard("").await;
    let b = Peer::switchboard(
        "rc_joins: {local: {per_second: 1000, burst_count: 1000}, remote: {per_second: 0.001, burst_count: 1}}\n",
    )
    .await;
    let alice = a.server.register("alice").await;
    let (bob, carol) = (b.server.register("bob").await, b.server.register("carol").await);
    for alias in ["one", "two"] {
        a.server
            .create_room(&alice, json!({"room_alias_name": alias, "preset": "public_chat"}))
            .await;
    }
    join_alias(&b, &bob, &format!("#one:{}", a.name), &a).await;
    let (status, body) = b
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&format!("#two:{}", a.name))),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
        "{body}"
    );
    // Joins of rooms this server is in count under `rc_joins.local`.
    let local = b
        .server
        .create_room(&carol, json!({"preset": "public_chat"}))
        .await;
    let (status, body) = b
        .server
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&local)),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_join_through_one_server_reaches_the_rooms_other_servers() {
    let (a, b, c) = (
        Peer::switchboard("").await,
        Peer::switchboard("").await,
        Peer::switchboard("").await,
    );
    let alice = a.server.register("alice").await;
    let (bob, carol) = (b.server.register("bob").await, c.server.register("carol").await);
    let room = a
        .server
        .create_room(
            &alice,
            json!({"room_alias_name": "three", "preset": "public_chat"}),
        )
        .await;
    let alias = format!("#three:{}", a.name);
    join_alias(&b, &bob, &alias, &a).await;
    // Carol joins through A: A sends her join on to B, so B knows C is in the room.
    join_alias(&c, &carol, &alias, &a).await;
    wait_for_membership(&b, &bob, &room, &carol.user_id, "join", &a).await;
    let (status, body) = b.server.send_text(&bob, &room, "b1", "hello carol").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_message(&c, &carol, &room, "hello carol", &b).await;
    let (status, body) = c.server.send_text(&carol, &room, "c1", "hello bob").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_message(&b, &bob, &room, "hello bob", &c).await;
    wait_for_message(&a, &alice, &room, "hello bob", &c).await;
}

#[tokio::test]
async fn a_synapse_user_joins_a_logged_alias_and_the_logging_service_logs_them() {
    let Some(logger_bin) = workspace_binary("switchboard-logger") else {
        skip_without("the logging service (cargo build -p switchboard-logger)");
        return;
    };
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let setup = ServiceSetup::new(&logger_bin, "logger.yaml").await;
    let (ours, name) = (&setup.ours, &setup.name);
    let log = setup.dir.path().join("logged.jsonl");
    let mut command = std::process::Command::new(&logger_bin);
    command
        .arg("--registration")
        .arg(&setup.registration)
        .args(["--homeserver", &ours.server.base, "--server-name", name])
        .args(["--listen", &format!("127.0.0.1:{}", setup.port)])
        .arg("--log-file")
        .arg(&log)
        .arg("--txn-file")
        .arg(setup.dir.path().join("logger-txns"));
    let (_logger, logger_log) = setup.start(command).await;
    // The room does not exist until Synapse asks about the alias; the service creates it.
    let sam = synapse.server.register("sam").await;
    let room = join_alias(&synapse, &sam, &format!("#logged_fed:{name}"), ours).await;
    for i in 0..3 {
        let (status, body) = synapse
            .server
            .send_text(&sam, &room, &format!("s{i}"), &format!("logged line {i}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let logged = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !logged().iter().any(|l| l["content"]["body"] == "logged line 2") {
        assert!(
            std::time::Instant::now() < deadline,
            "not logged: {:?}\n{}",
            logged(),
            logger_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let lines: Vec<(String, String)> = logged()
        .iter()
        .map(|l| {
            (
                l["sender"].as_str().unwrap_or_default().to_owned(),
                l["content"]["body"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = (0..3)
        .map(|i| (sam.user_id.clone(), format!("logged line {i}")))
        .collect();
    assert_eq!(
        lines, expected,
        "each of Sam's lines once, in order, from Synapse"
    );
    assert!(logged().iter().all(|l| l["room_id"] == room.as_str()));
}

#[tokio::test]
async fn a_synapse_user_joins_a_restricted_room_through_a_room_it_is_in() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let alice = ours.server.register("alice").await;
    let lobby = ours
        .server
        .create_room(
            &alice,
            json!({"room_alias_name": "lobby", "preset": "public_chat"}),
        )
        .await;
    let inner = ours
        .server
        .create_room(
            &alice,
            json!({"preset": "private_chat", "initial_state": [{
                "type": "m.room.join_rules", "state_key": "",
                "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": lobby}]}
            }]}),
        )
        .await;
    let join_inner = |user: crate::harness::User| {
        let (synapse, inner, name) = (&synapse, inner.clone(), ours.name.clone());
        async move {
            synapse
                .server
                .call(
                    Method::POST,
                    &format!(
                        "/_matrix/client/v3/join/{}?server_name={}",
                        enc(&inner),
                        enc(&name)
                    ),
                    Some(&user.token),
                    Some(json!({})),
                )
                .await
        }
    };
    // Not in the lobby: refused.
    let stranger = synapse.server.register("stranger").await;
    let (status, body) = join_inner(stranger).await;
    assert_ne!(status, StatusCode::OK, "{body}");
    // In the lobby: Switchboard vouches for the join (Alice may invite) and signs it.
    let sam = synapse.server.register("sam").await;
    join_alias(&synapse, &sam, &format!("#lobby:{}", ours.name), &ours).await;
    let (status, body) = join_inner(sam.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", log_of(&ours));
    wait_for_membership(&ours, &alice, &inner, &sam.user_id, "join", &synapse).await;
    let member = ours
        .server
        .state(&alice, &inner, "m.room.member", &sam.user_id)
        .await;
    assert_eq!(
        member["join_authorised_via_users_server"], alice.user_id,
        "{member}"
    );
    let (status, body) = synapse.server.send_text(&sam, &inner, "s1", "inside").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_message(&ours, &alice, &inner, "inside", &synapse).await;
}

#[tokio::test]
async fn events_that_arrive_out_of_order_page_in_topological_order() {
    let (a, b, alice, bob, room) = two_in_a_room().await;
    let b_key = SigningKey::load(&b.server.dir.path().join("signing.key")).expect("b's key");
    let (first, first_id) = crafted_message(&a, &alice, &room, &bob.user_id, &b_key, "first", |_| {}).await;
    let (second, _) = crafted_message_after(
        &a,
        &alice,
        &room,
        &bob.user_id,
        &b_key,
        "second",
        Some((first_id, 1001)),
        |_| {},
    )
    .await;
    // The second arrives first (B cannot fill the gap: it never stored either), then the first.
    for (pdu, txn) in [(second, "o1"), (first, "o2")] {
        let body = json!({"origin": b.name, "origin_server_ts": 1, "pdus": [pdu], "edus": []});
        let (status, result) = fed_request(
            &a,
            &b_key,
            &b.name,
            "PUT",
            &format!("/_matrix/federation/v1/send/{txn}"),
            Some(&body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{result}");
        assert!(
            result["pdus"]
                .as_object()
                .is_some_and(|r| r.values().all(|v| v == &json!({}))),
            "{result}"
        );
    }
    let (status, _) = a.server.send_text(&alice, &room, "z", "after both").await;
    assert_eq!(status, StatusCode::OK);
    // Stored second, first, after — paged by depth: first, second, after.
    let seen: Vec<String> = bodies(&a, &alice, &room)
        .await
        .into_iter()
        .filter(|t| ["first", "second", "after both"].contains(&t.as_str()))
        .collect();
    assert_eq!(seen, ["first", "second", "after both"]);
}
