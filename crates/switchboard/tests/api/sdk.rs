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

/// The SDK's encrypted echo example (feature `e2ee`) and a matrix-nio user with end-to-end
/// encryption (`tests/interop/sdk_encrypted_echo.py`) in an encrypted DM: her messages decrypt
/// on the bot's device (keys from transactions only), its replies on hers; after the service
/// restarts (its Olm account and sessions are on disk); and on a new device of hers.
async fn encrypted_echo_with_nio(server: &crate::harness::Server, registration: &std::path::Path, port: u16) {
    use std::io::Write as _;

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    use crate::{
        federation::{Process, workspace_binary},
        peers::skip_without,
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join("target/interop-venv/bin/python");
    if !python.exists() {
        skip_without("matrix-nio (tests/interop/setup.sh interop)");
        return;
    }
    let example = workspace_binary("examples/encrypted_echo")
        .expect("the example (cargo build -p switchboard-appservice --features e2ee --examples)");
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("echo.log");
    let crypto = dir.path().join("crypto");
    let start_echo = || {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log");
        writeln!(log, "===== starting the example").expect("log");
        Process(
            std::process::Command::new(&example)
                .arg(registration)
                .arg(&server.base)
                .arg("localhost")
                .arg(format!("127.0.0.1:{port}"))
                .arg(&crypto)
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start the example"),
        )
    };
    let runs_ready = |runs: usize| {
        let log_path = log_path.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                if log.matches("application service ready").count() >= runs {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the example did not start:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut echo = start_echo();
    runs_ready(1).await;

    let bot = format!("@{}:localhost", "encecho");
    let mut nio = tokio::process::Command::new(&python)
        .arg(root.join("tests/interop/sdk_encrypted_echo.py"))
        .arg(&server.base)
        .arg(&bot)
        .arg(dir.path().join("nio"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python");
    let mut stdin = nio.stdin.take().expect("stdin");
    let mut lines = tokio::io::BufReader::new(nio.stdout.take().expect("stdout")).lines();
    let log_path_ = log_path.clone();
    let mut expect = async |prefix: &str| -> String {
        let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .unwrap_or_default();
        assert!(
            line.starts_with(prefix),
            "nio said {line:?}, expected {prefix:?}\n--- the example's log:\n{}\n--- the server's log:\n{}",
            std::fs::read_to_string(&log_path_).unwrap_or_default(),
            server.log()
        );
        line
    };
    let say = async |stdin: &mut tokio::process::ChildStdin, line: &str| {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        stdin.flush().await.expect("flush");
    };
    expect("READY").await;
    say(&mut stdin, "hello, encrypted bridge").await;
    expect("ECHOED hello, encrypted bridge").await;

    // A restart of the service: its devices, Olm account and sessions come back from disk.
    drop(echo);
    echo = start_echo();
    runs_ready(2).await;
    say(&mut stdin, "after a restart").await;
    expect("ECHOED after a restart").await;

    // 60 claims of the bot's one-time keys (it keeps 50): the counts reach the service, which
    // uploads more — a claim after that gets a one-time key, not the fallback key.
    // The service keeps each device in a directory holding `user_id` and `device_id`.
    let bot_device = std::fs::read_dir(&crypto)
        .expect("the crypto directory")
        .flatten()
        .find(|d| std::fs::read_to_string(d.path().join("user_id")).is_ok_and(|u| u == bot))
        .and_then(|d| std::fs::read_to_string(d.path().join("device_id")).ok())
        .expect("the bot's device");
    let claimer = server.register("claimer").await;
    let claim = json!({"one_time_keys": { bot.clone(): { bot_device.clone(): "signed_curve25519" } }});
    for _ in 0..60 {
        server
            .ok(
                Method::POST,
                "/_matrix/client/v3/keys/claim",
                &claimer.token,
                claim.clone(),
            )
            .await;
    }
    // (Synapse sends the counts only with other traffic: this is some.)
    say(&mut stdin, "after the claims").await;
    expect("ECHOED after the claims").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let claimed = server
            .ok(
                Method::POST,
                "/_matrix/client/v3/keys/claim",
                &claimer.token,
                claim.clone(),
            )
            .await;
        let keys = &claimed["one_time_keys"][&bot][&bot_device];
        let fresh = keys
            .as_object()
            .is_some_and(|k| !k.is_empty() && k.values().all(|key| key.get("fallback").is_none()));
        if fresh {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service never uploaded more one-time keys: {claimed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A second device of hers: the bot learns of it and shares its room key with it too.
    say(&mut stdin, "NEW DEVICE").await;
    expect("DEVICE").await;
    say(&mut stdin, "now on two devices").await;
    expect("ECHOED now on two devices").await;
    drop(stdin);
    drop(echo);
}

/// The registration the encrypted echo example needs: to-device messages, key counts and device
/// lists in transactions, and devices without logins.
fn encrypted_echo_registration(port: u16) -> Registration {
    Registration::new("encecho", Some(&format!("http://127.0.0.1:{port}")))
        .sender("encecho")
        .users("@_encecho_.*:localhost", true)
        .extra(
            "receive_ephemeral: true\nde.sorunome.msc2409.push_ephemeral: true\n\
             org.matrix.msc3202: true\nio.element.msc4190: true\n",
        )
}

#[tokio::test]
async fn the_encrypted_echo_example_talks_with_a_nio_user_on_switchboard() {
    let port = free_port();
    let registration = encrypted_echo_registration(port);
    let (server, files) = start_server(&[&registration]).await;
    encrypted_echo_with_nio(&server, &files.path().join("encecho.yaml"), port).await;
}

#[tokio::test]
async fn the_encrypted_echo_example_talks_with_a_nio_user_on_synapse() {
    let port = free_port();
    let registration = encrypted_echo_registration(port);
    let (_dir, paths) = crate::fake_as::write_registrations(&[("encecho.yaml", &registration.yaml())]);
    let Some(server) = crate::harness::Server::start_synapse_edited(&paths, |config| {
        config
            + "experimental_features:\n  msc2409_to_device_messages_enabled: true\n  \
               msc3202_transaction_extensions: true\n"
    })
    .await
    else {
        crate::peers::skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    encrypted_echo_with_nio(&server, &paths[0], port).await;
}
