//! Protocol-level behaviour: errors, CORS, discovery, body limits.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, enc, errcode};

#[tokio::test]
async fn unknown_endpoints_and_methods_are_unrecognized() {
    let s = Server::start().await;
    let (status, body) = s
        .call(Method::GET, "/_matrix/client/v3/no/such/thing", None, None)
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_UNRECOGNIZED")
    );
    let (status, body) = s
        .call(Method::DELETE, "/_matrix/client/v3/createRoom", None, None)
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED")
    );
}

#[tokio::test]
async fn missing_or_unknown_tokens_are_401_and_query_tokens_work() {
    let s = Server::start().await;
    let (status, body) = s
        .call(Method::GET, "/_matrix/client/v3/account/whoami", None, None)
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN")
    );
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some("nope"),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
    );
    assert_eq!(body["soft_logout"], false);

    let alice = s.register("alice").await;
    // matrix-nio sends the token as a query parameter on every request.
    let (status, body) = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/account/whoami?access_token={}", alice.token),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["user_id"], alice.user_id);
    assert_eq!(body["device_id"], alice.device_id);
}

#[tokio::test]
async fn non_json_misshaped_or_oversized_bodies_are_not_json_bad_json_or_too_large() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let client = reqwest::Client::new();
    let url = format!("{}/_matrix/client/v3/createRoom", s.base);
    let r = client
        .post(&url)
        .bearer_auth(&alice.token)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["errcode"],
        "M_NOT_JSON"
    );

    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({"invite": "not-a-list"})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));

    let huge = "x".repeat(2 * 1024 * 1024);
    let r = client
        .post(&url)
        .bearer_auth(&alice.token)
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["errcode"],
        "M_TOO_LARGE"
    );
}

#[tokio::test]
async fn cors_on_every_response_and_preflight() {
    let s = Server::start().await;
    let client = reqwest::Client::new();
    let preflight = client
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/sync", s.base))
        .header("Origin", "https://app.element.io")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("options");
    assert!(preflight.status().is_success());
    for response in [
        preflight,
        client
            .get(format!("{}/_matrix/client/v3/nothing", s.base))
            .send()
            .await
            .expect("get"),
    ] {
        let headers = response.headers();
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(
            headers["access-control-allow-methods"]
                .to_str()
                .expect("ascii")
                .contains("PUT")
        );
        assert!(
            headers["access-control-allow-headers"]
                .to_str()
                .expect("ascii")
                .contains("Authorization")
        );
    }
}

#[tokio::test]
async fn versions_and_well_known_advertise_spec_versions_and_public_baseurl() {
    let s = Server::start_with(&format!(
        "{}\npublic_baseurl: https://matrix.example.org/",
        crate::harness::RELAXED_LIMITS
    ))
    .await;
    let (status, body) = s.call(Method::GET, "/_matrix/client/versions", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["versions"]
            .as_array()
            .expect("list")
            .iter()
            .any(|v| v == "v1.1")
    );
    let (_, body) = s
        .call(Method::GET, "/.well-known/matrix/client", None, None)
        .await;
    assert_eq!(body["m.homeserver"]["base_url"], "https://matrix.example.org/");
}

#[tokio::test]
async fn message_rate_limit_reports_retry_after() {
    let limits = "rc_message: {per_second: 0.5, burst_count: 3}";
    let s = Server::start_with(limits).await;
    let alice = s.register("alice").await;
    // Creating the room is the first of alice's three actions.
    let room = s.create_room(&alice, json!({})).await;
    assert_eq!(s.send_text(&alice, &room, "1", "a").await.0, StatusCode::OK);
    assert_eq!(s.send_text(&alice, &room, "2", "b").await.0, StatusCode::OK);
    let (status, body) = s.send_text(&alice, &room, "3", "c").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED")
    );
    let retry = body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 0 && retry <= 2000, "{retry}");
}

