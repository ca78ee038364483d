//! Typing, receipts, read markers and presence, as the other members see them through /sync.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, User, enc, errcode};

async fn pair(s: &Server) -> (User, User, String) {
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;
    (alice, bob, room)
}

fn ephemeral_of(sync: &Value, room: &str, kind: &str) -> Option<Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()?
        .iter()
        .find(|e| e["type"] == kind)
        .cloned()
}

#[tokio::test]
async fn typing_wakes_the_other_sync_and_expires() {
    let s = Server::start().await;
    let (alice, bob, room) = pair(&s).await;
    let since = s.sync(&bob, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    let typing = format!(
        "/_matrix/client/v3/rooms/{}/typing/{}",
        enc(&room),
        enc(&alice.user_id)
    );
    // bob's sync waits first; alice starts typing while it does.
    let query = format!("since={since}&timeout=10000");
    let poll = s.sync(&bob, &query);
    let start_typing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.ok(
            Method::PUT,
            &typing,
            &alice.token,
            json!({"typing": true, "timeout": 1000}),
        )
        .await;
        Instant::now()
    };
    let (sync, typed_at) = tokio::join!(poll, start_typing);
    assert!(
        typed_at.elapsed() < Duration::from_secs(1),
        "the waiting sync answered {:?} after the typing started",
        typed_at.elapsed()
    );
    // Had the sync answered before the PUT, the typing would not be in it.
    let event = ephemeral_of(&sync, &room, "m.typing").expect("typing event");
    assert_eq!(event["content"]["user_ids"], json!([alice.user_id]));

    // The timeout ends it by itself, and that is news too.
    let next = sync["next_batch"].as_str().expect("t").to_owned();
    let sync = s.sync(&bob, &format!("since={next}&timeout=5000")).await;
    let event = ephemeral_of(&sync, &room, "m.typing").expect("typing stopped");
    assert_eq!(event["content"]["user_ids"], json!([]));

    let other = format!(
        "/_matrix/client/v3/rooms/{}/typing/{}",
        enc(&room),
        enc(&bob.user_id)
    );
    let (status, body) = s
        .call(
            Method::PUT,
            &other,
            Some(&alice.token),
            Some(json!({"typing": true})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
}

#[tokio::test]
async fn public_receipts_reach_members_private_ones_their_owner_and_fully_read_is_account_data() {
    let s = Server::start().await;
    let (alice, bob, room) = pair(&s).await;
    let (_, sent) = s.send_text(&alice, &room, "1", "read me").await;
    let event_id = sent["event_id"].as_str().expect("id").to_owned();
    let since = s.sync(&alice, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();

    let receipt = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        enc(&room),
        enc(&event_id)
    );
    s.ok(Method::POST, &receipt, &bob.token, json!({})).await;
    let private = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read.private/{}",
        enc(&room),
        enc(&event_id)
    );
    s.ok(Method::POST, &private, &bob.token, json!({})).await;
    let markers = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room));
    s.ok(
        Method::POST,
        &markers,
        &bob.token,
        json!({"m.fully_read": event_id}),
    )
    .await;

    let sync = s.sync(&alice, &format!("since={since}&timeout=5000")).await;
    let receipts = ephemeral_of(&sync, &room, "m.receipt").expect("receipt");
    assert!(
        receipts["content"][&event_id]["m.read"][&bob.user_id]["ts"].is_u64(),
        "{receipts}"
    );
    assert!(
        receipts["content"][&event_id].get("m.read.private").is_none(),
        "private receipts stay private"
    );

    let bobs = s.sync(&bob, "").await;
    let own = ephemeral_of(&bobs, &room, "m.receipt").expect("own receipts");
    assert!(
        own["content"][&event_id]["m.read.private"][&bob.user_id].is_object(),
        "own private receipt: {own}"
    );
    let fully_read = bobs["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .expect("account data")
        .iter()
        .find(|e| e["type"] == "m.fully_read")
        .cloned()
        .expect("m.fully_read");
    assert_eq!(fully_read["content"]["event_id"], event_id.as_str());

    let bad = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/%24nope", enc(&room));
    let (status, _) = s
        .call(Method::POST, &bad, Some(&bob.token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn presence_reaches_room_peers_only() {
    let s = Server::start().await;
    let (alice, bob, _room) = pair(&s).await;
    let stranger = s.register("stranger").await;
    let since = s.sync(&bob, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
    s.ok(
        Method::PUT,
        &path,
        &alice.token,
        json!({"presence": "online", "status_msg": "hi"}),
    )
    .await;
    let status = s.ok(Method::GET, &path, &bob.token, Value::Null).await;
    assert_eq!(status["presence"], "online");
    assert_eq!(status["status_msg"], "hi");

    let sync = s.sync(&bob, &format!("since={since}&timeout=5000")).await;
    let events = sync["presence"]["events"].as_array().expect("presence");
    assert!(
        events
            .iter()
            .any(|e| e["sender"] == alice.user_id.as_str() && e["content"]["presence"] == "online")
    );
    let theirs = s.sync(&stranger, "").await;
    assert!(
        theirs["presence"]["events"]
            .as_array()
            .expect("presence")
            .is_empty(),
        "no shared room"
    );
    let (code, _) = s
        .call(
            Method::PUT,
            &path,
            Some(&bob.token),
            Some(json!({"presence": "online"})),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn services_receive_ephemeral_data_they_asked_for() {
    use crate::fake_as::{FakeAs, Registration, as_user, register_ghost, start_server};
    let service = FakeAs::start().await;
    let registration = Registration::new("bridge", Some(&service.url))
        .users("@_b_.*:localhost", true)
        .extra("receive_ephemeral: true\nde.sorunome.msc2409.push_ephemeral: true\n");
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    let ghost = register_ghost(&s, &token, "_b_ghost").await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &ghost),
        &token,
        json!({}),
    )
    .await;
    let (_, sent) = s.send_text(&alice, &room, "1", "hello").await;
    let event_id = sent["event_id"].as_str().expect("id").to_owned();

    let typing = format!(
        "/_matrix/client/v3/rooms/{}/typing/{}",
        enc(&room),
        enc(&alice.user_id)
    );
    s.ok(
        Method::PUT,
        &typing,
        &alice.token,
        json!({"typing": true, "timeout": 10000}),
    )
    .await;
    let read = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        enc(&room),
        enc(&event_id)
    );
    s.ok(Method::POST, &read, &alice.token, json!({})).await;
    let private = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read.private/{}",
        enc(&room),
        enc(&event_id)
    );
    s.ok(Method::POST, &private, &alice.token, json!({})).await;
    // A human sharing a room with the service's user: their presence is of interest too.
    let alices = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
    s.ok(
        Method::PUT,
        &alices,
        &alice.token,
        json!({"presence": "unavailable"}),
    )
    .await;
    let presence = as_user(
        &format!("/_matrix/client/v3/presence/{}/status", enc(&ghost)),
        &ghost,
    );
    s.ok(Method::PUT, &presence, &token, json!({"presence": "online"}))
        .await;

    let has = |kind: &'static str| {
        move |requests: &[crate::fake_as::Request]| {
            requests.iter().any(|r| {
                r.json()["ephemeral"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|x| x["type"] == kind))
            })
        }
    };
    for kind in ["m.typing", "m.receipt"] {
        service
            .wait_for_requests(has(kind), Duration::from_secs(10))
            .await;
    }
    // Presence of both: the service's own user and the human sharing its room.
    for who in [ghost.clone(), alice.user_id.clone()] {
        let presence_of = move |requests: &[crate::fake_as::Request]| {
            requests.iter().any(|r| {
                r.json()["ephemeral"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|x| x["type"] == "m.presence" && x["sender"] == who.as_str())
                })
            })
        };
        service
            .wait_for_requests(presence_of, Duration::from_secs(10))
            .await;
    }
    let ephemeral: Vec<Value> = service
        .requests()
        .iter()
        .filter_map(|r| r.json()["ephemeral"].as_array().cloned())
        .flatten()
        .collect();
    let typing = ephemeral
        .iter()
        .find(|e| e["type"] == "m.typing")
        .expect("typing");
    assert_eq!(typing["room_id"], room.as_str());
    assert!(
        typing["content"]["user_ids"]
            .as_array()
            .expect("ids")
            .contains(&json!(alice.user_id))
    );
    let receipts: Vec<&Value> = ephemeral.iter().filter(|e| e["type"] == "m.receipt").collect();
    assert!(
        receipts
            .iter()
            .any(|r| r["content"][&event_id]["m.read"][&alice.user_id].is_object())
    );
    assert!(
        receipts
            .iter()
            .all(|r| r["content"][&event_id].get("m.read.private").is_none()),
        "not its user's private receipt"
    );
    assert!(
        ephemeral
            .iter()
            .any(|e| e["type"] == "m.presence" && e["sender"] == ghost.as_str())
    );
    let unstable = service
        .requests()
        .iter()
        .any(|r| r.json()["de.sorunome.msc2409.ephemeral"].is_array());
    assert!(
        unstable,
        "the unstable key is sent too when the registration asks for it"
    );
}

