//! Server-side key backup (`/room_keys`): versions, keys kept by the spec's replacement rule,
//! `etag` and `count`, and the errors clients rely on.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, errcode};

const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

fn key(first_message_index: u32, forwarded_count: u32, is_verified: bool, tag: &str) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": { "ephemeral": tag, "ciphertext": tag, "mac": tag },
    })
}

#[tokio::test]
async fn a_backup_keeps_the_best_copy_of_each_session_and_refuses_old_versions() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let room = "!room:localhost";

    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/room_keys/version",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    let auth_data = json!({ "public_key": "abcdefg", "signatures": {} });
    let created = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/room_keys/version",
            &alice.token,
            json!({ "algorithm": ALGORITHM, "auth_data": auth_data }),
        )
        .await;
    let v1 = created["version"].as_str().expect("version").to_owned();
    let latest = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/room_keys/version",
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(latest["version"], v1.as_str());
    assert_eq!(latest["algorithm"], ALGORITHM);
    assert_eq!(latest["auth_data"], auth_data);
    assert_eq!(latest["count"], 0);
    let etag0 = latest["etag"].as_str().expect("etag").to_owned();

    // Bob has no backup of his own, and Alice's version is not his.
    let (status, _) = s
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/room_keys/version/{v1}"),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let keys_path = format!("/_matrix/client/v3/room_keys/keys?version={v1}");
    let put = s
        .ok(
            Method::PUT,
            &keys_path,
            &alice.token,
            json!({ "rooms": { room: { "sessions": {
                "s1": key(5, 1, false, "first"),
                "s2": key(0, 0, true, "two"),
            } } } }),
        )
        .await;
    assert_eq!(put["count"], 2);
    let etag1 = put["etag"].as_str().expect("etag").to_owned();
    assert_ne!(etag1, etag0);

    // s1: a verified copy beats it even from a later index; then a worse one changes nothing.
    let session_path = |session: &str| {
        format!(
            "/_matrix/client/v3/room_keys/keys/{}/{session}?version={v1}",
            crate::harness::enc(room)
        )
    };
    let put = s
        .ok(
            Method::PUT,
            &session_path("s1"),
            &alice.token,
            key(9, 0, true, "verified"),
        )
        .await;
    let etag2 = put["etag"].as_str().expect("etag").to_owned();
    assert_ne!(etag2, etag1);
    let put = s
        .ok(
            Method::PUT,
            &session_path("s1"),
            &alice.token,
            key(0, 0, false, "unverified"),
        )
        .await;
    assert_eq!(put["etag"], etag2.as_str(), "a worse copy changes nothing");
    let put = s
        .ok(
            Method::PUT,
            &session_path("s1"),
            &alice.token,
            key(9, 3, true, "forwarded more"),
        )
        .await;
    assert_eq!(put["etag"], etag2.as_str());
    s.ok(
        Method::PUT,
        &session_path("s1"),
        &alice.token,
        key(2, 0, true, "earlier"),
    )
    .await;
    let s1 = s
        .ok(Method::GET, &session_path("s1"), &alice.token, json!({}))
        .await;
    assert_eq!(s1, key(2, 0, true, "earlier"));

    let all = s.ok(Method::GET, &keys_path, &alice.token, json!({})).await;
    assert_eq!(
        all["rooms"][room]["sessions"]
            .as_object()
            .map(|sessions| sessions.len()),
        Some(2),
        "{all}"
    );
    let room_keys = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/room_keys/keys/{}?version={v1}",
                crate::harness::enc(room)
            ),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(room_keys["sessions"]["s2"], key(0, 0, true, "two"));
    let empty_room = s
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/room_keys/keys/{}?version={v1}",
                crate::harness::enc("!other:localhost")
            ),
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(empty_room, json!({ "sessions": {} }));
    let (status, body) = s
        .call(Method::GET, &session_path("nope"), Some(&alice.token), None)
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    // A new version: uploads to the old one are refused with the current version named; the
    // old one can still be read.
    let v2 = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/room_keys/version",
            &alice.token,
            json!({ "algorithm": ALGORITHM, "auth_data": { "public_key": "newkey" } }),
        )
        .await["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert_ne!(v2, v1);
    let (status, body) = s
        .call(
            Method::PUT,
            &session_path("s3"),
            Some(&alice.token),
            Some(key(0, 0, false, "late")),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION")
    );
    assert_eq!(body["current_version"], v2.as_str());
    let old = s.ok(Method::GET, &keys_path, &alice.token, json!({})).await;
    assert_eq!(old, all);

    // Updating: same algorithm only, body version must match the path.
    let version_path = format!("/_matrix/client/v3/room_keys/version/{v2}");
    s.ok(
        Method::PUT,
        &version_path,
        &alice.token,
        json!({ "algorithm": ALGORITHM, "auth_data": { "public_key": "rotated" }, "version": v2 }),
    )
    .await;
    let got = s.ok(Method::GET, &version_path, &alice.token, json!({})).await;
    assert_eq!(got["auth_data"]["public_key"], "rotated");
    for (body, code) in [
        (
            json!({ "algorithm": "m.other", "auth_data": {} }),
            "M_INVALID_PARAM",
        ),
        (
            json!({ "algorithm": ALGORITHM, "auth_data": {}, "version": v1 }),
            "M_INVALID_PARAM",
        ),
        (json!({ "algorithm": ALGORITHM }), "M_BAD_JSON"),
    ] {
        let (status, answer) = s
            .call(Method::PUT, &version_path, Some(&alice.token), Some(body.clone()))
            .await;
        assert_eq!(
            (status, errcode(&answer)),
            (StatusCode::BAD_REQUEST, code),
            "{body}"
        );
    }

    // Deleting keys and versions.
    let deleted = s
        .ok(Method::DELETE, &session_path("s1"), &alice.token, json!({}))
        .await;
    assert_eq!(deleted["count"], 1);
    s.ok(Method::DELETE, &version_path, &alice.token, json!({})).await;
    let latest = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/room_keys/version",
            &alice.token,
            json!({}),
        )
        .await;
    assert_eq!(
        latest["version"],
        v1.as_str(),
        "the older version is current again"
    );
    let v3 = s
        .ok(
            Method::POST,
            "/_matrix/client/v3/room_keys/version",
            &alice.token,
            json!({ "algorithm": ALGORITHM, "auth_data": {} }),
        )
        .await["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert!(v3 != v2 && v3 != v1, "a deleted version's number is not reused");

    for (method, path, code, status) in [
        (
            Method::GET,
            "/_matrix/client/v3/room_keys/keys".to_owned(),
            "M_MISSING_PARAM",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/_matrix/client/v3/room_keys/keys?version={v2}"),
            "M_NOT_FOUND",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/_matrix/client/v3/room_keys/version/banana".to_owned(),
            "M_NOT_FOUND",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            format!("/_matrix/client/v3/room_keys/version/{v2}"),
            "M_NOT_FOUND",
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (got, body) = s.call(method.clone(), &path, Some(&alice.token), None).await;
        assert_eq!((got, errcode(&body)), (status, code), "{method} {path}");
    }
    let (status, body) = s
        .call(
            Method::PUT,
            &format!("/_matrix/client/v3/room_keys/keys?version={v3}"),
            Some(&alice.token),
            Some(json!({ "rooms": { room: { "sessions": { "s": { "first_message_index": 0 } } } } })),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
}
