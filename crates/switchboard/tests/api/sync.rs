//! `/sync`: initial and incremental, long-poll wake-up, limits, filters, invites and leaves.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, enc, errcode};

fn timeline(sync: &Value, section: &str, room: &str) -> Vec<Value> {
    sync["rooms"][section][room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn long_poll_wakes_at_once() {
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
        .expect("token")
        .to_owned();

    let waiting = {
        let base = s.base.clone();
        let token = bob.token.clone();
        let since = since.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body: Value = reqwest::Client::new()
                .get(format!(
                    "{base}/_matrix/client/v3/sync?since={since}&timeout=20000"
                ))
                .bearer_auth(token)
                .send()
                .await
                .expect("sync")
                .json()
                .await
                .expect("json");
            (body, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_at = Instant::now();
    s.send_text(&alice, &room, "1", "wake up").await;
    let (body, elapsed) = waiting.await.expect("task");
    assert_eq!(bodies(&timeline(&body, "join", &room)), vec!["wake up"]);
    assert!(
        elapsed < Duration::from_secs(5),
        "the sync returned because of the event, not the timeout"
    );
    assert!(
        sent_at.elapsed() < Duration::from_secs(1),
        "delivered within a second of sending"
    );

    // Nothing new: the long-poll times out with an empty answer and the same position.
    let next = body["next_batch"].as_str().expect("next").to_owned();
    let started = Instant::now();
    let empty = s.sync(&bob, &format!("since={next}&timeout=300")).await;
    assert!(started.elapsed() >= Duration::from_millis(290));
    assert_eq!(empty["next_batch"], next.as_str());
    assert!(empty["rooms"]["join"].as_object().expect("join").is_empty());
}

#[tokio::test]
async fn a_limited_incremental_sync_shows_the_newest_and_prev_batch_fills_the_gap() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"name": "Named"})).await;
    let first = s.sync(&alice, "").await;
    let initial_state = first["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .expect("state")
        .clone();
    let initial_timeline = timeline(&first, "join", &room);
    let state_types: Vec<&str> = initial_state
        .iter()
        .chain(initial_timeline.iter())
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        state_types.contains(&"m.room.create") && state_types.contains(&"m.room.name"),
        "{state_types:?}"
    );
    let since = first["next_batch"].as_str().expect("token").to_owned();

    for i in 0..15 {
        s.send_text(&alice, &room, &format!("t{i}"), &format!("m{i}"))
            .await;
    }
    let filter = enc(r#"{"room":{"timeline":{"limit":5}}}"#);
    let next = s.sync(&alice, &format!("since={since}&filter={filter}")).await;
    let section = &next["rooms"]["join"][&room];
    assert_eq!(section["timeline"]["limited"], true);
    assert_eq!(
        bodies(&timeline(&next, "join", &room)),
        vec!["m10", "m11", "m12", "m13", "m14"]
    );
    let txn_ids: Vec<&str> = timeline(&next, "join", &room)
        .iter()
        .filter_map(|e| e["unsigned"]["transaction_id"].as_str())
        .map(|_| "x")
        .collect();
    assert_eq!(txn_ids.len(), 5, "the sending device sees its transaction IDs");

    // The gap is filled from prev_batch with /messages.
    let prev = section["timeline"]["prev_batch"].as_str().expect("prev_batch");
    let page = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10&from={prev}",
                enc(&room)
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    let older = bodies(page["chunk"].as_array().expect("chunk"));
    assert_eq!(older, (0..10).rev().map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn stored_filters_are_private_and_lazy_loading_sends_only_timeline_senders() {
    let s = Server::start().await;
    let (alice, bob, carol) = (
        s.register("alice").await,
        s.register("bob").await,
        s.register("carol").await,
    );
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    for user in [&bob, &carol] {
        s.ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            &user.token,
            json!({}),
        )
        .await;
    }
    for i in 0..12 {
        s.send_text(&bob, &room, &format!("b{i}"), "from bob").await;
    }
    let filter = json!({"room": {"timeline": {"limit": 5, "types": ["m.room.message"]}, "state": {"lazy_load_members": true}}});
    let created = s
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id)),
            &alice.token,
            filter.clone(),
        )
        .await;
    let id = created["filter_id"].as_str().expect("filter_id");
    let stored = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/user/{}/filter/{id}", enc(&alice.user_id)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(stored["room"]["timeline"]["limit"], 5);
    let (status, body) = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/user/{}/filter/{id}", enc(&alice.user_id)),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    let sync = s.sync(&alice, &format!("filter={id}")).await;
    let section = &sync["rooms"]["join"][&room];
    let messages = timeline(&sync, "join", &room);
    assert!(
        messages.iter().all(|e| e["type"] == "m.room.message"),
        "only messages"
    );
    assert_eq!(bodies(&messages), vec!["from bob"; 5], "the newest five");
    let members: Vec<&str> = section["state"]["events"]
        .as_array()
        .expect("state")
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    assert!(
        members.contains(&bob.user_id.as_str()),
        "the timeline's sender is loaded"
    );
    assert!(
        !members.contains(&carol.user_id.as_str()),
        "silent members are not: {members:?}"
    );
    assert_eq!(section["summary"]["m.joined_member_count"], 3);
}

#[tokio::test]
async fn invites_carry_stripped_state_and_a_kicked_user_sees_nothing_after_the_kick() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"name": "Secret"})).await;
    let since = s.sync(&bob, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        &alice.token,
        json!({"user_id": bob.user_id}),
    )
    .await;

    let sync = s.sync(&bob, &format!("since={since}&timeout=5000")).await;
    let invite_state = sync["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .expect("invite_state");
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Secret")
    );
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
    );

    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;
    let since = sync["next_batch"].as_str().expect("t").to_owned();
    let sync = s.sync(&bob, &format!("since={since}&timeout=5000")).await;
    assert!(
        sync["rooms"]["join"].get(&room).is_some(),
        "joined room appears with its state"
    );

    let since = sync["next_batch"].as_str().expect("t").to_owned();
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
        &alice.token,
        json!({"user_id": bob.user_id}),
    )
    .await;
    let (status, _) = s.send_text(&alice, &room, "after", "not for bob").await;
    assert_eq!(status, StatusCode::OK, "the message bob must not see exists");
    let sync = s.sync(&bob, &format!("since={since}&timeout=5000")).await;
    let left = timeline(&sync, "leave", &room);
    assert!(
        left.iter()
            .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave")
    );
    assert!(bodies(&left).is_empty(), "nothing after the kick is shown to bob");
    assert!(sync["rooms"]["join"].get(&room).is_none());
}
