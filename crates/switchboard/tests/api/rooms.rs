//! Rooms over HTTP: creation, membership, state, aliases, history.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, enc, errcode};

#[tokio::test]
async fn create_join_by_alias_and_talk() {
    let s = Server::start().await;
    let (alice, bob, carol) = (
        s.register("alice").await,
        s.register("bob").await,
        s.register("carol").await,
    );
    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            &alice.token,
            json!({"room_alias_name": "chat", "name": "Chat", "topic": "Talk", "preset": "public_chat"}),
        )
        .await;
    let room = created["room_id"].as_str().expect("room").to_owned();
    assert_eq!(created["room_alias"], "#chat:localhost");

    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&bob.token),
            Some(json!({"room_alias_name": "chat"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE")
    );

    let joined = s
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc("#chat:localhost")),
            &bob.token,
            json!({}),
        )
        .await;
    assert_eq!(joined["room_id"], room.as_str());
    let (status, sent) = s.send_text(&bob, &room, "t1", "hello").await;
    assert_eq!(status, StatusCode::OK, "{sent}");

    // Not a member: refused by the auth rules.
    let (status, body) = s.send_text(&carol, &room, "t1", "let me in").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    let event = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(sent["event_id"].as_str().expect("id"))
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(event["content"]["body"], "hello");
    assert_eq!(event["sender"], bob.user_id.as_str());
    let (status, _) = s
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(sent["event_id"].as_str().expect("id"))
            ),
            Some(&carol.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let name = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(name, json!({"name": "Chat"}));
    let topic = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(topic, json!({"topic": "Talk"}));

    let joined_rooms = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/joined_rooms",
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(joined_rooms["joined_rooms"], json!([room]));
    let members = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(members["joined"].as_object().expect("map").len(), 2);
    assert_eq!(members["joined"][&alice.user_id]["display_name"], "alice");
    let members = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/members?membership=join", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert_eq!(members["chunk"].as_array().expect("chunk").len(), 2);
}

#[tokio::test]
async fn state_changes_need_power_and_custom_state_keys_round_trip() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;

    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
    let (status, body) = s
        .call(
            Method::PUT,
            &path,
            Some(&bob.token),
            Some(json!({"name": "Bob's"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "power 0 cannot rename"
    );
    let put = s
        .ok(Method::PUT, &path, &alice.token, json!({"name": "Alice's"}))
        .await;
    assert!(put["event_id"].as_str().expect("id").starts_with('$'));

    let custom = format!(
        "/_matrix/client/v3/rooms/{}/state/org.example.thing/some%2Fkey",
        enc(&room)
    );
    s.ok(Method::PUT, &custom, &alice.token, json!({"x": 1})).await;
    assert_eq!(
        s.ok(Method::GET, &custom, &bob.token, Value::Null).await,
        json!({"x": 1})
    );
    let all = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
            &bob.token,
            Value::Null,
        )
        .await;
    assert!(
        all.as_array()
            .expect("list")
            .iter()
            .any(|e| e["type"] == "org.example.thing" && e["state_key"] == "some/key")
    );

    let (status, body) = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.avatar/", enc(&room)),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    let (status, body) = s
        .call(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/1", enc(&room)),
            Some(&bob.token),
            Some(json!([1])),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
}

#[tokio::test]
async fn moderation_is_enforced_and_only_non_members_may_forget() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({})).await;
    let room_path = |action: &str| format!("/_matrix/client/v3/rooms/{}/{action}", enc(&room));

    let (status, body) = s
        .call(
            Method::POST,
            &room_path("join"),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "private room needs an invite"
    );
    s.ok(
        Method::POST,
        &room_path("invite"),
        &alice.token,
        json!({"user_id": bob.user_id}),
    )
    .await;
    s.ok(Method::POST, &room_path("join"), &bob.token, json!({}))
        .await;
    s.ok(
        Method::POST,
        &room_path("kick"),
        &alice.token,
        json!({"user_id": bob.user_id, "reason": "bye"}),
    )
    .await;
    let (status, _) = s.send_text(&bob, &room, "k", "still here?").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    s.ok(
        Method::POST,
        &room_path("ban"),
        &alice.token,
        json!({"user_id": bob.user_id}),
    )
    .await;
    let (status, _) = s
        .call(
            Method::POST,
            &room_path("invite"),
            Some(&alice.token),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "banned users cannot be invited");
    s.ok(
        Method::POST,
        &room_path("unban"),
        &alice.token,
        json!({"user_id": bob.user_id}),
    )
    .await;
    s.ok(Method::POST, &room_path("forget"), &bob.token, json!({}))
        .await;

    let (status, body) = s
        .call(
            Method::POST,
            &room_path("forget"),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
        "joined users cannot forget"
    );
    s.ok(Method::POST, &room_path("leave"), &alice.token, json!({}))
        .await;
    let rooms = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/joined_rooms",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(rooms["joined_rooms"], json!([]));
}

