//! Pipeline tests against a real (temporary) store: hashing, signing, event IDs and auth rules.

use std::sync::Arc;

use ruma::{
    CanonicalJsonValue, OwnedRoomAliasId, OwnedUserId, UserId,
    signatures::{PublicKeyMap, PublicKeySet, Verified, reference_hash, verify_event},
};
use serde_json::json;
use switchboard_store::Store;

use super::*;
use crate::{keys::SigningKey, stream::EventStream};

struct Fixture {
    _dir: switchboard_store::testing::TestDatabase,
    rooms: Arc<Rooms>,
    key: Arc<SigningKey>,
}

async fn fixture() -> Fixture {
    let dir = switchboard_store::testing::TestDatabase::create().await;
    let store = Store::open(&dir.settings()).await.expect("store");
    let key = Arc::new(SigningKey::parse(&crate::keys::generate_key_file_contents(), "test").expect("key"));
    let stream = EventStream::start(store.clone(), 0, 0);
    let rooms = Arc::new(Rooms::new(
        store,
        "example.org".try_into().expect("name"),
        key.clone(),
        stream,
        "11".into(),
    ));
    Fixture {
        _dir: dir,
        rooms,
        key,
    }
}

async fn registered(f: &Fixture, name: &str) -> OwnedUserId {
    let id = user(name);
    let row = switchboard_store::NewUser {
        user_id: id.as_str(),
        password_hash: None,
        is_admin: false,
        appservice_id: None,
        created_ts: 0,
    };
    f.rooms.store().create_user(&row).await.expect("user");
    id
}

fn user(name: &str) -> OwnedUserId {
    OwnedUserId::try_from(format!("@{name}:example.org")).expect("user id")
}

async fn room(f: &Fixture, creator: &UserId, request: CreateRoom) -> OwnedRoomId {
    f.rooms
        .create_room(creator, Some("name"), request)
        .await
        .expect("room created")
        .0
}

fn forbidden<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Err(Error::Forbidden(reason)) => reason,
        other => panic!("expected M_FORBIDDEN, got {other:?}"),
    }
}

#[tokio::test]
async fn events_are_hashed_signed_and_named_by_reference_hash() {
    let f = fixture().await;
    let alice = user("alice");
    let room_id = room(&f, &alice, CreateRoom::default()).await;
    let pdu = f
        .rooms
        .send(
            &room_id,
            &alice,
            EventDraft::message("m.room.message", json!({"body": "hi"})),
            None,
        )
        .await
        .expect("sent");

    let value: serde_json::Value = serde_json::from_str(&pdu.json).expect("json");
    let CanonicalJsonValue::Object(object) = CanonicalJsonValue::try_from(value).expect("canonical") else {
        panic!("not an object")
    };
    let version = RoomVersion::parse("11").expect("v11");
    assert_eq!(
        format!("${}", reference_hash(&object, &version.rules).expect("hash")),
        pdu.event_id.as_str()
    );

    let public = ruma::serde::Base64::new(f.key.key_pair.public_key().to_vec());
    let mut keys = PublicKeySet::new();
    keys.insert(format!("ed25519:{}", f.key.key_pair.version()), public);
    let mut key_map = PublicKeyMap::new();
    key_map.insert("example.org".to_owned(), keys);
    assert_eq!(
        verify_event(&key_map, &object, &version.rules).expect("verifies"),
        Verified::All
    );

    assert_eq!(pdu.prev_events.len(), 1, "each event follows the room's head");
    assert_eq!(
        pdu.auth_events.len(),
        3,
        "create, power levels, sender's membership"
    );
}

#[tokio::test]
async fn stream_positions_are_gap_free_even_when_events_are_rejected() {
    let f = fixture().await;
    let (alice, mallory) = (user("alice"), user("mallory"));
    let room_id = room(&f, &alice, CreateRoom::default()).await;
    let before = f.rooms.store().max_stream_pos().await.expect("max");
    forbidden(
        f.rooms
            .send(
                &room_id,
                &mallory,
                EventDraft::message("m.room.message", json!({"body": "x"})),
                None,
            )
            .await,
    );
    let next = f
        .rooms
        .send(
            &room_id,
            &alice,
            EventDraft::message("m.room.message", json!({"body": "y"})),
            None,
        )
        .await
        .expect("sent");
    assert_eq!(next.stream_pos, before + 1);
}

