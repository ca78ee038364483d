//! Registration, login, logout.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{RELAXED_LIMITS, Server, errcode};

#[tokio::test]
async fn registration_asks_for_dummy_auth_and_refuses_taken_or_invalid_names() {
    let s = Server::start().await;
    // Without auth: the UIA flows, so the client knows to send m.login.dummy.
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({"username": "bob", "password": "pw"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.dummy");
    assert!(body["session"].is_string());

    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/register/available?username=bob",
            None,
            None,
        )
        .await;
    assert_eq!((status, body["available"].clone()), (StatusCode::OK, json!(true)));

    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/r0/register",
            None,
            Some(json!({"username": "bob", "password": "pw", "inhibit_login": true, "auth": {"type": "m.login.dummy"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@bob:localhost");
    assert!(body.get("access_token").is_none(), "inhibit_login gives no token");

    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/register/available?username=bob",
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_USER_IN_USE")
    );
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({"username": "bob", "password": "x"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_USER_IN_USE")
    );
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({"username": "Bad Name", "password": "x"})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_USERNAME")
    );
}

#[tokio::test]
async fn bad_logins_are_forbidden_alike_and_logout_ends_one_or_all_sessions() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let (status, body) = s.call(Method::GET, "/_matrix/client/v3/login", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["flows"]
            .as_array()
            .expect("flows")
            .iter()
            .any(|f| f["type"] == "m.login.password")
    );

    let login = |user: &str, password: &str| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password});
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(login("alice", "wrong")),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(login("nobody", "x")),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    let (status, second) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(login("@alice:localhost", "password")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second_token = second["access_token"].as_str().expect("token").to_owned();
    assert_ne!(
        second["device_id"],
        Value::from(alice.device_id.clone()),
        "a login makes a new device"
    );

    s.ok(
        Method::POST,
        "/_matrix/client/v3/logout",
        &second_token,
        json!({}),
    )
    .await;
    let (status, _) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&second_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    s.ok(
        Method::GET,
        "/_matrix/client/v3/account/whoami",
        &alice.token,
        Value::Null,
    )
    .await;

    s.ok(
        Method::POST,
        "/_matrix/client/v3/logout/all",
        &alice.token,
        json!({}),
    )
    .await;
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
    );
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let limits = "rc_login: {failed_attempts: {per_second: 0.01, burst_count: 2}}";
    let s = Server::start_with(&format!(
        "{limits}\nrc_registration: {{per_second: 100, burst_count: 100}}"
    ))
    .await;
    s.register("alice").await;
    let wrong = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "no"});
    for _ in 0..2 {
        let (status, _) = s
            .call(
                Method::POST,
                "/_matrix/client/v3/login",
                None,
                Some(wrong.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let right = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password"});
    let (status, body) = s
        .call(Method::POST, "/_matrix/client/v3/login", None, Some(right))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED")
    );
}

#[tokio::test]
async fn register_user_makes_an_account_while_the_server_is_stopped() {
    let mut s = Server::start().await;
    assert!(s.terminate().success());
    let out = std::process::Command::new(crate::harness::binary())
        .args([
            "register-user",
            "--user",
            "admin",
            "--password",
            "secret",
            "--admin",
            "--config",
        ])
        .arg(s.config_path())
        .output()
        .expect("run register-user");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.restart().await;
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "admin"}, "password": "secret"});
    let (status, body) = s
        .call(Method::POST, "/_matrix/client/v3/login", None, Some(login))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The registration limit is taken before the account is made: concurrent registrations from one