/// Every endpoint that writes is limited under Synapse's keys: `rc_message` also covers
/// `createRoom`, profile changes, `sendToDevice` and `keys/upload`; `rc_joins`, `rc_invites`
/// (per issuer, per invitee) and `rc_media_create` their own actions; moderators' redactions
/// count under `rc_admin_redaction`. A service registered with `rate_limited: false` is exempt.
#[tokio::test]
async fn every_writing_endpoint_is_rate_limited_under_synapses_keys() {
    use crate::fake_as::{Registration, as_user, register_ghost};
    let one = "{per_second: 0.001, burst_count: 1}";
    let many = "{per_second: 1000, burst_count: 1000}";
    let limits = format!(
        "rc_message: {one}\nrc_registration: {many}\nrc_login: {{address: {many}, account: {many}, failed_attempts: {many}}}\n\
         rc_joins: {{local: {one}}}\nrc_invites: {{per_room: {many}, per_user: {one}, per_issuer: {one}}}\n\
         rc_media_create: {one}\nrc_admin_redaction: {{per_second: 0.001, burst_count: 5}}\n"
    );
    let exempt = Registration::new("exempt", None)
        .users("@_x_.*:localhost", true)
        .extra("rate_limited: false\n");
    let (dir, paths) = crate::fake_as::write_registrations(&[("exempt.yaml", &exempt.yaml())]);
    let _keep = dir;
    let s = Server::start_with(&format!("{}{limits}", crate::fake_as::config_files_yaml(&paths))).await;
    let limited = |(status, body): (StatusCode, Value), what: &str| {
        assert_eq!(
            (status, errcode(&body)),
            (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            "{what}: {body}"
        );
    };
    let user = |name: &'static str| s.register(name);

    let alice = user("alice").await;
    s.create_room(&alice, json!({})).await;
    limited(
        s.call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({})),
        )
        .await,
        "a second createRoom",
    );

    let bob = user("bob").await;
    let displayname = format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id));
    s.ok(
        Method::PUT,
        &displayname,
        &bob.token,
        json!({"displayname": "Bob"}),
    )
    .await;
    limited(
        s.call(
            Method::PUT,
            &displayname,
            Some(&bob.token),
            Some(json!({"displayname": "Bobby"})),
        )
        .await,
        "a second profile change",
    );

    let carol = user("carol").await;
    let to_device = |txn: &str| format!("/_matrix/client/v3/sendToDevice/m.test/{txn}");
    let message = json!({"messages": {carol.user_id.clone(): {"*": {"x": 1}}}});
    s.ok(Method::PUT, &to_device("1"), &carol.token, message.clone())
        .await;
    limited(
        s.call(Method::PUT, &to_device("2"), Some(&carol.token), Some(message))
            .await,
        "a second sendToDevice",
    );

    let dave = user("dave").await;
    let keys = json!({"one_time_keys": {"signed_curve25519:A": {"key": "a"}}});
    s.ok(
        Method::POST,
        "/_matrix/client/v3/keys/upload",
        &dave.token,
        keys.clone(),
    )
    .await;
    limited(
        s.call(
            Method::POST,
            "/_matrix/client/v3/keys/upload",
            Some(&dave.token),
            Some(keys),
        )
        .await,
        "a second keys/upload",
    );

    let (erin, gina, frank) = (user("erin").await, user("gina").await, user("frank").await);
    let first = s.create_room(&erin, json!({"preset": "public_chat"})).await;
    let second = s.create_room(&gina, json!({"preset": "public_chat"})).await;
    let join = |room: &str| format!("/_matrix/client/v3/rooms/{}/join", enc(room));
    s.ok(Method::POST, &join(&first), &frank.token, json!({})).await;
    s.ok(Method::POST, &join(&first), &frank.token, json!({})).await;
    limited(
        s.call(Method::POST, &join(&second), Some(&frank.token), Some(json!({})))
            .await,
        "a second join (joining again was free)",
    );

    let (harry, liam, ivan, judy) = (
        user("harry").await,
        user("liam").await,
        user("ivan").await,
        user("judy").await,
    );
    let harrys = s.create_room(&harry, json!({})).await;
    let liams = s.create_room(&liam, json!({})).await;
    let invite = |room: &str| format!("/_matrix/client/v3/rooms/{}/invite", enc(room));
    s.ok(
        Method::POST,
        &invite(&harrys),
        &harry.token,
        json!({"user_id": ivan.user_id}),
    )
    .await;
    limited(
        s.call(
            Method::POST,
            &invite(&harrys),
            Some(&harry.token),
            Some(json!({"user_id": judy.user_id})),
        )
        .await,
        "a second invite by one inviter",
    );
    limited(
        s.call(
            Method::POST,
            &invite(&liams),
            Some(&liam.token),
            Some(json!({"user_id": ivan.user_id})),
        )
        .await,
        "a second invite of one invitee",
    );
    s.ok(
        Method::POST,
        &invite(&liams),
        &liam.token,
        json!({"user_id": judy.user_id}),
    )
    .await;

    let kate = user("kate").await;
    s.ok(Method::POST, "/_matrix/media/v1/create", &kate.token, json!({}))
        .await;
    limited(
        s.call(
            Method::POST,
            "/_matrix/media/v1/create",
            Some(&kate.token),
            Some(json!({})),
        )
        .await,
        "a second media create",
    );

    // mona's one message went into creating the room; removing nick's spam is moderation.
    let (mona, nick) = (user("mona").await, user("nick").await);
    let room = s.create_room(&mona, json!({"preset": "public_chat"})).await;
    s.ok(Method::POST, &join(&room), &nick.token, json!({})).await;
    let spam = s.send_text(&nick, &room, "1", "spam").await.1["event_id"]
        .as_str()
        .expect("event")
        .to_owned();
    let redact = format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&spam));
    s.ok(Method::PUT, &redact, &mona.token, json!({})).await;
    limited(
        s.send_text(&mona, &room, "m", "hello").await,
        "her own messages still count",
    );

    // The exempt service's users do all of it as often as they like.
    let ghost = register_ghost(&s, &exempt.as_token, "_x_ghost").await;
    for _ in 0..3 {
        s.ok(
            Method::POST,
            &as_user("/_matrix/client/v3/createRoom", &ghost),
            &exempt.as_token,
            json!({}),
        )
        .await;
    }
}