#[tokio::test]
async fn auth_rules_govern_membership_and_power() {
    let f = fixture().await;
    let (alice, bob, carol) = (user("alice"), registered(&f, "bob").await, user("carol"));
    let private = room(&f, &alice, CreateRoom::default()).await;
    forbidden(f.rooms.join(&private, &bob, None).await);
    f.rooms
        .invite(&private, &alice, &bob, None, false)
        .await
        .expect("invite");
    f.rooms
        .join(&private, &bob, None)
        .await
        .expect("invited user joins");

    // Bob has power 0: he may talk, but not rename the room or change power levels.
    f.rooms
        .send(
            &private,
            &bob,
            EventDraft::message("m.room.message", json!({"body": "hi"})),
            None,
        )
        .await
        .expect("talk");
    forbidden(
        f.rooms
            .send(
                &private,
                &bob,
                EventDraft::state("m.room.name", "", json!({"name": "mine"})),
                None,
            )
            .await,
    );
    forbidden(
        f.rooms
            .send(
                &private,
                &bob,
                EventDraft::state("m.room.power_levels", "", json!({"users": {bob.as_str(): 100}})),
                None,
            )
            .await,
    );
    forbidden(f.rooms.kick(&private, &bob, &alice, None).await);

    let public = room(
        &f,
        &alice,
        CreateRoom {
            preset: Some("public_chat".into()),
            ..Default::default()
        },
    )
    .await;
    f.rooms
        .join(&public, &carol, None)
        .await
        .expect("anyone joins a public room");
    f.rooms
        .ban(&public, &alice, &carol, Some("spam"))
        .await
        .expect("ban");
    assert_eq!(
        f.rooms.membership(&public, &carol).await.expect("m").as_deref(),
        Some("ban")
    );
    forbidden(f.rooms.join(&public, &carol, None).await);
    f.rooms.unban(&public, &alice, &carol, None).await.expect("unban");
    f.rooms
        .join(&public, &carol, None)
        .await
        .expect("rejoin after unban");
}

#[tokio::test]
async fn older_room_versions_carry_creator() {
    let f = fixture().await;
    let alice = user("alice");
    for version in ["9", "10"] {
        let room_id = room(
            &f,
            &alice,
            CreateRoom {
                room_version: Some(version.into()),
                ..Default::default()
            },
        )
        .await;
        let create = f
            .rooms
            .state_event(&room_id, &StateEventType::RoomCreate, "")
            .await
            .expect("s")
            .expect("create");
        assert_eq!(create.content_value()["creator"], alice.as_str());
        assert_eq!(create.content_value()["room_version"], version);
    }
    assert!(matches!(
        f.rooms
            .create_room(
                &alice,
                None,
                CreateRoom {
                    room_version: Some("1".into()),
                    ..Default::default()
                }
            )
            .await,
        Err(Error::UnsupportedRoomVersion(_))
    ));
}

#[tokio::test]
async fn oversized_events_are_refused() {
    let f = fixture().await;
    let alice = user("alice");
    let room_id = room(&f, &alice, CreateRoom::default()).await;
    let body = "x".repeat(70_000);
    let result = f
        .rooms
        .send(
            &room_id,
            &alice,
            EventDraft::message("m.room.message", json!({"body": body})),
            None,
        )
        .await;
    assert!(matches!(result, Err(Error::TooLarge(_))), "{result:?}");
}

#[tokio::test]
async fn state_survives_a_cold_cache() {
    let f = fixture().await;
    let alice = user("alice");
    let room_id = room(
        &f,
        &alice,
        CreateRoom {
            name: Some("Cold".into()),
            ..Default::default()
        },
    )
    .await;
    // A second service over the same store sees the room as a restarted server would.
    let stream = EventStream::start(
        f.rooms.store().clone(),
        f.rooms.store().max_stream_pos().await.expect("max"),
        0,
    );
    let restarted = Arc::new(Rooms::new(
        f.rooms.store().clone(),
        "example.org".try_into().expect("n"),
        f.key.clone(),
        stream,
        "11".into(),
    ));
    let name = restarted
        .state_event(&room_id, &StateEventType::RoomName, "")
        .await
        .expect("s")
        .expect("name");
    assert_eq!(name.content_value()["name"], "Cold");
    let head_before = f
        .rooms
        .store()
        .room_head(room_id.as_str())
        .await
        .expect("head")
        .expect("some");
    let pdu = restarted
        .send(
            &room_id,
            &alice,
            EventDraft::message("m.room.message", json!({"body": "again"})),
            None,
        )
        .await
        .expect("send");
    assert_eq!(pdu.prev_events[0].as_str(), head_before.0);
}

async fn say(f: &Fixture, room: &RoomId, who: &UserId, body: &str) -> Arc<Pdu> {
    f.rooms
        .send(
            room,
            who,
            EventDraft::message("m.room.message", json!({ "body": body })),
            None,
        )
        .await
        .expect("sent")
}

