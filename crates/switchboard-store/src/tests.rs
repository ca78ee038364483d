use super::*;

/// A store on the engine the tests run on (see [`crate::testing`]).
async fn temp_store() -> (crate::testing::TestDatabase, Store) {
    let db = crate::testing::TestDatabase::create().await;
    let store = Store::open(&db.settings()).await.expect("open");
    (db, store)
}

fn event(pos: i64, id: &str, kind: &str, state_key: Option<&str>) -> NewEvent {
    NewEvent {
        relay: false,
        stream_pos: pos,
        event_id: id.to_owned(),
        room_id: "!r:x".to_owned(),
        sender: "@a:x".to_owned(),
        kind: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        depth: pos,
        origin_server_ts: 0,
        pdu: "{}".to_owned(),
        unsigned: None,
        txn: None,
        membership: None,
        creates_room_version: None,
        relates_to: None,
        prev_events: Vec::new(),
        state_after: None,
        snapshots: Vec::new(),
        current_state: None,
    }
}

#[tokio::test]
async fn state_at_follows_linear_history() {
    let (_dir, store) = temp_store().await;
    store
        .append_events(&[&event(1, "$1", "m.room.name", Some(""))])
        .await
        .expect("1");
    store
        .append_events(&[&event(2, "$2", "m.room.message", None)])
        .await
        .expect("2");
    store
        .append_events(&[&event(3, "$3", "m.room.name", Some(""))])
        .await
        .expect("3");
    let at2: Vec<_> = store
        .state_at("!r:x", 2)
        .await
        .expect("at2")
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(at2, vec!["$1"]);
    let now: Vec<_> = store
        .current_state("!r:x")
        .await
        .expect("now")
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(now, vec!["$3"]);
    assert_eq!(store.max_stream_pos().await.expect("max"), 3);
}

#[tokio::test]
async fn txn_is_recorded_with_the_event() {
    let (_dir, store) = temp_store().await;
    let mut e = event(1, "$1", "m.room.message", None);
    e.txn = Some(("@a:x".into(), "DEV".into(), "t1".into()));
    store.append_events(&[&e]).await.expect("append");
    assert_eq!(
        store
            .txn_event("@a:x", "DEV", "!r:x", "m.room.message", "t1")
            .await
            .expect("q")
            .as_deref(),
        Some("$1")
    );
    assert_eq!(
        store
            .txn_event("@a:x", "OTHER", "!r:x", "m.room.message", "t1")
            .await
            .expect("q"),
        None
    );
    // A duplicate stream position is refused and leaves no half-written txn record.
    let mut dup = event(1, "$2", "m.room.message", None);
    dup.txn = Some(("@a:x".into(), "DEV".into(), "t2".into()));
    assert!(store.append_events(&[&dup]).await.is_err());
    assert_eq!(
        store
            .txn_event("@a:x", "DEV", "!r:x", "m.room.message", "t2")
            .await
            .expect("q"),
        None
    );
}

#[tokio::test]
async fn refuses_newer_schema() {
    let (db, store) = temp_store().await;
    on_db!(store, |write, read| {
        sqlx::query("UPDATE schema_version SET version = 999")
            .execute(write)
            .await
            .expect("bump");
    });
    store.close().await;
    let err = Store::open(&db.settings()).await.expect_err("must refuse");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn filter_ids_count_per_user() {
    let (_dir, store) = temp_store().await;
    assert_eq!(store.create_filter("@a:x", "{}").await.expect("f"), 0);
    assert_eq!(store.create_filter("@a:x", "{\"x\":1}").await.expect("f"), 1);
    assert_eq!(store.create_filter("@b:x", "{}").await.expect("f"), 0);
    assert_eq!(
        store.filter("@a:x", 1).await.expect("f").as_deref(),
        Some("{\"x\":1}")
    );
}

#[tokio::test]
async fn concurrent_claims_take_distinct_one_time_keys() {
    let (_db, store) = temp_store().await;
    for i in 0..20 {
        store
            .add_one_time_key("@a:x", "DEV", "signed_curve25519", &format!("AAAA{i:02}"), "k")
            .await
            .expect("add");
    }
    store
        .set_fallback_key("@a:x", "DEV", "signed_curve25519", "FALLBACK", "f")
        .await
        .expect("fallback");
    let claims: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim_key("@a:x", "DEV", "signed_curve25519").await })
        })
        .collect();
    let mut ids = Vec::new();
    for claim in claims {
        let (id, _) = claim.await.expect("task").expect("claim").expect("a key");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        20,
        "twenty different one-time keys, no fallback: {ids:?}"
    );
    let last = store
        .claim_key("@a:x", "DEV", "signed_curve25519")
        .await
        .expect("claim");
    assert_eq!(last.map(|(id, _)| id).as_deref(), Some("FALLBACK"));
}

