//! Operating the server: shared-secret registration, the appservice admin commands, hot reload.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    fake_as::{FakeAs, Registration, start_server},
    harness::{Server, binary, errcode},
};

pub(crate) async fn shared_secret_register(
    s: &Server,
    username: &str,
    admin: bool,
    secret: &str,
) -> (StatusCode, Value) {
    let nonce = s
        .call(Method::GET, "/_synapse/admin/v1/register", None, None)
        .await
        .1["nonce"]
        .as_str()
        .expect("nonce")
        .to_owned();
    let mac = switchboard_core_mac(secret, &nonce, username, "pw", admin);
    let body = json!({"nonce": nonce, "username": username, "password": "pw", "admin": admin, "mac": mac});
    s.call(Method::POST, "/_synapse/admin/v1/register", None, Some(body))
        .await
}

/// The MAC as Synapse's `register_new_matrix_user` computes it, done by the test independently:
/// HMAC-SHA1 via the `openssl` command line.
fn switchboard_core_mac(secret: &str, nonce: &str, user: &str, password: &str, admin: bool) -> String {
    let message = format!(
        "{nonce}\0{user}\0{password}\0{}",
        if admin { "admin" } else { "notadmin" }
    );
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha1", "-hmac", secret, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

#[tokio::test]
async fn shared_secret_registration_creates_admins() {
    let s = Server::start().await;
    // The harness config's registration_shared_secret is "test".
    let (status, body) = shared_secret_register(&s, "root", true, "test").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@root:localhost");
    let token = body["access_token"].as_str().expect("token").to_owned();
    let (status, _) = s
        .call(
            Method::GET,
            "/_switchboard/admin/v1/appservices",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the new account is a server admin");

    let (status, body) = shared_secret_register(&s, "mallory", true, "wrong secret").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let reused =
        json!({"nonce": "never-issued", "username": "x", "password": "pw", "admin": false, "mac": "00"});
    let (status, _) = s
        .call(Method::POST, "/_synapse/admin/v1/register", None, Some(reused))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let alice = s.register("alice").await;
    let (status, body) = s
        .call(
            Method::GET,
            "/_switchboard/admin/v1/appservices",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "admins only"
    );
}

// Multi-threaded: the CLI runs as a blocking child process while the fake service answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appservice_cli_lists_and_pings_and_sighup_loads_only_valid_registrations() {
    let service = FakeAs::start().await;
    let registration = Registration::new("bridge", Some(&service.url)).users("@_old_.*:localhost", true);
    let (s, files) = start_server(&[&registration]).await;
    let (_, body) = shared_secret_register(&s, "root", true, "test").await;
    let token = body["access_token"].as_str().expect("token").to_owned();

    let cli = |args: &[&str]| {
        std::process::Command::new(binary())
            .arg("appservice")
            .args(args)
            .args(["--homeserver", &s.base, "--token", &token])
            .output()
            .expect("run")
    };
    let list = cli(&["list"]);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("bridge") && text.contains("true"), "{text}");
    let ping = cli(&["ping", "bridge"]);
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stderr));
    assert!(String::from_utf8_lossy(&ping.stdout).contains("duration_ms"));
    let unknown = cli(&["show", "nope"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("M_NOT_FOUND") && stderr.contains("nope"),
        "unknown services are an error naming them: {stderr}"
    );

    let register = |localpart: &str| {
        let body =
            json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true});
        s.call(
            Method::POST,
            "/_matrix/client/v3/register",
            Some(&registration.as_token),
            Some(body),
        )
    };
    let (status, body) = register("_new_a").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"),
        "not in the namespace yet"
    );

    // A valid new registration replaces the old one on SIGHUP, without a restart.
    let path = files.path().join("bridge.yaml");
    let changed = registration.clone().users("@_new_.*:localhost", true);
    std::fs::write(&path, changed.yaml()).expect("rewrite");
    s.signal("HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if register("_new_a").await.0 == StatusCode::OK {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the new namespace is in effect: {}", s.log());

    // An invalid set is refused and the previous one kept.
    std::fs::write(&path, "id: bridge\nnamespaces: {}\n").expect("break it");
    s.signal("HUP");
    wait_for_log(&s, "registrations not reloaded").await;
    assert_eq!(register("_new_b").await.0, StatusCode::OK, "old set still active");
}