async fn readable(f: &Fixture, room: &RoomId, who: &UserId) -> Vec<String> {
    let page = f
        .rooms
        .messages(
            room,
            who,
            None,
            None,
            Direction::Forward,
            100,
            &Default::default(),
        )
        .await
        .expect("messages");
    page.chunk
        .iter()
        .filter_map(|e| e.content_value()["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn shared_and_joined_history_visibility_show_only_their_windows() {
    let f = fixture().await;
    let alice = user("alice");
    let bob = registered(&f, "bob").await;
    let room_id = room(
        &f,
        &alice,
        CreateRoom {
            preset: Some("public_chat".into()),
            ..Default::default()
        },
    )
    .await;
    say(&f, &room_id, &alice, "before invite").await;
    f.rooms
        .invite(&room_id, &alice, &bob, None, false)
        .await
        .expect("invite");
    forbidden(
        f.rooms
            .messages(
                &room_id,
                &bob,
                None,
                None,
                Direction::Forward,
                10,
                &Default::default(),
            )
            .await
            .map(|p| p.chunk.len()),
    );
    f.rooms.join(&room_id, &bob, None).await.expect("join");
    assert_eq!(
        readable(&f, &room_id, &bob).await,
        vec!["before invite"],
        "shared: all history once joined"
    );
    say(&f, &room_id, &alice, "while joined").await;
    f.rooms.ban(&room_id, &alice, &bob, None).await.expect("ban");
    say(&f, &room_id, &alice, "while banned").await;
    f.rooms.unban(&room_id, &alice, &bob, None).await.expect("unban");
    // Out of the room, Synapse's `shared` rule shows only what was said while they were joined.
    assert_eq!(
        readable(&f, &room_id, &bob).await,
        vec!["while joined"],
        "nothing said while banned, nor before joining"
    );

    let joined_only = room(
        &f,
        &alice,
        CreateRoom {
            preset: Some("public_chat".into()),
            ..Default::default()
        },
    )
    .await;
    f.rooms
        .send(
            &joined_only,
            &alice,
            EventDraft::state(
                "m.room.history_visibility",
                "",
                json!({"history_visibility": "joined"}),
            ),
            None,
        )
        .await
        .expect("visibility");
    say(&f, &joined_only, &alice, "secret").await;
    f.rooms.join(&joined_only, &bob, None).await.expect("join");
    say(&f, &joined_only, &alice, "public").await;
    assert_eq!(readable(&f, &joined_only, &bob).await, vec!["public"]);
}

#[tokio::test]
async fn failed_create_room_leaves_nothing() {
    let f = fixture().await;
    let alice = user("alice");
    let before = f.rooms.store().max_stream_pos().await.expect("max");
    let bad = CreateRoom {
        room_alias_name: Some("taken-later".into()),
        // Alice would drop her own power below what the following events need.
        power_level_content_override: Some(
            json!({"users": {}, "state_default": 100})
                .as_object()
                .expect("object")
                .clone(),
        ),
        ..Default::default()
    };
    forbidden(f.rooms.create_room(&alice, None, bad).await);
    assert_eq!(
        f.rooms.store().max_stream_pos().await.expect("max"),
        before,
        "no event stored"
    );
    assert!(f.rooms.joined_rooms(&alice).await.expect("rooms").is_empty());
    let alias = OwnedRoomAliasId::try_from("#taken-later:example.org").expect("alias");
    assert!(
        f.rooms
            .store()
            .alias(alias.as_str())
            .await
            .expect("alias")
            .is_none(),
        "alias released"
    );
    forbidden_or_not_found(
        f.rooms
            .invite(
                &room(&f, &alice, CreateRoom::default()).await,
                &alice,
                &user("ghost"),
                None,
                false,
            )
            .await,
    );
}

fn forbidden_or_not_found<T: std::fmt::Debug>(result: Result<T>) {
    assert!(
        matches!(result, Err(Error::NotFound(_))),
        "inviting an unknown user: {result:?}"
    );
}

#[tokio::test]
async fn txn_ids_are_scoped_to_room_and_type() {
    let f = fixture().await;
    let alice = user("alice");
    let (one, two) = (
        room(&f, &alice, CreateRoom::default()).await,
        room(&f, &alice, CreateRoom::default()).await,
    );
    let draft = || EventDraft::message("m.room.message", json!({"body": "x"}));
    let a = f
        .rooms
        .send(&one, &alice, draft(), Some(("DEV", "T1")))
        .await
        .expect("a");
    let again = f
        .rooms
        .send(&one, &alice, draft(), Some(("DEV", "T1")))
        .await
        .expect("again");
    let b = f
        .rooms
        .send(&two, &alice, draft(), Some(("DEV", "T1")))
        .await
        .expect("b");
    assert_eq!(a.event_id, again.event_id);
    assert_ne!(a.event_id, b.event_id);
    assert_eq!(b.room_id, two);
}