#[tokio::test]
async fn concurrent_filters_get_distinct_ids() {
    let (_db, store) = temp_store().await;
    let creations: Vec<_> = (0..10)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.create_filter("@a:x", &format!("{{\"n\":{i}}}")).await })
        })
        .collect();
    let mut ids = Vec::new();
    for creation in creations {
        ids.push(creation.await.expect("task").expect("filter"));
    }
    ids.sort();
    assert_eq!(ids, (0..10).collect::<Vec<i64>>());
}

#[tokio::test]
async fn refuses_a_synapse_sqlite_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("homeserver.db");
    {
        let store = Store::open_sqlite(&path).await.expect("open");
        on_db!(store, |write, read| {
            sqlx::raw_sql(
                "DROP TABLE schema_version;
                 CREATE TABLE schema_version (lock CHAR(1) NOT NULL DEFAULT 'X', version INTEGER NOT NULL, upgraded BOOL NOT NULL);
                 INSERT INTO schema_version (version, upgraded) VALUES (92, 1)",
            )
            .execute(write)
            .await
            .expect("synapse-like");
        });
        store.close().await;
    }
    let err = Store::open_sqlite(&path).await.expect_err("refused");
    assert!(
        err.to_string().contains("homeserver.db") && err.to_string().contains("not Switchboard's"),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_logins_to_one_device_leave_one_session() {
    let (_db, store) = temp_store().await;
    let logins: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .add_device_token("@a:x", "DEV", None, &format!("hash{i}"), 0)
                    .await
            })
        })
        .collect();
    for login in logins {
        login.await.expect("task").expect("login");
    }
    let mut sessions = 0;
    for i in 0..8 {
        if store
            .session_by_token(&format!("hash{i}"))
            .await
            .expect("q")
            .is_some()
        {
            sessions += 1;
        }
    }
    assert_eq!(sessions, 1, "the last login replaced the others");
}

#[test]
fn postgres_urls_read_as_libpq_does() {
    let s = PostgresSettings::from_url("postgresql://bob%40corp:pa+ss%2Fw@[::1]:5433/my+db?sslmode=require")
        .expect("parses");
    assert_eq!(s.user.as_deref(), Some("bob@corp"));
    assert_eq!(
        s.password.as_deref(),
        Some("pa+ss/w"),
        "`+` is itself, not a space"
    );
    assert_eq!(
        (s.host.as_str(), s.port),
        ("::1", 5433),
        "no brackets around IPv6"
    );
    assert_eq!(s.dbname, "my+db");
    assert_eq!(s.ssl_mode.as_deref(), Some("require"));
    let socket = PostgresSettings::from_url("postgresql:///sb?host=/run/postgresql").expect("parses");
    assert_eq!(
        (socket.host.as_str(), socket.dbname.as_str()),
        ("/run/postgresql", "sb")
    );
    assert!(
        PostgresSettings::from_url("postgresql://h/").is_err(),
        "no database"
    );
    assert!(PostgresSettings::from_url("postgresql://h/db?sslmode=sometimes").is_err());
    assert!(PostgresSettings::from_url("mysql://h/db").is_err());
}