/// Adding a bridge needs no restart: a file added to `app_service_config_files` is loaded on
/// `SIGHUP` (its `as_token` works, it receives events), one removed from the list is unloaded,
/// and a list naming a broken file is refused whole.
#[tokio::test]
async fn hot_reload_loads_files_added_to_the_config_and_unloads_removed_ones() {
    let fake = FakeAs::start().await;
    let old = Registration::new("old", None).users("@_old_.*:localhost", true);
    let (s, files) = start_server(&[&old]).await;
    let alice = s.register("alice").await;
    let config = std::fs::read_to_string(s.config_path()).expect("config");
    let old_path = files.path().join("old.yaml");
    let new_path = files.path().join("new.yaml");
    let new = Registration::new("new", Some(&fake.url)).users("@alice:localhost", false);
    std::fs::write(&new_path, new.yaml()).expect("write");
    let listed = |paths: &[&std::path::Path]| {
        let paths: Vec<_> = paths.iter().map(|p| p.to_path_buf()).collect();
        let old_list = crate::fake_as::config_files_yaml(std::slice::from_ref(&old_path));
        assert!(config.contains(&old_list), "the config lists the old file");
        config.replace(&old_list, &crate::fake_as::config_files_yaml(&paths))
    };
    let reload_until = |token: String, want: StatusCode| {
        let s = &s;
        async move {
            for _ in 0..100 {
                if whoami(s, &token).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the reload did not take effect ({want} for {token}): {}", s.log());
        }
    };
    assert_eq!(whoami(&s, &new.as_token).await, StatusCode::UNAUTHORIZED);

    // Added to the list: loaded.
    std::fs::write(s.config_path(), listed(&[&old_path, &new_path])).expect("config");
    s.signal("HUP");
    reload_until(new.as_token.clone(), StatusCode::OK).await;
    let room = s.create_room(&alice, json!({})).await;
    s.send_text(&alice, &room, "1", "for-the-new-service").await;
    fake.wait_for_events(
        |events| crate::fake_as::message_bodies(events).contains(&"for-the-new-service".to_owned()),
        Duration::from_secs(20),
    )
    .await;

    // A list naming a file that does not exist is refused whole: both services stay.
    let missing = files.path().join("missing.yaml");
    std::fs::write(s.config_path(), listed(&[&new_path, &missing])).expect("config");
    s.signal("HUP");
    wait_for_log(&s, "missing.yaml").await;
    assert_eq!(whoami(&s, &old.as_token).await, StatusCode::OK, "old set kept");
    assert_eq!(whoami(&s, &new.as_token).await, StatusCode::OK, "new one too");

    // Removed from the list: unloaded.
    std::fs::write(s.config_path(), listed(&[&new_path])).expect("config");
    s.signal("HUP");
    reload_until(old.as_token.clone(), StatusCode::UNAUTHORIZED).await;
    assert_eq!(whoami(&s, &new.as_token).await, StatusCode::OK);
}

/// Waits until the server's log mentions `text` (a reload was handled), or fails.
async fn wait_for_log(s: &Server, text: &str) {
    for _ in 0..200 {
        if s.log().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the log never said {text:?}: {}", s.log());
}

async fn whoami(s: &Server, token: &str) -> StatusCode {
    s.call(
        Method::GET,
        "/_matrix/client/v3/account/whoami",
        Some(token),
        None,
    )
    .await
    .0
}

/// Cached sessions follow the database at once: a deleted device's token, a revoked admin flag
/// and a deactivated account take effect on the very next request.
#[tokio::test]
async fn cached_sessions_follow_device_deletion_admin_changes_and_deactivation() {
    let s = Server::start().await;
    let (_, body) = shared_secret_register(&s, "root", true, "test").await;
    let root = body["access_token"].as_str().expect("token").to_owned();
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let admin_list = "/_switchboard/admin/v1/appservices";
    let status = |token: &str, path: &str| {
        let (s, token, path) = (&s, token.to_owned(), path.to_owned());
        async move { s.call(Method::GET, &path, Some(&token), None).await.0 }
    };
    // Every token is used once first, so its session is cached.
    assert_eq!(status(&root, admin_list).await, StatusCode::OK);
    assert_eq!(status(&bob.token, admin_list).await, StatusCode::FORBIDDEN);

    let bob_admin = format!(
        "/_synapse/admin/v1/users/{}/admin",
        crate::harness::enc(&bob.user_id)
    );
    s.ok(Method::PUT, &bob_admin, &root, json!({"admin": true})).await;
    assert_eq!(
        status(&bob.token, admin_list).await,
        StatusCode::OK,
        "granted at once"
    );
    assert_eq!(
        s.ok(Method::GET, &bob_admin, &root, Value::Null).await["admin"],
        true
    );
    s.ok(Method::PUT, &bob_admin, &root, json!({"admin": false}))
        .await;
    assert_eq!(
        status(&bob.token, admin_list).await,
        StatusCode::FORBIDDEN,
        "revoked at once"
    );

    // A second device of alice's, deleted: its token is dead on the next request.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password", "device_id": "PHONE"});
    let phone = s
        .call(Method::POST, "/_matrix/client/v3/login", None, Some(login))
        .await
        .1["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let whoami = "/_matrix/client/v3/account/whoami";
    assert_eq!(status(&phone, whoami).await, StatusCode::OK);
    let password = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password"}});
    s.ok(
        Method::DELETE,
        "/_matrix/client/v3/devices/PHONE",
        &alice.token,
        password.clone(),
    )
    .await;
    assert_eq!(status(&phone, whoami).await, StatusCode::UNAUTHORIZED);

    // Deactivation: the password first, then every token is dead, the rooms left, the name kept.
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/join", crate::harness::enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;
    let (code, challenge) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/account/deactivate",
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert!(
        crate::harness::is_password_challenge(code, &challenge),
        "user-interactive auth first: {challenge}"
    );
    let done = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/account/deactivate",
            &alice.token,
            password,
        )
        .await;
    assert_eq!(done["id_server_unbind_result"], "no-support");
    let (code, body) = s.call(Method::GET, whoami, Some(&alice.token), None).await;
    assert_eq!(
        (code, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
    );
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password"});
    let (code, _) = s
        .call(Method::POST, "/_matrix/client/v3/login", None, Some(login))
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "no login any more");
    let members = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/joined_members",
                crate::harness::enc(&room)
            ),
            &bob.token,
            Value::Null,
        )
        .await;
    assert!(
        members["joined"].get(&alice.user_id).is_none(),
        "alice left: {members}"
    );
    let (code, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/register/available?username=alice",
            None,
            None,
        )
        .await;
    assert_eq!((code, errcode(&body)), (StatusCode::BAD_REQUEST, "M_USER_IN_USE"));
}

