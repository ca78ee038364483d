//! The Rust application-service SDK (`switchboard-appservice`) against the real server: intents
//! register, join (through the bot's invite where needed), set profiles and send with `ts`;
//! startup names the cause when the homeserver and the service cannot reach each other.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use reqwest::Method;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId, UInt, events::AnyTimelineEvent};
use serde_json::{Value, json};
use switchboard_appservice::{Appservice, Context, Handler, HandlerResult, registration};

use crate::{
    fake_as::{Registration, start_server},
    harness::{enc, free_port},
};

/// Records the events the SDK hands over.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(OwnedRoomId, String)>>>);

impl Handler for Recorder {
    async fn event(&self, _ctx: Context, event: AnyTimelineEvent) -> HandlerResult {
        let body = match &event {
            AnyTimelineEvent::MessageLike(e) => e
                .original_content()
                .and_then(|c| serde_json::to_value(c).ok())
                .and_then(|c| c["body"].as_str().map(str::to_owned))
                .unwrap_or_default(),
            AnyTimelineEvent::State(_) => String::new(),
        };
        self.0
            .lock()
            .expect("lock")
            .push((event.room_id().to_owned(), body));
        Ok(())
    }
}

/// A registration for a service the SDK will serve on `port`, loaded the way services load it.
fn sdk_registration(id: &str, port: u16) -> (Registration, registration::Registration) {
    let test = Registration::new(id, Some(&format!("http://127.0.0.1:{port}")))
        .users(&format!("@_{id}_.*:localhost"), true);
    let parsed = registration::parse(&test.yaml(), "test.yaml").expect("valid");
    (test, parsed)
}

async fn serve<H: Handler>(service: &Appservice<H>, port: u16) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("bind");
    let router = service.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
}

#[tokio::test]
async fn intents_register_join_and_speak_as_virtual_users() {
    let port = free_port();
    let (test, parsed) = sdk_registration("sdk", port);
    let (s, _files) = start_server(&[&test]).await;
    let recorder = Recorder::default();
    let service = Appservice::builder(parsed, &s.base, "localhost")
        .build(recorder.clone())
        .expect("build");
    serve(&service, port).await;
    service.start().await.expect("startup checks pass");
    let ctx = service.context();

    // A human's invite-only room: the ghost gets in through the bot's invite.
    let alice = s.register("alice").await;
    let room = s
        .create_room(
            &alice,
            json!({"preset": "private_chat", "power_level_content_override": {"invite": 0}}),
        )
        .await;
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(&room));
    s.ok(
        Method::POST,
        &invite,
        &alice.token,
        json!({"user_id": test.sender_id()}),
    )
    .await;
    let bot = ctx.bot();
    let room_id = OwnedRoomId::try_from(room.as_str()).expect("room id");
    bot.ensure_joined(&room_id).await.expect("bot joins");

    let ghost_id = OwnedUserId::try_from("@_sdk_ghost:localhost").expect("user id");
    let ghost = ctx.intent(&ghost_id);
    ghost.set_display_name("Ghost").await.expect("display name");
    ghost
        .set_display_name("Ghost")
        .await
        .expect("cached: no second call needed");
    let then = MilliSecondsSinceUnixEpoch(UInt::from(1_234_567_890u32));
    let event_id = ghost
        .at(then)
        .send_text(&room_id, "hello from the SDK")
        .await
        .expect("send as the ghost");

    let event = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(event_id.as_str())
            ),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(event["sender"], "@_sdk_ghost:localhost");
    assert_eq!(event["origin_server_ts"], 1_234_567_890u64, "ts massaging");
    let profile = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/profile/@_sdk_ghost:localhost",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(profile["displayname"], "Ghost");

    // The homeserver pushes alice's message to the service; the SDK hands it over.
    s.send_text(&alice, &room, "t1", "to the service").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = recorder.0.lock().expect("lock").clone();
        if seen
            .iter()
            .any(|(r, body)| *r == room_id && body == "to the service")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not delivered: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn startup_names_the_cause_when_the_service_is_unreachable_or_misregistered() {
    let port = free_port();
    let (test, parsed) = sdk_registration("lost", port);
    let (s, _files) = start_server(&[&test]).await;

    // Nothing listens at the registration's URL.
    let service = Appservice::builder(parsed.clone(), &s.base, "localhost")
        .build(())
        .expect("build");
    let err = service.start().await.expect_err("unreachable").to_string();
    assert!(err.contains("cannot reach the service"), "{err}");

    // The service runs with another hs_token than the homeserver's file.
    let mut other = parsed.clone();
    other.hs_token = "not the homeserver's".to_owned();
    let service = Appservice::builder(other, &s.base, "localhost")
        .build(())
        .expect("build");
    serve(&service, port).await;
    let err = service.start().await.expect_err("wrong hs_token").to_string();
    assert!(err.contains("hs_token"), "{err}");

    // An as_token the homeserver does not know: the registration is not loaded.
    let mut unknown = parsed;
    unknown.as_token = "unknown".to_owned();
    let service = Appservice::builder(unknown, &s.base, "localhost")
        .startup_timeout(Duration::from_secs(5))
        .build(())
        .expect("build");
    let err = service.start().await.expect_err("unknown as_token").to_string();
    assert!(err.contains("as_token"), "{err}");
}
