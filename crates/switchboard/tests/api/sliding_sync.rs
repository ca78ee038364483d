//! Simplified sliding sync (MSC4186) over plain HTTP: lists by recency, incremental answers,
//! long-polls, required state, subscriptions, extensions and the errors for bad requests.
//! (matrix-rust-sdk drives it as Element X does in `crates/element-x-tests`.)

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, User, enc, errcode};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn sliding(s: &Server, user: &User, query: &str, body: Value) -> Value {
    s.ok(Method::POST, &format!("{PATH}?{query}"), &user.token, body)
        .await
}

async fn send(s: &Server, user: &User, room: &str, txn: &str, body: &str) -> String {
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
        &user.token,
        json!({ "msgtype": "m.text", "body": body }),
    )
    .await["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned()
}

fn rooms_of(answer: &Value) -> Vec<String> {
    let mut rooms: Vec<String> = answer["rooms"]
        .as_object()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    rooms.sort();
    rooms
}

fn sorted(mut rooms: Vec<String>) -> Vec<String> {
    rooms.sort();
    rooms
}

#[tokio::test]
async fn lists_follow_activity_and_later_answers_carry_only_what_changed() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let versions = s
        .ok(Method::GET, "/_matrix/client/versions", &alice.token, json!({}))
        .await;
    assert_eq!(
        versions["unstable_features"]["org.matrix.simplified_msc3575"],
        true
    );

    // Five rooms; each gets a message in turn, so the last is the most recent.
    let mut rooms = Vec::new();
    for i in 0..5 {
        let room = s
            .create_room(
                &bob,
                json!({ "preset": "public_chat", "name": format!("room {i}") }),
            )
            .await;
        s.ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            &alice.token,
            json!({}),
        )
        .await;
        rooms.push(room);
    }
    for (i, room) in rooms.iter().enumerate() {
        send(&s, &bob, room, &format!("m{i}"), &format!("hello {i}")).await;
    }
    let request = json!({
        "lists": { "all": {
            "ranges": [[0, 2]],
            "timeline_limit": 2,
            "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"], ["m.room.create", ""]],
        } },
        "extensions": { "e2ee": { "enabled": true }, "to_device": { "enabled": true },
                        "account_data": { "enabled": true }, "receipts": { "enabled": true },
                        "typing": { "enabled": true } },
    });
    let first = sliding(&s, &alice, "", request.clone()).await;
    assert_eq!(first["lists"]["all"]["count"], 5, "{first}");
    assert_eq!(
        rooms_of(&first),
        sorted(rooms[2..].to_vec()),
        "the three most recent"
    );
    let top = &first["rooms"][&rooms[4]];
    assert_eq!(top["initial"], true);
    assert_eq!(top["name"], "room 4");
    assert_eq!(top["joined_count"], 2);
    assert_eq!(top["notification_count"], 1, "{top}");
    let timeline = top["timeline"].as_array().expect("timeline");
    assert_eq!(timeline.len(), 2);
    assert_eq!(timeline[1]["content"]["body"], "hello 4");
    assert_eq!(top["limited"], true);
    assert!(top["prev_batch"].as_str().is_some());
    let bump_4 = top["bump_stamp"].as_i64().expect("bump_stamp");
    let bump_2 = first["rooms"][&rooms[2]]["bump_stamp"]
        .as_i64()
        .expect("bump_stamp");
    assert!(bump_4 > bump_2, "recency order: {bump_4} > {bump_2}");
    // Required state: the name, the create event, the members the timeline needs ($LAZY: bob;
    // alice's own not, as she sent nothing there).
    let state: Vec<(String, String)> = top["required_state"]
        .as_array()
        .expect("required_state")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["state_key"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        state.contains(&("m.room.name".into(), String::new())),
        "{state:?}"
    );
    assert!(
        state.contains(&("m.room.member".into(), bob.user_id.clone())),
        "{state:?}"
    );
    assert!(
        !state.iter().any(|(t, _)| t == "m.room.power_levels"),
        "{state:?}"
    );
    assert!(
        first["extensions"]["e2ee"]["device_one_time_keys_count"].is_object(),
        "{first}"
    );
    let pos = first["pos"].as_str().expect("pos").to_owned();

    // Room 0 becomes the most recent: it enters the range (initial), nothing else is sent.
    send(&s, &bob, &rooms[0], "n0", "back on top").await;
    let second = sliding(&s, &alice, &format!("pos={pos}&timeout=5000"), request.clone()).await;
    assert_eq!(rooms_of(&second), [rooms[0].clone()], "{second}");
    assert_eq!(second["rooms"][&rooms[0]]["initial"], true);
    let pos2 = second["pos"].as_str().expect("pos").to_owned();

    // A message in a room already sent: only the new event, not initial, live.
    send(&s, &bob, &rooms[4], "n4", "more").await;
    let third = sliding(&s, &alice, &format!("pos={pos2}&timeout=5000"), request.clone()).await;
    assert_eq!(rooms_of(&third), [rooms[4].clone()], "{third}");
    let room = &third["rooms"][&rooms[4]];
    assert!(room.get("initial").is_none(), "{room}");
    assert_eq!(room["timeline"].as_array().map(Vec::len), Some(1));
    assert_eq!(room["num_live"], 1);
    assert_eq!(room["notification_count"], 2);
    let pos3 = third["pos"].as_str().expect("pos").to_owned();

    // Repeating an older pos (an answer lost) gives that answer again.
    let again = sliding(&s, &alice, &format!("pos={pos2}&timeout=0"), request.clone()).await;
    assert_eq!(rooms_of(&again), [rooms[4].clone()]);

    // Nothing new: the long-poll waits, and a message wakes it.
    let started = Instant::now();
    let quiet = sliding(&s, &alice, &format!("pos={pos3}&timeout=700"), request.clone()).await;
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "answered at once: {quiet}"
    );
    assert_eq!(rooms_of(&quiet), Vec::<String>::new());
    let pos4 = quiet["pos"].as_str().expect("pos").to_owned();
    let waiter = {
        let (base, token, request) = (s.base.clone(), alice.token.clone(), request.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let answer: Value = reqwest::Client::new()
                .post(format!("{base}{PATH}?pos={pos4}&timeout=20000"))
                .bearer_auth(token)
                .json(&request)
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            (started.elapsed(), answer)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&s, &bob, &rooms[3], "w3", "wake up").await;
    let (took, woken) = waiter.await.expect("task");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(rooms_of(&woken).contains(&rooms[3]), "{woken}");

    // A read receipt resets the counts: the room comes again with them.
    let pos5 = woken["pos"].as_str().expect("pos").to_owned();
    let last = send(&s, &bob, &rooms[4], "r4", "read me").await;
    let pos6 = sliding(&s, &alice, &format!("pos={pos5}&timeout=5000"), request.clone()).await["pos"]
        .as_str()
        .expect("pos")
        .to_owned();
    s.ok(
        Method::POST,
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&rooms[4]),
            enc(&last)
        ),
        &alice.token,
        json!({}),
    )
    .await;
    let read = sliding(&s, &alice, &format!("pos={pos6}&timeout=5000"), request.clone()).await;
    assert_eq!(read["rooms"][&rooms[4]]["notification_count"], 0, "{read}");
    assert!(
        read["extensions"]["receipts"]["rooms"][&rooms[4]].is_object(),
        "{read}"
    );
}

