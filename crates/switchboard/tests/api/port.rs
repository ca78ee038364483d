//! `switchboard port-db`: a deployment filled on SQLite moves to PostgreSQL with everything
//! (accounts, history, AS queues, media) intact.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use switchboard_store::testing::TestPostgres;

use crate::{
    fake_as::{FakeAs, Registration, config_files_yaml, message_bodies, register_ghost, write_registrations},
    harness::{RELAXED_LIMITS, Server, User, binary, enc},
};

const WAIT: Duration = Duration::from_secs(20);

/// Every event of a room, paged back from the end in small pages: the pages, as the server
/// returned them.
async fn page_back(s: &Server, user: &User, room: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut from = String::new();
    loop {
        let page = s
            .ok(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=7{from}",
                    enc(room)
                ),
                &user.token,
                Value::Null,
            )
            .await;
        let end = page["end"].as_str().map(str::to_owned);
        let mut chunk = page["chunk"].clone();
        let empty = chunk.as_array().is_none_or(Vec::is_empty);
        // `age` is the only thing that may differ: time passes.
        for event in chunk.as_array_mut().into_iter().flatten() {
            if let Some(unsigned) = event["unsigned"].as_object_mut() {
                unsigned.remove("age");
            }
        }
        pages.push(chunk);
        match end {
            Some(end) if !empty => from = format!("&from={end}"),
            _ => return pages,
        }
    }
}

fn url_of(db: &TestPostgres) -> String {
    let s = &db.settings;
    format!(
        "postgresql://{}@{}:{}/{}",
        s.user.as_deref().unwrap_or("postgres"),
        s.host,
        s.port,
        s.dbname
    )
}

fn port_db(s: &Server, db: &TestPostgres) -> std::process::Output {
    std::process::Command::new(binary())
        .arg("port-db")
        .arg("--sqlite")
        .arg(s.dir.path().join("homeserver.db"))
        .arg("--postgres")
        .arg(url_of(db))
        .output()
        .expect("run port-db")
}

#[tokio::test]
async fn port_db_moves_a_deployment_to_postgres() {
    let fake = FakeAs::start().await;
    // The service is down while the deployment runs on SQLite: its queue is part of what moves.
    fake.set_transaction_status(500);
    let reg = Registration::new("bridge", Some(fake.url.as_str()))
        .sender("bridgebot")
        .users("@_bridge_.*:localhost", true);
    let (_regs, paths) = write_registrations(&[("bridge.yaml", &reg.yaml())]);
    let mut s = Server::start_on_sqlite(&format!("{}{RELAXED_LIMITS}", config_files_yaml(&paths))).await;

    let users = [
        s.register("alice").await,
        s.register("bob").await,
        s.register("carol").await,
    ];
    let mut rooms = Vec::new();
    for (i, owner) in users.iter().enumerate() {
        let room = s
            .create_room(
                owner,
                json!({"preset": "public_chat", "room_alias_name": format!("ported{i}")}),
            )
            .await;
        rooms.push(room);
    }
    let ghost = register_ghost(&s, &reg.as_token, "_bridge_ghost").await;
    s.ok(
        Method::POST,
        &crate::fake_as::as_user(
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&rooms[0])),
            &ghost,
        ),
        &reg.as_token,
        json!({}),
    )
    .await;
    for (r, room) in rooms.iter().enumerate() {
        for (u, user) in users.iter().enumerate() {
            if u != r {
                s.ok(
                    Method::POST,
                    &format!("/_matrix/client/v3/rooms/{}/join", enc(room)),
                    &user.token,
                    json!({}),
                )
                .await;
            }
        }
        for i in 0..20 {
            let user = &users[i % users.len()];
            let (status, body) = s
                .send_text(user, room, &format!("t{r}-{i}"), &format!("room{r}-{i:02}"))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    let upload: Value = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=note.txt", s.base))
        .bearer_auth(&users[0].token)
        .header("content-type", "text/plain")
        .body("ported bytes")
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    let mxc = upload["content_uri"].as_str().expect("content_uri").to_owned();
    fake.wait_for_requests(|r| r.iter().any(|r| r.txn_id.is_some() && r.status == 500), WAIT)
        .await;
    let mut history = Vec::new();
    for room in &rooms {
        history.push(page_back(&s, &users[0], room).await);
    }
    assert!(s.terminate().success(), "clean shutdown: {}", s.log());

    let db = TestPostgres::create().await;
    let out = port_db(&s, &db);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "port-db failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("row counts of both databases match"), "{stdout}");
    assert!(
        stdout.contains("name: psycopg2"),
        "tells what to change: {stdout}"
    );
    // A second run refuses to mix into a database that is no longer empty.
    let again = port_db(&s, &db);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("empty database"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let config = std::fs::read_to_string(s.config_path()).expect("config");
    let sqlite_line = format!(
        "database: {{name: sqlite3, args: {{database: {}/homeserver.db}}}}",
        s.dir.path().display()
    );
    assert!(config.contains(&sqlite_line));
    std::fs::write(s.config_path(), config.replace(&sqlite_line, &db.config_block())).expect("config");
    std::fs::remove_file(s.dir.path().join("homeserver.db")).expect("the SQLite file is not used any more");
    s.database = Some(db);
    fake.set_transaction_status(200);
    s.restart().await;

    for user in &users {
        let name = user
            .user_id
            .trim_start_matches('@')
            .split(':')
            .next()
            .expect("localpart");
        let (status, body) = s
            .call(
                Method::POST,
                "/_matrix/client/v3/login",
                None,
                Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": "password"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{name} logs in after the move: {body}");
        // Old sessions keep working too.
        s.ok(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &user.token,
            Value::Null,
        )
        .await;
    }
    for (room, before) in rooms.iter().zip(&history) {
        let after = page_back(&s, &users[0], room).await;
        // Compact on failure: the pages are long.
        assert!(&after == before, "history of {room} differs after the move");
    }
    let resolved = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/directory/room/{}", enc("#ported1:localhost")),
            &users[0].token,
            Value::Null,
        )
        .await;
    assert_eq!(resolved["room_id"], rooms[1]);
    let media_id = mxc.rsplit('/').next().expect("media id");
    let bytes = s
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/download/localhost/{media_id}",
            s.base
        ))
        .bearer_auth(&users[1].token)
        .send()
        .await
        .expect("download")
        .text()
        .await
        .expect("text");
    assert_eq!(bytes, "ported bytes");

    // The queued transactions reach the service, then new events follow them in order.
    let (status, _) = s
        .send_text(&users[0], &rooms[0], "after-port", "after the move")
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut expected: Vec<String> = (0..20).map(|i| format!("room0-{i:02}")).collect();
    expected.push("after the move".to_owned());
    let events = fake
        .wait_for_events(|e| message_bodies(e).len() >= expected.len(), WAIT)
        .await;
    assert_eq!(message_bodies(&events), expected, "{}", fake.summary());
    let page = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1",
                enc(&rooms[0])
            ),
            &users[0].token,
            Value::Null,
        )
        .await;
    assert_eq!(
        page["chunk"][0]["content"]["body"], "after the move",
        "new events go after the ported ones"
    );
}