/// address cannot all pass a check made before any of them counted.
#[tokio::test]
async fn concurrent_registrations_cannot_all_pass_the_limit() {
    let s = Server::start_with(&RELAXED_LIMITS.replace(
        "rc_registration: {per_second: 1000, burst_count: 1000}",
        "rc_registration: {per_second: 0.001, burst_count: 2}",
    ))
    .await;
    let mut attempts = Vec::new();
    for i in 0..8 {
        let request = s
            .http
            .post(format!("{}/_matrix/client/v3/register", s.base))
            .json(&json!({"username": format!("racer{i}"), "password": "pw", "auth": {"type": "m.login.dummy"}}));
        attempts.push(tokio::spawn(async move {
            let response = request.send().await.expect("request");
            let status = response.status();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut results = Vec::new();
    for attempt in attempts {
        results.push(attempt.await.expect("task"));
    }
    let made = results
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    assert_eq!(made, 2, "burst_count accounts and no more: {results:?}");
    assert!(
        results
            .iter()
            .all(|(status, body)| *status == StatusCode::OK || errcode(body) == "M_LIMIT_EXCEEDED"),
        "{results:?}"
    );
    // A refused attempt (a taken name) is not charged.
    let s = Server::start_with(&RELAXED_LIMITS.replace(
        "rc_registration: {per_second: 1000, burst_count: 1000}",
        "rc_registration: {per_second: 0.001, burst_count: 2}",
    ))
    .await;
    s.register("taken").await;
    let again = json!({"username": "taken", "password": "pw", "auth": {"type": "m.login.dummy"}});
    let (status, body) = s
        .call(Method::POST, "/_matrix/client/v3/register", None, Some(again))
        .await;
    assert_eq!(errcode(&body), "M_USER_IN_USE", "{status}");
    s.register("second").await;
}

/// `X-Forwarded-For` names the client only on a listener that says a proxy stands in front of
/// it (`x_forwarded: true`); elsewhere anyone could forge it to dodge per-address limits.
#[tokio::test]
async fn x_forwarded_for_is_trusted_only_on_listeners_that_say_so() {
    let proxied_port = crate::harness::free_port();
    let limits = RELAXED_LIMITS.replace(
        "rc_registration: {per_second: 1000, burst_count: 1000}",
        "rc_registration: {per_second: 0.001, burst_count: 1}",
    );
    let s = Server::start_edited(&limits, |text| {
        text.replace(
            "listeners:\n",
            &format!(
                "listeners:\n  - {{port: {proxied_port}, bind_addresses: ['127.0.0.1'], type: http, x_forwarded: true, resources: [{{names: [client]}}]}}\n"
            ),
        )
    })
    .await;
    let register = |base: String, name: &str, forwarded: &str| {
        let body = json!({"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}});
        let request = s
            .http
            .post(format!("{base}/_matrix/client/v3/register"))
            .header("X-Forwarded-For", forwarded)
            .json(&body);
        async move { request.send().await.expect("request").status() }
    };
    let direct = s.base.clone();
    assert_eq!(register(direct.clone(), "d1", "10.0.0.1").await, StatusCode::OK);
    assert_eq!(
        register(direct, "d2", "10.0.0.2").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a forged header does not make a new client on a plain listener"
    );
    let proxied = format!("http://127.0.0.1:{proxied_port}");
    assert_eq!(register(proxied.clone(), "p1", "10.0.0.3").await, StatusCode::OK);
    assert_eq!(
        register(proxied, "p2", "10.0.0.4").await,
        StatusCode::OK,
        "behind the trusted proxy, each forwarded address is its own client"
    );
}

/// An unknown user's login costs a password hash check too, so timing does not tell which
/// accounts exist.
#[tokio::test]
async fn a_login_for_an_unknown_user_takes_as_long_as_a_wrong_password() {
    let s = Server::start().await;
    s.register("alice").await;
    let login_ms = |user: &'static str| {
        let s = &s;
        async move {
            let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "wrong"});
            let started = std::time::Instant::now();
            let (status, answer) = s
                .call(Method::POST, "/_matrix/client/v3/login", None, Some(body))
                .await;
            assert_eq!(
                (status, errcode(&answer)),
                (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
                "the same answer for both"
            );
            started.elapsed().as_secs_f64() * 1000.0
        }
    };
    // The fastest of several, so a busy machine's hiccups do not decide.
    let (mut wrong, mut unknown) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        wrong = wrong.min(login_ms("alice").await);
        unknown = unknown.min(login_ms("nobody").await);
    }
    assert!(
        unknown >= wrong * 0.5,
        "unknown user {unknown:.1} ms vs wrong password {wrong:.1} ms"
    );
}