#[tokio::test]
async fn prometheus_metrics_on_a_metrics_listener() {
    let metrics_port = crate::harness::free_port();
    let listener = format!(
        "listeners:\n  - port: {metrics_port}\n    type: metrics\n    bind_addresses: ['127.0.0.1']\n"
    );
    let service = FakeAs::start().await;
    let registration = Registration::new("bridge", Some(&service.url)).users("@_b_.*:localhost", true);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridge.yaml");
    std::fs::write(&path, registration.yaml()).expect("registration");
    let extra = format!(
        "{}\napp_service_config_files: ['{}']\n",
        crate::harness::RELAXED_LIMITS,
        path.display()
    );
    let s = Server::start_edited(&extra, |text| text.replacen("listeners:\n", &listener, 1)).await;
    let alice = s.register("alice").await;
    s.create_room(&alice, json!({})).await;

    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/_synapse/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("# TYPE switchboard_event_stream_position gauge"),
        "{text}"
    );
    assert!(
        text.contains("switchboard_appservice_up{service=\"bridge\"} 1"),
        "{text}"
    );
    assert!(text.contains("process_resident_memory_bytes"));
    let position: f64 = text
        .lines()
        .find(|l| l.starts_with("switchboard_event_stream_position "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("position");
    assert!(position >= 5.0, "room creation moved the stream: {position}");
    let (status, _) = s.call(Method::GET, "/_synapse/metrics", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not on the client listener");
}
