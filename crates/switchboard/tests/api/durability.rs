//! Nothing accepted is lost: restarts, crashes, graceful shutdown, bad configs.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, binary, enc};

#[tokio::test]
async fn txn_ids_survive_a_crash() {
    let mut s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let (_, first) = s.send_text(&alice, &room, "retry-me", "once").await;
    s.crash_and_restart().await;
    let (status, again) = s.send_text(&alice, &room, "retry-me", "once").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        again["event_id"], first["event_id"],
        "a retry after a crash returns the original event"
    );

    let page = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    let copies = page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["content"]["body"] == "once")
        .count();
    assert_eq!(copies, 1);
    // The same txn ID from another device is a different transaction.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password"});
    let other = s
        .call(Method::POST, "/_matrix/client/v3/login", None, Some(login))
        .await
        .1;
    let other_user = crate::harness::User {
        user_id: alice.user_id.clone(),
        token: other["access_token"].as_str().expect("token").to_owned(),
        device_id: other["device_id"].as_str().expect("device").to_owned(),
    };
    let (status, third) = s.send_text(&other_user, &room, "retry-me", "once").await;
    assert_eq!(status, StatusCode::OK, "{third}");
    assert!(third["event_id"].is_string(), "{third}");
    assert_ne!(
        third["event_id"], first["event_id"],
        "another device's transaction is a new event"
    );
}

#[tokio::test]
async fn restart_keeps_everything_and_continues_the_stream() {
    let mut s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({"room_alias_name": "kept"})).await;
    s.send_text(&alice, &room, "1", "before").await;
    let token = s.sync(&alice, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    s.restart().await;
    s.send_text(&alice, &room, "2", "after").await;
    let sync = s.sync(&alice, &format!("since={token}")).await;
    let events = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline");
    let bodies: Vec<_> = events
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(
        bodies,
        vec!["after"],
        "old token still valid, nothing replayed, nothing skipped"
    );
    let resolved = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/directory/room/{}", enc("#kept:localhost")),
            None,
            None,
        )
        .await
        .1;
    assert_eq!(resolved["room_id"], room.as_str());
}

#[tokio::test]
async fn sigterm_ends_long_polls_and_exits_cleanly() {
    let mut s = Server::start().await;
    let alice = s.register("alice").await;
    let since = s.sync(&alice, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();
    let base = s.base.clone();
    let token = alice.token.clone();
    let poll = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!(
                "{base}/_matrix/client/v3/sync?since={since}&timeout=60000"
            ))
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || s.terminate())
        .await
        .expect("join");
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown does not wait out the long-poll"
    );
    assert_eq!(poll.await.expect("task").expect("answered"), StatusCode::OK);
}

#[test]
fn bad_config_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = crate::harness::config_text(crate::harness::free_port(), dir.path(), "")
        .replace("enable_registration: true", "enable_registration: maybe");
    let path = dir.path().join("homeserver.yaml");
    std::fs::write(&path, text).expect("write");
    let out = std::process::Command::new(binary())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("enable_registration") && stderr.contains("homeserver.yaml"),
        "{stderr}"
    );
}