#[tokio::test]
async fn local_aliases_are_added_by_members_and_deleted_only_by_creators_or_admins() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let alias_path = format!("/_matrix/client/v3/directory/room/{}", enc("#extra:localhost"));
    s.ok(Method::PUT, &alias_path, &alice.token, json!({"room_id": room}))
        .await;
    let other_alias = format!("/_matrix/client/v3/directory/room/{}", enc("#bobs:localhost"));
    let (status, body) = s
        .call(
            Method::PUT,
            &other_alias,
            Some(&bob.token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "non-members may not alias a room"
    );
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;
    let (status, body) = s
        .call(
            Method::PUT,
            &alias_path,
            Some(&bob.token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let spaced = format!(
        "/_matrix/client/v3/directory/room/{}",
        enc("#has space:localhost")
    );
    let (status, body) = s
        .call(
            Method::PUT,
            &spaced,
            Some(&alice.token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let resolved = s.call(Method::GET, &alias_path, None, None).await.1;
    assert_eq!(resolved["room_id"], room.as_str());
    assert_eq!(resolved["servers"], json!(["localhost"]));

    let listed = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(listed["aliases"], json!(["#extra:localhost"]));

    let (status, _) = s.call(Method::DELETE, &alias_path, Some(&bob.token), None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "only the creator or a room admin may delete"
    );
    s.ok(Method::DELETE, &alias_path, &alice.token, Value::Null).await;
    let (status, body) = s.call(Method::GET, &alias_path, None, None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    let (status, body) = s
        .call(
            Method::PUT,
            &format!("/_matrix/client/v3/directory/room/{}", enc("#x:elsewhere.org")),
            Some(&alice.token),
            Some(json!({"room_id": room})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
}

#[tokio::test]
async fn rooms_are_made_in_versions_9_to_11_default_to_11_and_refuse_others() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    for version in ["9", "10", "11"] {
        let room = s.create_room(&alice, json!({"room_version": version})).await;
        let create = s
            .ok(
                Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&room)),
                &alice.token,
                Value::Null,
            )
            .await;
        assert_eq!(create["room_version"], version);
    }
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({"room_version": "2"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION")
    );
    let default_room = s.create_room(&alice, json!({})).await;
    let create = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.create/",
                enc(&default_room)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(create["room_version"], "11");
}

#[tokio::test]
async fn create_room_applies_preset_invites_initial_state_and_power_overrides() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s
        .create_room(
            &alice,
            json!({
                "preset": "trusted_private_chat",
                "invite": [bob.user_id],
                "is_direct": true,
                "initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
                "creation_content": {"m.federate": false},
                "power_level_content_override": {"events_default": 10},
            }),
        )
        .await;
    assert_eq!(
        s.state(&alice, &room, "m.room.encryption", "").await["algorithm"],
        "m.megolm.v1.aes-sha2"
    );
    assert_eq!(
        s.state(&alice, &room, "m.room.create", "").await["m.federate"],
        false
    );
    let levels = s.state(&alice, &room, "m.room.power_levels", "").await;
    assert_eq!(levels["events_default"], 10);
    assert_eq!(
        levels["users"][&bob.user_id], 100,
        "trusted_private_chat gives invitees ops"
    );
    assert_eq!(
        s.state(&alice, &room, "m.room.join_rules", "").await["join_rule"],
        "invite"
    );
    let member = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
                enc(&room),
                enc(&bob.user_id)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(member["membership"], "invite");
    assert_eq!(member["is_direct"], true);
}

#[tokio::test]
async fn messages_paginate_both_ways() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    for i in 0..25 {
        s.send_text(&alice, &room, &format!("t{i}"), &format!("m{i}"))
            .await;
    }
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..20 {
        let query = match &from {
            Some(token) => format!("dir=b&limit=10&from={token}"),
            None => "dir=b&limit=10".to_owned(),
        };
        let page = s
            .ok(
                Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/messages?{query}", enc(&room)),
                &alice.token,
                Value::Null,
            )
            .await;
        for event in page["chunk"].as_array().expect("chunk") {
            if event["type"] == "m.room.message" {
                bodies.push(event["content"]["body"].as_str().expect("body").to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);

    let forward = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=5&filter={}",
                enc(&room),
                enc(r#"{"types":["m.room.message"]}"#)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    let chunk = forward["chunk"].as_array().expect("chunk");
    let forward_bodies: Vec<&str> = chunk
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or("<not a message>"))
        .collect();
    assert_eq!(
        forward_bodies,
        ["m0", "m1", "m2", "m3", "m4"],
        "only messages, oldest first"
    );
    assert!(forward["end"].is_string());

    let (status, body) = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=x", enc(&room)),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let (status, body) = s
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&from=garbage",
                enc(&room)
            ),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
}

#[tokio::test]
async fn oversized_event_is_too_large() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let (status, body) = s.send_text(&alice, &room, "big", &"x".repeat(66_000)).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE")
    );
}

#[tokio::test]
async fn redaction_removes_content_everywhere() {
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
    let (_, sent) = s.send_text(&bob, &room, "1", "oops, a secret").await;
    let secret = sent["event_id"].as_str().expect("id").to_owned();
    let (_, mine) = s.send_text(&alice, &room, "2", "alice's words").await;
    let mine = mine["event_id"].as_str().expect("id").to_owned();

    let redact =
        |id: &str, txn: &str| format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(&room), enc(id));
    let (status, body) = s
        .call(
            Method::PUT,
            &redact(&mine, "r0"),
            Some(&bob.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "power 0 cannot redact others"
    );
    let first = s
        .ok(
            Method::PUT,
            &redact(&secret, "r1"),
            &bob.token,
            json!({"reason": "typo"}),
        )
        .await;
    let again = s
        .ok(
            Method::PUT,
            &redact(&secret, "r1"),
            &bob.token,
            json!({"reason": "typo"}),
        )
        .await;
    assert_eq!(first["event_id"], again["event_id"], "idempotent per txn ID");
    s.ok(Method::PUT, &redact(&mine, "r2"), &alice.token, json!({}))
        .await;

    let event = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&secret)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(event["content"], json!({}), "content gone: {event}");
    assert_eq!(
        event["unsigned"]["redacted_because"]["event_id"],
        first["event_id"]
    );
    let page = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    let text = page.to_string();
    assert!(
        !text.contains("oops, a secret") && !text.contains("alice's words"),
        "history serves redacted copies"
    );
    let redaction = page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .find(|e| e["type"] == "m.room.redaction")
        .cloned()
        .expect("redaction");
    assert!(redaction["redacts"].is_string() || redaction["content"]["redacts"].is_string());
}

#[tokio::test]
async fn context_returns_the_window_around_an_event_with_its_state() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"name": "Ctx"})).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        let (_, sent) = s
            .send_text(&alice, &room, &format!("c{i}"), &format!("m{i}"))
            .await;
        ids.push(sent["event_id"].as_str().expect("id").to_owned());
    }
    let context = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
                enc(&room),
                enc(&ids[4])
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(context["event"]["content"]["body"], "m4");
    let before: Vec<&str> = context["events_before"]
        .as_array()
        .expect("before")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    let after: Vec<&str> = context["events_after"]
        .as_array()
        .expect("after")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(before, vec!["m3", "m2"], "newest first");
    assert_eq!(after, vec!["m5", "m6"]);
    assert!(
        context["state"]
            .as_array()
            .expect("state")
            .iter()
            .any(|e| e["type"] == "m.room.name")
    );
    // Paginating on from `end` continues right after the window.
    let end = context["end"].as_str().expect("end");
    let next = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1&from={end}",
                enc(&room)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(next["chunk"][0]["content"]["body"], "m7");
    assert_eq!(
        s.ok(
            Method::GET,
            "/_matrix/client/v3/voip/turnServer",
            &alice.token,
            Value::Null
        )
        .await,
        json!({})
    );
}