#[tokio::test]
async fn subscriptions_wildcards_filters_and_invites() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let plain = s.create_room(&alice, json!({ "name": "plain" })).await;
    let space = s
        .create_room(
            &alice,
            json!({ "name": "a space", "creation_content": { "type": "m.space" } }),
        )
        .await;
    let invite = s
        .create_room(&bob, json!({ "name": "invited", "invite": [alice.user_id] }))
        .await;
    s.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.space.child/{}",
            enc(&space),
            enc(&plain)
        ),
        &alice.token,
        json!({ "via": ["localhost"] }),
    )
    .await;

    let answer = sliding(
        &s,
        &alice,
        "",
        json!({
            "lists": {
                "rooms": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "not_room_types": ["m.space"], "is_invite": false } },
                "invites": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "is_invite": true } },
                "in_space": { "ranges": [[0, 9]], "timeline_limit": 1, "filters": { "spaces": [space] } },
            },
            "room_subscriptions": { space.clone(): { "timeline_limit": 0, "required_state": [["*", "*"]] } },
        }),
    )
    .await;
    assert_eq!(answer["lists"]["rooms"]["count"], 1, "{answer}");
    assert_eq!(answer["lists"]["invites"]["count"], 1, "{answer}");
    assert_eq!(
        answer["lists"]["in_space"]["count"], 1,
        "the space's one child: {answer}"
    );
    let got = rooms_of(&answer);
    assert_eq!(got, sorted(vec![plain.clone(), space.clone(), invite.clone()]));
    // The subscription's wildcard brings all of the space's state.
    let space_state = answer["rooms"][&space]["required_state"]
        .as_array()
        .expect("state");
    for kind in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.name",
    ] {
        assert!(space_state.iter().any(|e| e["type"] == kind), "{kind} missing");
    }
    // The invite carries its stripped state.
    let invited = &answer["rooms"][&invite];
    assert!(
        invited["invite_state"]
            .as_array()
            .expect("invite_state")
            .iter()
            .any(|e| e["type"] == "m.room.name"),
        "{invited}"
    );
    // $ME alone: the user's own member event only.
    let me = sliding(
        &s,
        &alice,
        "",
        json!({ "lists": { "l": { "ranges": [[0, 0]], "timeline_limit": 0, "required_state": [["m.room.member", "$ME"]],
                                   "filters": { "is_invite": false } } } }),
    )
    .await;
    let state = me["rooms"]
        .as_object()
        .and_then(|r| r.values().next())
        .map(|r| r["required_state"].clone())
        .expect("a room");
    assert_eq!(state.as_array().map(Vec::len), Some(1), "{state}");
    assert_eq!(state[0]["state_key"], alice.user_id.as_str());
}

