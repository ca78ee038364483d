//! matrix-rust-sdk, the engine of Element X, against the real Switchboard binary: sliding sync
//! discovered from `/versions`, `SyncService` + `RoomListService` as Element X runs them, the
//! timeline, unread counts, and an encrypted room whose keys a second device restores from the
//! server-side backup.
//!
//! The binary is `target/debug/switchboard` of the main workspace (`SWITCHBOARD_BIN` to point
//! elsewhere); `scripts/element-x-tests.sh` builds both.

// matrix-rust-sdk's futures nest deeply: the compiler needs more room to lay them out.
#![recursion_limit = "256"]

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use matrix_sdk::{
    Client,
    encryption::{BackupDownloadStrategy, EncryptionSettings},
    ruma::{
        OwnedRoomId, RoomId,
        api::client::{
            receipt::create_receipt::v3::ReceiptType, room::create_room::v3::Request as CreateRoom,
        },
        events::{
            InitialStateEvent,
            room::{encryption::RoomEncryptionEventContent, message::RoomMessageEventContent},
        },
    },
    sliding_sync::Version,
};
use matrix_sdk_ui::{
    sync_service::SyncService,
    timeline::{RoomExt, Timeline},
};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

/// A Switchboard on a loopback port with its own data directory.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn binary() -> PathBuf {
    std::env::var_os("SWITCHBOARD_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/debug/switchboard"
            ))
        },
        PathBuf::from,
    )
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let config = format!(
            "server_name: localhost
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    resources: [{{names: [client]}}]
database: {{name: sqlite3, args: {{database: {dir}/homeserver.db}}}}
media_store_path: {dir}/media
signing_key_path: {dir}/signing.key
enable_registration: true
enable_registration_without_verification: true
app_service_config_files: []
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
",
            dir = dir.path().display()
        );
        let path = dir.path().join("homeserver.yaml");
        std::fs::write(&path, config).expect("config");
        let binary = binary();
        assert!(
            binary.exists(),
            "{} is missing: build the main workspace first",
            binary.display()
        );
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn switchboard");
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + WAIT;
        while server
            .http
            .get(format!("{}/_matrix/client/versions", server.base))
            .send()
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "switchboard did not start: {}",
                std::fs::read_to_string(server._dir.path().join("server.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Registers a user over plain HTTP; returns the access token.
    async fn register(&self, name: &str) -> String {
        let body: Value = self
            .http
            .post(format!("{}/_matrix/client/v3/register", self.base))
            .json(&json!({ "username": name, "password": "password", "auth": { "type": "m.login.dummy" } }))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// A request as another client would make it (the other side of the conversation).
    async fn call(&self, method: reqwest::Method, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.expect("json")
    }

    async fn send(&self, token: &str, room: &str, txn: &str, body: &str) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            room.replace('!', "%21").replace(':', "%3A")
        );
        self.call(
            reqwest::Method::PUT,
            &path,
            token,
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    }

    /// A logged-in matrix-rust-sdk client as Element X builds one: its own SQLite stores,
    /// sliding sync discovered from `/versions`, backups on.
    async fn client(&self, user: &str, store: &std::path::Path) -> Client {
        let client = Client::builder()
            .homeserver_url(&self.base)
            .sqlite_store(store, None)
            .sliding_sync_version_builder(matrix_sdk::sliding_sync::VersionBuilder::DiscoverNative)
            .with_encryption_settings(EncryptionSettings {
                auto_enable_cross_signing: true,
                backup_download_strategy: BackupDownloadStrategy::AfterDecryptionFailure,
                auto_enable_backups: true,
            })
            .build()
            .await
            .expect("client");
        client
            .matrix_auth()
            .login_username(user, "password")
            .initial_device_display_name("Element X test")
            .await
            .expect("login");
        client
    }
}

fn body_of(item: &matrix_sdk_ui::timeline::TimelineItem) -> Option<String> {
    let event = item.as_event()?;
    Some(event.content().as_message()?.body().to_owned())
}

/// Waits until the timeline holds a message with this body.
async fn wait_for_body(timeline: &Timeline, body: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let items = timeline.items().await;
        if items.iter().any(|i| body_of(i).as_deref() == Some(body)) {
            return;
        }
        let bodies: Vec<String> = items.iter().filter_map(|i| body_of(i)).collect();
        assert!(
            Instant::now() < deadline,
            "{body:?} never appeared; timeline has {bodies:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_x_lists_rooms_by_activity_paginates_and_follows_a_conversation() {
    let server = Server::start().await;
    let bob = server.register("bob").await;
    server.register("alice").await;

    // Bob's rooms, Alice invited and joined; "chat" gets the most recent message.
    let mut rooms: Vec<(String, String)> = Vec::new();
    for name in ["chat", "quiet", "older"] {
        let room = server
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                &bob,
                json!({ "name": name, "preset": "public_chat" }),
            )
            .await["room_id"]
            .as_str()
            .expect("room_id")
            .to_owned();
        rooms.push((name.to_owned(), room));
    }
    let alice_http = server
        .http
        .post(format!("{}/_matrix/client/v3/login", server.base))
        .json(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "password" }))
        .send()
        .await
        .expect("login")
        .json::<Value>()
        .await
        .expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    for (_, room) in &rooms {
        let path = format!(
            "/_matrix/client/v3/join/{}",
            room.replace('!', "%21").replace(':', "%3A")
        );
        server
            .call(reqwest::Method::POST, &path, &alice_http, json!({}))
            .await;
    }
    let chat = rooms[0].1.clone();
    server.send(&bob, &rooms[2].1, "o1", "old news").await;
    server.send(&bob, &rooms[1].1, "q1", "hm").await;
    for i in 0..30 {
        server
            .send(&bob, &chat, &format!("c{i}"), &format!("message {i}"))
            .await;
    }

    let store = tempfile::tempdir().expect("store");
    let client = server.client("alice", store.path()).await;
    assert!(
        matches!(client.sliding_sync_version(), Version::Native),
        "sliding sync discovered from /versions"
    );
    let sync = SyncService::builder(client.clone())
        .build()
        .await
        .expect("sync service");
    sync.start().await;
    let room_list = sync.room_list_service().all_rooms().await.expect("all rooms");
    let (entries, controller) = room_list.entries_with_dynamic_adapters(50);
    controller.set_filter(Box::new(|_| true));
    let mut entries = Box::pin(entries);
    let mut list = matrix_sdk_ui::eyeball_im::Vector::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let names: Vec<String> = list
            .iter()
            .map(|r: &matrix_sdk_ui::room_list_service::RoomListItem| r.name().unwrap_or_default())
            .collect();
        if names == ["chat", "quiet", "older"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "room list never sorted by activity: {names:?}"
        );
        match tokio::time::timeout(Duration::from_secs(1), entries.next()).await {
            Ok(Some(diffs)) => {
                for diff in diffs {
                    diff.apply(&mut list);
                }
            }
            Ok(None) => panic!("room list stream ended"),
            Err(_) => {}
        }
    }

    // The timeline pages back through all 30 messages, in order.
    let room = client
        .get_room(<&RoomId>::try_from(chat.as_str()).expect("id"))
        .expect("room");
    let timeline = room.timeline().await.expect("timeline");
    let deadline = Instant::now() + WAIT;
    loop {
        let bodies: Vec<String> = timeline.items().await.iter().filter_map(|i| body_of(i)).collect();
        if bodies.first().map(String::as_str) == Some("message 0") {
            let expected: Vec<String> = (0..30).map(|i| format!("message {i}")).collect();
            assert_eq!(bodies, expected);
            break;
        }
        assert!(Instant::now() < deadline, "pagination stopped at {bodies:?}");
        timeline.paginate_backwards(10).await.expect("paginate");
    }

    // Bob writes: the message appears live, and the room's unread count moves.
    server.send(&bob, &chat, "live", "are you there?").await;
    wait_for_body(&timeline, "are you there?").await;
    wait_until("an unread count", async || {
        room.unread_notification_counts().notification_count > 0
    })
    .await;

    // Reading resets it (a receipt through the SDK, the count through sliding sync).
    timeline
        .mark_as_read(ReceiptType::Read)
        .await
        .expect("mark as read");
    wait_until("the count to reset", async || {
        room.unread_notification_counts().notification_count == 0
    })
    .await;

    // Alice answers through the SDK; Bob sees it.
    timeline
        .send(RoomMessageEventContent::text_plain("yes, from Element X").into())
        .await
        .expect("send");
    let messages = format!(
        "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
        chat.replace('!', "%21").replace(':', "%3A")
    );
    let mut seen = false;
    for _ in 0..100 {
        let page = server
            .call(reqwest::Method::GET, &messages, &bob, Value::Null)
            .await;
        seen = page["chunk"]
            .as_array()
            .is_some_and(|c| c.iter().any(|e| e["content"]["body"] == "yes, from Element X"));
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "bob never saw Alice's answer");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_room_is_backed_up_and_a_second_device_restores_its_history() {
    let server = Server::start().await;
    server.register("alice").await;
    let first_store = tempfile::tempdir().expect("store");
    let first = server.client("alice", first_store.path()).await;
    first.encryption().wait_for_e2ee_initialization_tasks().await;
    let sync = SyncService::builder(first.clone())
        .build()
        .await
        .expect("sync service");
    sync.start().await;

    // Recovery: secret storage, cross-signing and a backup version, all on the server.
    let recovery_key = first
        .encryption()
        .recovery()
        .enable()
        .await
        .expect("enable recovery");
    assert!(
        first
            .encryption()
            .backups()
            .exists_on_server()
            .await
            .expect("backup query")
    );

    let mut request = CreateRoom::new();
    request.name = Some("secrets".to_owned());
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
            .to_raw_any(),
    ];
    let room = first.create_room(request).await.expect("create room");
    let room_id: OwnedRoomId = room.room_id().to_owned();
    assert!(
        room.latest_encryption_state()
            .await
            .expect("state")
            .is_encrypted()
    );
    let timeline = room.timeline().await.expect("timeline");
    for i in 1..=3 {
        timeline
            .send(RoomMessageEventContent::text_plain(format!("secret {i}")).into())
            .await
            .expect("send");
    }
    wait_for_body(&timeline, "secret 3").await;
    // Sent (not just echoed locally): the room key exists and was shared.
    wait_until("the three messages to be sent", async || {
        timeline
            .items()
            .await
            .iter()
            .filter_map(|i| i.as_event())
            .filter(|e| e.is_remote_event() && e.content().as_message().is_some())
            .count()
            == 3
    })
    .await;
    // The room key is in the server's backup before the second device looks.
    let token = first.access_token().expect("token");
    wait_until("the room key in the backup", async || {
        let _ = first.encryption().backups().wait_for_steady_state().await;
        let version = server
            .call(
                reqwest::Method::GET,
                "/_matrix/client/v3/room_keys/version",
                &token,
                Value::Null,
            )
            .await;
        version["count"].as_u64().is_some_and(|count| count >= 1)
    })
    .await;

    let second_store = tempfile::tempdir().expect("store");
    let second = server.client("alice", second_store.path()).await;
    second.encryption().wait_for_e2ee_initialization_tasks().await;
    second
        .encryption()
        .recovery()
        .recover(&recovery_key)
        .await
        .expect("recover from secret storage");
    let second_sync = SyncService::builder(second.clone())
        .build()
        .await
        .expect("sync service");
    second_sync.start().await;
    let mut second_room = None;
    wait_until("the room on the second device", async || {
        second_room = second.get_room(&room_id);
        second_room.is_some()
    })
    .await;
    let second_timeline = second_room.expect("room").timeline().await.expect("timeline");
    let deadline = Instant::now() + WAIT;
    loop {
        let bodies: Vec<String> = second_timeline
            .items()
            .await
            .iter()
            .filter_map(|i| body_of(i))
            .collect();
        if ["secret 1", "secret 2", "secret 3"]
            .iter()
            .all(|s| bodies.iter().any(|b| b == s))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old messages not decrypted from the backup: {bodies:?}"
        );
        let _ = second_timeline.paginate_backwards(10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second_sync.stop().await;
    sync.stop().await;
}