#[tokio::test]
async fn more_than_a_transaction_of_ephemeral_data_is_all_delivered() {
    use crate::fake_as::{FakeAs, Registration, as_user, ping, register_ghost, start_server};
    let service = FakeAs::start().await;
    let registration = Registration::new("bridge", Some(&service.url))
        .users("@_b_.*:localhost", true)
        .extra("receive_ephemeral: true\n");
    let (s, _files) = start_server(&[&registration]).await;
    let token = registration.as_token.clone();
    service.set_transaction_status(500);
    for i in 0..150 {
        let ghost = register_ghost(&s, &token, &format!("_b_{i}")).await;
        let presence = as_user(
            &format!("/_matrix/client/v3/presence/{}/status", enc(&ghost)),
            &ghost,
        );
        s.ok(Method::PUT, &presence, &token, json!({"presence": "online"}))
            .await;
    }
    service.set_transaction_status(200);
    ping(&s, "bridge", &token, "wake").await;
    let delivered = |requests: &[crate::fake_as::Request]| {
        let senders: std::collections::HashSet<String> = requests
            .iter()
            .filter(|r| r.succeeded())
            .filter_map(|r| r.json()["ephemeral"].as_array().cloned())
            .flatten()
            .filter(|e| e["type"] == "m.presence")
            .filter_map(|e| e["sender"].as_str().map(str::to_owned))
            .collect();
        senders.len() == 150
    };
    service
        .wait_for_requests(delivered, Duration::from_secs(20))
        .await;
    let biggest = service
        .requests()
        .iter()
        .filter_map(|r| r.json()["ephemeral"].as_array().map(Vec::len))
        .max()
        .unwrap_or(0);
    assert!(
        biggest <= 100,
        "at most 100 ephemeral items per transaction, saw {biggest}"
    );
}