#[tokio::test]
async fn public_directory_lists_biggest_first_pages_searches_and_keeps_network_lists_apart() {
    use crate::fake_as::{FakeAs, Registration, start_server};
    let service = FakeAs::start().await;
    let registration = Registration::new("irc", Some(&service.url)).users("@_irc_.*:localhost", true);
    let (s, _files) = start_server(&[&registration]).await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let big = s
        .create_room(
            &alice,
            json!({"visibility": "public", "name": "Rust talk", "topic": "crabs"}),
        )
        .await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&big)),
        &bob.token,
        json!({}),
    )
    .await;
    let small = s
        .create_room(&alice, json!({"visibility": "public", "name": "Quiet"}))
        .await;
    let private = s.create_room(&alice, json!({"name": "Hidden"})).await;

    let listing = s
        .call(Method::GET, "/_matrix/client/v3/publicRooms", None, None)
        .await
        .1;
    let ids: Vec<&str> = listing["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|r| r["room_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![big.as_str(), small.as_str()],
        "biggest first, private rooms absent"
    );
    assert_eq!(listing["chunk"][0]["name"], "Rust talk");
    assert_eq!(listing["chunk"][0]["num_joined_members"], 2);

    let page = s
        .call(Method::GET, "/_matrix/client/v3/publicRooms?limit=1", None, None)
        .await
        .1;
    let next = page["next_batch"].as_str().expect("more");
    let page2 = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/publicRooms?limit=1&since={next}"),
            None,
            None,
        )
        .await
        .1;
    assert_eq!(page2["chunk"][0]["room_id"], small.as_str());

    let search = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            &bob.token,
            json!({"filter": {"generic_search_term": "CRAB"}}),
        )
        .await;
    assert_eq!(search["chunk"].as_array().expect("chunk").len(), 1);

    let visibility = format!("/_matrix/client/v3/directory/list/room/{}", enc(&private));
    assert_eq!(
        s.call(Method::GET, &visibility, None, None).await.1["visibility"],
        "private"
    );
    let (status, _) = s
        .call(
            Method::PUT,
            &visibility,
            Some(&bob.token),
            Some(json!({"visibility": "public"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    s.ok(
        Method::PUT,
        &visibility,
        &alice.token,
        json!({"visibility": "public"}),
    )
    .await;
    assert_eq!(
        s.call(Method::GET, &visibility, None, None).await.1["visibility"],
        "public"
    );

    // A service's network list is separate from the main one, and it cannot touch the main one.
    let network = |room: &str| {
        format!(
            "/_matrix/client/v3/directory/list/appservice/libera/{}",
            enc(room)
        )
    };
    let (status, _) = s
        .call(
            Method::PUT,
            &network(&small),
            Some(&registration.as_token),
            Some(json!({"visibility": "private"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a service cannot delist a main-directory room"
    );
    let bridged = s.create_room(&alice, json!({"name": "Bridged"})).await;
    s.ok(
        Method::PUT,
        &network(&bridged),
        &registration.as_token,
        json!({"visibility": "public"}),
    )
    .await;
    let main = s
        .call(Method::GET, "/_matrix/client/v3/publicRooms", None, None)
        .await
        .1;
    assert!(
        !main.to_string().contains(bridged.as_str()),
        "only in the network list"
    );
    let libera = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            &bob.token,
            json!({"third_party_instance_id": "irc|libera"}),
        )
        .await;
    assert_eq!(libera["chunk"][0]["room_id"], bridged.as_str());
    let all = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            &bob.token,
            json!({"include_all_networks": true}),
        )
        .await;
    assert_eq!(all["chunk"].as_array().expect("chunk").len(), 4);
}

#[tokio::test]
async fn relations_page_and_filter_by_type_and_room_tags_are_set_and_deleted() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let (_, root) = s.send_text(&alice, &room, "root", "thread root").await;
    let root = root["event_id"].as_str().expect("id").to_owned();
    let path = |txn: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(&room)
        )
    };
    s.ok(
        Method::PUT,
        &path("t1"),
        &alice.token,
        json!({"body": "in thread 1", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
    )
    .await;
    s.ok(
        Method::PUT,
        &path("t2"),
        &alice.token,
        json!({"body": "in thread 2", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
    )
    .await;
    s.ok(Method::PUT, &path("e1"), &alice.token, json!({"body": "* edit", "m.new_content": {"body": "edit"}, "m.relates_to": {"rel_type": "m.replace", "event_id": root}})).await;

    let base = format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&root));
    let all = s.ok(Method::GET, &base, &alice.token, Value::Null).await;
    assert_eq!(all["chunk"].as_array().expect("chunk").len(), 3);
    let threads = s
        .ok(
            Method::GET,
            &format!("{base}/m.thread?limit=1"),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(
        threads["chunk"][0]["content"]["body"], "in thread 2",
        "newest first"
    );
    let next = threads["next_batch"].as_str().expect("more");
    let older = s
        .ok(
            Method::GET,
            &format!("{base}/m.thread?limit=1&from={next}"),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(older["chunk"][0]["content"]["body"], "in thread 1");
    let edits = s
        .ok(
            Method::GET,
            &format!("{base}/m.replace/m.room.message"),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(edits["chunk"].as_array().expect("chunk").len(), 1);

    let tag = format!(
        "/_matrix/client/v3/user/{}/rooms/{}/tags/u.work",
        enc(&alice.user_id),
        enc(&room)
    );
    s.ok(Method::PUT, &tag, &alice.token, json!({"order": 0.5})).await;
    let tags = format!(
        "/_matrix/client/v3/user/{}/rooms/{}/tags",
        enc(&alice.user_id),
        enc(&room)
    );
    assert_eq!(
        s.ok(Method::GET, &tags, &alice.token, Value::Null).await["tags"]["u.work"]["order"],
        0.5
    );
    s.ok(Method::DELETE, &tag, &alice.token, Value::Null).await;
    assert_eq!(
        s.ok(Method::GET, &tags, &alice.token, Value::Null).await["tags"],
        json!({})
    );
}

#[tokio::test]
async fn room_upgrade_moves_state_and_aliases() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let old = s
        .create_room(&alice, json!({"room_version": "10", "preset": "public_chat", "name": "Old", "room_alias_name": "moving"}))
        .await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&old)),
        &bob.token,
        json!({}),
    )
    .await;
    let path = format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old));
    let (status, _) = s
        .call(
            Method::POST,
            &path,
            Some(&bob.token),
            Some(json!({"new_version": "11"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "power 0 cannot upgrade");
    let (status, body) = s
        .call(
            Method::POST,
            &path,
            Some(&alice.token),
            Some(json!({"new_version": "1"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION")
    );

    let new = s
        .ok(Method::POST, &path, &alice.token, json!({"new_version": "11"}))
        .await["replacement_room"]
        .as_str()
        .expect("replacement")
        .to_owned();
    let create = s.state(&alice, &new, "m.room.create", "").await;
    assert_eq!(create["room_version"], "11");
    assert_eq!(create["predecessor"]["room_id"], old.as_str());
    assert_eq!(s.state(&alice, &new, "m.room.name", "").await["name"], "Old");
    assert_eq!(
        s.state(&alice, &new, "m.room.join_rules", "").await["join_rule"],
        "public"
    );
    let tombstone = s.state(&alice, &old, "m.room.tombstone", "").await;
    assert_eq!(tombstone["replacement_room"], new.as_str());
    let resolved = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/directory/room/{}", enc("#moving:localhost")),
            None,
            None,
        )
        .await
        .1;
    assert_eq!(resolved["room_id"], new.as_str(), "the alias moved");
    let (status, _) = s.send_text(&bob, &old, "late", "anyone here?").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the old room is read-only for ordinary members"
    );
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&new)),
        &bob.token,
        json!({}),
    )
    .await;
}

#[tokio::test]
async fn a_sent_event_is_readable_at_once() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    // Read-your-writes: the answer to a send comes only once the event is announced.
    for i in 0..30 {
        let (_, sent) = s
            .send_text(&alice, &room, &format!("ryw{i}"), &format!("n{i}"))
            .await;
        let page = s
            .ok(
                Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room)),
                &alice.token,
                Value::Null,
            )
            .await;
        assert_eq!(page["chunk"][0]["event_id"], sent["event_id"], "round {i}");
    }
}