/// Starts the binary with this `database:` block; returns its stderr (it must fail).
fn start_failing_with_database(block: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = format!(
        "database: {{name: sqlite3, args: {{database: {}/homeserver.db}}}}",
        dir.path().display()
    );
    let text =
        crate::harness::config_text(crate::harness::free_port(), dir.path(), "").replace(&sqlite, block);
    let path = dir.path().join("homeserver.yaml");
    std::fs::write(&path, text).expect("write");
    let out = std::process::Command::new(binary())
        .arg("--config")
        .arg(&path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run");
    assert!(!out.status.success(), "must not start with {block}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "an error, not a panic: {stderr}");
    stderr
}

#[tokio::test]
async fn an_unusable_postgres_database_stops_startup_naming_it() {
    let nobody = crate::harness::free_port();
    let stderr = start_failing_with_database(&format!(
        "database: {{name: psycopg2, args: {{user: postgres, dbname: sb, host: 127.0.0.1, port: {nobody}}}}}"
    ));
    assert!(
        stderr.contains(&format!("\"sb\" at postgres@127.0.0.1:{nobody}")) && stderr.contains("refused"),
        "{stderr}"
    );
    let pg = switchboard_store::testing::TestPostgres::create().await;
    let settings = &pg.settings;
    let stderr = start_failing_with_database(&format!(
        "database: {{name: psycopg2, args: {{user: '{}', dbname: no_such_db, host: '{}', port: {}}}}}",
        settings.user.as_deref().unwrap_or("postgres"),
        settings.host,
        settings.port
    ));
    assert!(
        stderr.contains("\"no_such_db\"") && stderr.contains("does not exist"),
        "{stderr}"
    );
    // Someone else's tables (a Synapse database, say): refused, nothing mixed in.
    let mut admin = sqlx_connect(settings).await;
    // Synapse's own version table (integer `version`) must not pass for ours.
    sqlx::raw_sql(
        "CREATE TABLE schema_version (lock CHAR(1) NOT NULL DEFAULT 'X', version INTEGER NOT NULL, upgraded BOOL NOT NULL);
         INSERT INTO schema_version (version, upgraded) VALUES (92, TRUE);
         CREATE TABLE events (event_id TEXT)",
    )
        .execute(&mut admin)
        .await
        .expect("foreign table");
    let stderr = start_failing_with_database(&pg.config_block());
    assert!(
        stderr.contains(&settings.dbname) && stderr.contains("no Switchboard schema"),
        "{stderr}"
    );
}

#[tokio::test]
async fn postgres_sslmode_is_honoured() {
    let pg = switchboard_store::testing::TestPostgres::create().await;
    let block = |mode: &str| {
        let mut settings = pg.settings.clone();
        settings.ssl_mode = Some(mode.to_owned());
        settings.config_block()
    };
    // The test server's certificate is self-signed: full verification must refuse it.
    let stderr = start_failing_with_database(&block("verify-full"));
    assert!(
        stderr.contains(&pg.settings.dbname) && stderr.to_lowercase().contains("certificate"),
        "refused for its certificate: {stderr}"
    );
    // `require` encrypts without verifying: the server offers TLS, so this works.
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = format!(
        "database: {{name: sqlite3, args: {{database: {}/homeserver.db}}}}",
        dir.path().display()
    );
    let text = crate::harness::config_text(crate::harness::free_port(), dir.path(), "")
        .replace(&sqlite, &block("require"));
    let path = dir.path().join("homeserver.yaml");
    std::fs::write(&path, text).expect("write");
    let out = std::process::Command::new(binary())
        .args([
            "register-user",
            "--user",
            "tls",
            "--password",
            "secret",
            "--config",
        ])
        .arg(&path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn sqlx_connect(settings: &switchboard_store::PostgresSettings) -> sqlx::PgConnection {
    use sqlx::Connection;
    let url = format!(
        "postgresql://{}@{}:{}/{}",
        settings.user.as_deref().unwrap_or("postgres"),
        settings.host,
        settings.port,
        settings.dbname
    );
    sqlx::PgConnection::connect(&url).await.expect("connect")
}

#[test]
fn generate_config_gives_a_runnable_setup_with_registration_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(binary())
        .args(["generate-config", "--server-name", "example.org", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("signing.key").exists());
    let text = std::fs::read_to_string(dir.path().join("homeserver.yaml")).expect("config");
    assert!(text.contains("server_name: example.org"));
    assert!(
        text.contains("enable_registration: false"),
        "registration closed unless asked, as in Synapse: {text}"
    );
    let again = std::process::Command::new(binary())
        .args(["generate-config", "--server-name", "example.org", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!again.status.success(), "does not overwrite without --force");
}

#[tokio::test]
async fn clients_hanging_up_mid_send_break_nothing() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    // Clients that give up after a few milliseconds: their requests are dropped mid-flight.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(3))
        .build()
        .expect("client");
    let mut aborted = Vec::new();
    for i in 0..40 {
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/gone{i}",
            s.base,
            enc(&room)
        );
        aborted.push(
            impatient
                .put(url)
                .bearer_auth(&alice.token)
                .json(&json!({"body": format!("g{i}")}))
                .send(),
        );
    }
    for request in aborted {
        let _ = request.await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = s.send_text(&alice, &room, "after", "still works").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Every event that was stored is also announced: a full sync sees the newest one.
    let sync = s.sync(&alice, "").await;
    let events = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline")
        .clone();
    assert_eq!(
        events.last().map(|e| e["content"]["body"].clone()),
        Some(json!("still works"))
    );
    let page = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    let count = page["chunk"].as_array().expect("chunk").len();
    let next: i64 = sync["next_batch"].as_str().expect("t")[1..]
        .split('_')
        .next()
        .expect("events")
        .parse()
        .expect("pos");
    assert!(
        next as usize >= count,
        "stream position {next} covers all {count} events"
    );
}

/// A write that waits on a lock an operator holds (or a connection gone silent) is bounded: the
/// send fails after the write timeout instead of stalling every sender forever, and once the lock
/// is gone sending works again, with nothing half-stored. PostgreSQL only (SQLite has one local
/// writer); the suite runs on both engines in CI.
#[tokio::test]
async fn on_postgres_a_write_stuck_behind_a_lock_fails_in_bounded_time() {
    use sqlx::Executor;
    let s = Server::start().await;
    let Some(database) = &s.database else {
        eprintln!("skipped: the tests run on SQLite (SWITCHBOARD_TEST_DATABASE=postgres runs it)");
        return;
    };
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let mut operator = sqlx_connect(&database.settings).await;
    operator.execute("BEGIN").await.expect("begin");
    operator
        .execute("LOCK TABLE events IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(90),
        s.send_text(&alice, &room, "stuck", "behind the lock"),
    )
    .await
    .expect("the write gives up on its own, not when the lock goes");
    let waited = started.elapsed();
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("M_UNKNOWN")),
        "the stuck write fails: {body}"
    );
    assert!(
        waited >= Duration::from_secs(25) && waited < Duration::from_secs(90),
        "bounded by the write timeout: {waited:?}"
    );
    operator.execute("ROLLBACK").await.expect("release");
    let (status, _) = s.send_text(&alice, &room, "after", "lock gone").await;
    assert_eq!(status, StatusCode::OK, "sending works again: {}", s.log());
    let (status, _) = s.send_text(&alice, &room, "stuck", "behind the lock").await;
    assert_eq!(status, StatusCode::OK, "the failed transaction can be retried");
    let messages = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10", enc(&room)),
            &alice.token,
            Value::Null,
        )
        .await;
    let bodies: Vec<&str> = messages["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(
        bodies,
        ["behind the lock", "lock gone"],
        "each once, nothing half-stored"
    );
}