#[tokio::test]
async fn bad_sliding_sync_requests_get_the_spec_errors() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let list = |ranges: Value| json!({ "lists": { "all": { "ranges": ranges, "timeline_limit": 1 } } });
    let cases: Vec<(String, Value, &str)> = vec![
        ("pos=nonsense".into(), list(json!([[0, 1]])), "M_UNKNOWN_POS"),
        ("pos=abc_1".into(), list(json!([[0, 1]])), "M_UNKNOWN_POS"),
        (String::new(), list(json!([[5, 1]])), "M_INVALID_PARAM"),
        (String::new(), list(json!([[0, -1]])), "M_BAD_JSON"),
        (
            String::new(),
            list(json!([[0, 9007199254740993u64]])),
            "M_BAD_JSON",
        ),
        (String::new(), list(json!([[0, 1, 2]])), "M_BAD_JSON"),
        (
            String::new(),
            json!({ "lists": { "all": { "ranges": [[0, 1]] } } }),
            "M_BAD_JSON",
        ),
        (String::new(), json!({ "lists": "all" }), "M_BAD_JSON"),
        (
            String::new(),
            json!({ "lists": { "all": { "ranges": [[0, 1]], "timeline_limit": 1, "filters": { "spaces": "!a:b" } } } }),
            "M_BAD_JSON",
        ),
        (
            String::new(),
            json!({ "lists": { "all": { "ranges": [[0, 1]], "timeline_limit": 1 } },
                    "extensions": { "typing": { "enabled": true, "lists": ["nope"] } } }),
            "M_INVALID_PARAM",
        ),
        (
            String::new(),
            json!({ "conn_id": "far-too-long-a-connection-id" }),
            "M_INVALID_PARAM",
        ),
    ];
    for (query, body, code) in cases {
        let (status, answer) = s
            .call(
                Method::POST,
                &format!("{PATH}?{query}"),
                Some(&alice.token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (status, errcode(&answer)),
            (StatusCode::BAD_REQUEST, code),
            "{query} {body}: {answer}"
        );
    }
    let too_many: Vec<Value> = (0..101).map(|i| json!([i, i])).collect();
    let (status, answer) = s
        .call(
            Method::POST,
            PATH,
            Some(&alice.token),
            Some(list(json!(too_many))),
        )
        .await;
    assert_eq!(
        (status, errcode(&answer)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let response = reqwest::Client::new()
        .post(format!("{}{PATH}", s.base))
        .bearer_auth(&alice.token)
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(errcode(&body), "M_NOT_JSON");
    // A pos from before a restart is unknown too.
    let mut s = s;
    let pos = sliding(&s, &alice, "", list(json!([[0, 1]]))).await["pos"]
        .as_str()
        .expect("pos")
        .to_owned();
    s.restart().await;
    let (status, answer) = s
        .call(
            Method::POST,
            &format!("{PATH}?pos={pos}"),
            Some(&alice.token),
            Some(list(json!([[0, 1]]))),
        )
        .await;
    assert_eq!(
        (status, errcode(&answer)),
        (StatusCode::BAD_REQUEST, "M_UNKNOWN_POS")
    );
}