/// ruma knows some unstable types under their stable names; the event keeps the type it was
/// sent with, and a retried send of it is still recognised as the same transaction.
#[tokio::test]
async fn unstable_event_types_are_kept_as_sent() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let kind = "org.matrix.call.sdp_stream_metadata_changed";
    let path = format!("/_matrix/client/v3/rooms/{}/send/{kind}/t1", enc(&room));
    let content = json!({"call_id": "c1", "sdp_stream_metadata": {}});
    let first = s.ok(Method::PUT, &path, &alice.token, content.clone()).await;
    let again = s.ok(Method::PUT, &path, &alice.token, content).await;
    assert_eq!(
        first["event_id"], again["event_id"],
        "the retry is the same transaction"
    );
    let event_id = first["event_id"].as_str().expect("event_id");
    let event = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(event_id)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(event["type"], kind);
    let sync = s.sync(&alice, "").await;
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline");
    assert!(
        timeline.iter().any(|e| e["type"] == kind),
        "sync shows the type as sent: {timeline:?}"
    );
}

#[tokio::test]
async fn nul_in_a_path_is_refused_and_breaks_nothing() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    for path in [
        format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/a%00b",
            enc(&room)
        ),
        format!("/_matrix/client/v3/rooms/{}/send/m.room%00.message/t", enc(&room)),
        format!("/_matrix/client/v3/rooms/{}/state/m.room.name/%00", enc(&room)),
    ] {
        let (status, body) = s
            .call(
                Method::PUT,
                &path,
                Some(&alice.token),
                Some(json!({"body": "x", "name": "x"})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(errcode(&body), "M_INVALID_PARAM");
    }
    let (status, _) = s.send_text(&alice, &room, "after", "still fine").await;
    assert_eq!(status, StatusCode::OK);
}
