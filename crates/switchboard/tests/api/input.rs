//! Input rules on every path: malformed user IDs, malformed content of the events the server
//! interprets, and NUL in request bodies are the client's mistake, answered with `400` and a
//! precise errcode, never "unknown user", `403` or a database error.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    fake_as::{Registration, as_user, start_server},
    harness::{Server, enc, errcode},
};

const BAD_USER_IDS: &[&str] = &[
    "@bad user:localhost",
    "@bad\u{1}user:localhost",
    "@:localhost",
    "@caf\u{e9}:localhost",
];

fn long_user_id() -> String {
    format!("@{}:localhost", "a".repeat(250))
}

#[tokio::test]
async fn a_malformed_user_id_is_400_wherever_it_appears() {
    let service = Registration::new("bridge", None).users("@.*:localhost", false);
    let (s, _files) = start_server(&[&service]).await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let mut bad: Vec<String> = BAD_USER_IDS.iter().map(|u| (*u).to_owned()).collect();
    bad.push(long_user_id());
    let is_400 = |status: StatusCode, body: &Value| {
        status == StatusCode::BAD_REQUEST
            && matches!(
                errcode(body),
                "M_INVALID_PARAM" | "M_BAD_JSON" | "M_INVALID_USERNAME"
            )
    };
    for user in &bad {
        for action in ["invite", "kick", "ban", "unban"] {
            let (status, body) = s
                .call(
                    Method::POST,
                    &format!("/_matrix/client/v3/rooms/{}/{action}", enc(&room)),
                    Some(&alice.token),
                    Some(json!({"user_id": user})),
                )
                .await;
            assert!(is_400(status, &body), "{action} {user:?}: {status} {body}");
        }
        let (status, body) = s
            .call(
                Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&alice.token),
                Some(json!({"invite": [user]})),
            )
            .await;
        assert!(
            is_400(status, &body),
            "createRoom invite {user:?}: {status} {body}"
        );
        for path in [
            format!("/_matrix/client/v3/profile/{}", enc(user)),
            format!("/_matrix/client/v3/profile/{}/displayname", enc(user)),
        ] {
            let (status, body) = s.call(Method::GET, &path, Some(&alice.token), None).await;
            assert!(is_400(status, &body), "GET {path}: {status} {body}");
        }
        let whoami = as_user("/_matrix/client/v3/account/whoami", user);
        let (status, body) = s.call(Method::GET, &whoami, Some(&service.as_token), None).await;
        assert!(is_400(status, &body), "masquerade as {user:?}: {status} {body}");
    }
    for username in ["bad user", "bad\u{1}", "caf\u{e9}", &"a".repeat(250)] {
        for (token, body) in [
            (
                None,
                json!({"username": username, "password": "pw", "auth": {"type": "m.login.dummy"}}),
            ),
            (
                Some(service.as_token.as_str()),
                json!({"type": "m.login.application_service", "username": username}),
            ),
        ] {
            let (status, answer) = s
                .call(Method::POST, "/_matrix/client/v3/register", token, Some(body))
                .await;
            assert!(
                is_400(status, &answer),
                "register {username:?}: {status} {answer}"
            );
        }
    }
    // The room is untouched and usable.
    let (status, _) = s.send_text(&alice, &room, "1", "still fine").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_content_of_interpreted_events_is_bad_json_not_forbidden() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let power_levels = s.state(&alice, &room, "m.room.power_levels", "").await;
    let mut string_level = power_levels.clone();
    string_level["users"][&alice.user_id] = json!("100");
    let cases = [
        ("m.room.power_levels", "", string_level),
        ("m.room.power_levels", "", json!({"ban": 1.5})),
        ("m.room.member", alice.user_id.as_str(), json!({"membership": 5})),
        (
            "m.room.member",
            alice.user_id.as_str(),
            json!({"membership": ["join"]}),
        ),
        ("m.room.join_rules", "", json!({"join_rule": 5})),
        ("m.room.join_rules", "", json!({})),
        (
            "m.room.history_visibility",
            "",
            json!({"history_visibility": true}),
        ),
        ("m.room.canonical_alias", "", json!({"alias": "not-an-alias"})),
    ];
    for (kind, key, content) in cases {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{kind}/{}",
            enc(&room),
            enc(key)
        );
        let (status, body) = s
            .call(Method::PUT, &path, Some(&alice.token), Some(content.clone()))
            .await;
        assert_eq!(
            (status, errcode(&body)),
            (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            "{kind} {content}: {body}"
        );
    }
    let (status, body) = s
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice.token),
            Some(json!({"initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": 1}}]})),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "createRoom's initial_state: {body}"
    );
    // Well-formed ones still pass, and still meet the auth rules.
    assert_eq!(
        s.state(&alice, &room, "m.room.power_levels", "").await,
        power_levels,
        "nothing half-applied"
    );
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules/", enc(&room)),
        &alice.token,
        json!({"join_rule": "public"}),
    )
    .await;
}

/// PostgreSQL cannot keep NUL in text: refused up front, the same on both engines.
#[tokio::test]
async fn nul_in_a_body_is_bad_json_on_every_engine() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let nul = "a\u{0}b";
    let calls = [
        (
            Method::PUT,
            format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            json!({"displayname": nul}),
        ),
        (
            Method::PUT,
            format!("/_matrix/client/v3/devices/{}", alice.device_id),
            json!({"display_name": nul}),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/createRoom".to_owned(),
            json!({"name": nul}),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/createRoom".to_owned(),
            json!({"room_alias_name": nul}),
        ),
        (
            Method::PUT,
            format!(
                "/_matrix/client/v3/user/{}/account_data/m.example",
                enc(&alice.user_id)
            ),
            json!({nul: 1}),
        ),
    ];
    for (method, path, body) in calls {
        let (status, answer) = s
            .call(method.clone(), &path, Some(&alice.token), Some(body.clone()))
            .await;
        assert_eq!(
            (status, errcode(&answer)),
            (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            "{method} {path} {body}: {answer}"
        );
    }
    // A backslash followed by `u0000` is text, not NUL.
    s.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
        &alice.token,
        json!({"displayname": "a\\u0000b"}),
    )
    .await;
    let profile = s
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(profile["displayname"], "a\\u0000b");
}
