//! Protocol-level behaviour: errors, CORS, discovery, body limits.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{Server, errcode};

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
async fn token_errors() {
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
async fn malformed_bodies() {
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
async fn discovery() {
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
    let limits = "rc_message: {per_second: 0.5, burst_count: 2}";
    let s = Server::start_with(limits).await;
    let alice = s.register("alice").await;
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
