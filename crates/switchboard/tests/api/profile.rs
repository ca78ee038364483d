//! Profiles, account data (and its delivery through /sync), push rules, capabilities, devices.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, enc, errcode};

#[tokio::test]
async fn profile_changes_reach_member_events() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.ok(
        Method::POST,
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        &bob.token,
        json!({}),
    )
    .await;

    let path = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    assert_eq!(
        s.call(Method::GET, &path, None, None).await.1["displayname"],
        "alice",
        "localpart by default"
    );
    s.ok(
        Method::PUT,
        &format!("{path}/displayname"),
        &alice.token,
        json!({"displayname": "Alice A."}),
    )
    .await;
    s.ok(
        Method::PUT,
        &format!("{path}/avatar_url"),
        &alice.token,
        json!({"avatar_url": "mxc://localhost/abc"}),
    )
    .await;
    let profile = s.call(Method::GET, &path, None, None).await.1;
    assert_eq!(
        profile,
        json!({"displayname": "Alice A.", "avatar_url": "mxc://localhost/abc"})
    );

    let member = s.state(&bob, &room, "m.room.member", &alice.user_id).await;
    assert_eq!(member["displayname"], "Alice A.");
    assert_eq!(member["avatar_url"], "mxc://localhost/abc");
    assert_eq!(member["membership"], "join");

    let (status, body) = s
        .call(
            Method::PUT,
            &format!("{path}/displayname"),
            Some(&bob.token),
            Some(json!({"displayname": "x"})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/client/v3/profile/%40nobody%3Alocalhost",
            None,
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
}

#[tokio::test]
async fn account_data_is_stored_and_synced() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let since = s.sync(&alice, "").await["next_batch"]
        .as_str()
        .expect("t")
        .to_owned();

    let direct = format!(
        "/_matrix/client/v3/user/{}/account_data/m.direct",
        enc(&alice.user_id)
    );
    let (status, body) = s.call(Method::GET, &direct, Some(&alice.token), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    s.ok(
        Method::PUT,
        &direct,
        &alice.token,
        json!({"@bob:localhost": [room]}),
    )
    .await;
    assert_eq!(
        s.ok(Method::GET, &direct, &alice.token, Value::Null).await,
        json!({"@bob:localhost": [room]})
    );
    let tag = format!(
        "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.tag",
        enc(&alice.user_id),
        enc(&room)
    );
    s.ok(Method::PUT, &tag, &alice.token, json!({"tags": {"u.work": {}}}))
        .await;

    // An incremental sync delivers both; a long-poll wakes for account data alone.
    let sync = s.sync(&alice, &format!("since={since}&timeout=5000")).await;
    let global = sync["account_data"]["events"].as_array().expect("global");
    assert!(
        global
            .iter()
            .any(|e| e["type"] == "m.direct" && e["content"]["@bob:localhost"][0] == room.as_str()),
        "{sync}"
    );
    let room_data = sync["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .expect("room data");
    assert!(room_data.iter().any(|e| e["type"] == "m.tag"));
    let next = sync["next_batch"].as_str().expect("t").to_owned();
    let quiet = s.sync(&alice, &format!("since={next}&timeout=200")).await;
    assert!(
        quiet["account_data"]["events"]
            .as_array()
            .expect("events")
            .is_empty(),
        "nothing new: {quiet}"
    );
}

#[tokio::test]
async fn push_rules_start_from_spec_defaults_and_edits_persist() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let rules = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/",
            &alice.token,
            Value::Null,
        )
        .await;
    let overrides = rules["global"]["override"].as_array().expect("override");
    assert!(
        overrides.iter().any(|r| r["rule_id"] == ".m.rule.master"),
        "the spec's default set"
    );
    assert!(
        rules["global"]["underride"]
            .as_array()
            .expect("underride")
            .iter()
            .any(|r| r["rule_id"] == ".m.rule.message")
    );

    let rule = "/_matrix/client/v3/pushrules/global/room/!x:localhost";
    s.ok(Method::PUT, rule, &alice.token, json!({"actions": []}))
        .await;
    assert_eq!(
        s.ok(Method::GET, rule, &alice.token, Value::Null).await["rule_id"],
        "!x:localhost"
    );
    s.ok(
        Method::PUT,
        &format!("{rule}/enabled"),
        &alice.token,
        json!({"enabled": false}),
    )
    .await;
    assert_eq!(
        s.ok(Method::GET, &format!("{rule}/enabled"), &alice.token, Value::Null)
            .await["enabled"],
        false
    );
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
        &alice.token,
        json!({"enabled": true}),
    )
    .await;
    s.ok(Method::DELETE, rule, &alice.token, Value::Null).await;
    let (status, body) = s.call(Method::GET, rule, Some(&alice.token), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let master = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(master["enabled"], true, "changes persist");

    let caps = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/capabilities",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "11");
    assert_eq!(
        caps["capabilities"]["m.room_versions"]["available"]["9"],
        "stable"
    );
}

#[tokio::test]
async fn devices_list_rename_and_delete_with_password() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    let devices = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/devices",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(devices["devices"][0]["device_id"], alice.device_id.as_str());

    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password", "device_id": "PHONE"});
    s.call(Method::POST, "/_matrix/client/v3/login", None, Some(login))
        .await;
    s.ok(
        Method::PUT,
        "/_matrix/client/v3/devices/PHONE",
        &alice.token,
        json!({"display_name": "My phone"}),
    )
    .await;
    let phone = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/devices/PHONE",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(phone["display_name"], "My phone");
    let (status, _) = s
        .call(
            Method::PUT,
            "/_matrix/client/v3/devices/NOPE",
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "humans cannot create devices this way"
    );

    let (status, body) = s
        .call(
            Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "user-interactive auth first: {body}"
    );
    assert_eq!(body["flows"][0]["stages"][0], "m.login.password");
    let wrong = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "nope"}});
    let (status, body) = s
        .call(
            Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            Some(&alice.token),
            Some(wrong),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::UNAUTHORIZED, "M_FORBIDDEN"),
        "a new challenge"
    );
    let right = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "password"}});
    s.ok(
        Method::DELETE,
        "/_matrix/client/v3/devices/PHONE",
        &alice.token,
        right,
    )
    .await;
    let devices = s
        .ok(
            Method::GET,
            "/_matrix/client/v3/devices",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(devices["devices"].as_array().expect("list").len(), 1);
}

/// MSC4190: a service that opted in creates and deletes its own users' devices without
/// user-interactive auth; without the opt-in it cannot, and never for a human that a
/// non-exclusive namespace merely matches.
#[tokio::test]
async fn services_manage_devices_without_uia_only_for_users_they_own_with_msc4190() {
    use crate::fake_as::{FakeAs, Registration, as_user, register_ghost, start_server};
    let service = FakeAs::start().await;
    let registration = Registration::new("bridge", Some(&service.url))
        .users("@_b_.*:localhost", true)
        .users("@alice:localhost", false)
        .extra("io.element.msc4190: true\n");
    let plain = Registration::new("plain", Some(&service.url)).users("@_p_.*:localhost", true);
    let (s, _files) = start_server(&[&registration, &plain]).await;
    let alice = s.register("alice").await;
    let ghost = register_ghost(&s, &registration.as_token, "_b_x").await;
    let token = &registration.as_token;

    let (status, body) = s
        .call(
            Method::GET,
            &format!(
                "{}&device_id=DEV1",
                as_user("/_matrix/client/v3/account/whoami", &ghost)
            ),
            Some(token),
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNKNOWN_DEVICE")
    );
    s.ok(
        Method::PUT,
        &as_user("/_matrix/client/v3/devices/DEV1", &ghost),
        token,
        json!({"display_name": "bridge"}),
    )
    .await;
    let whoami = s
        .ok(
            Method::GET,
            &format!(
                "{}&device_id=DEV1",
                as_user("/_matrix/client/v3/account/whoami", &ghost)
            ),
            token,
            Value::Null,
        )
        .await;
    assert_eq!(whoami["device_id"], "DEV1");
    s.ok(
        Method::DELETE,
        &as_user("/_matrix/client/v3/devices/DEV1", &ghost),
        token,
        json!({}),
    )
    .await;
    let devices = s
        .ok(
            Method::GET,
            &as_user("/_matrix/client/v3/devices", &ghost),
            token,
            Value::Null,
        )
        .await;
    assert!(devices["devices"].as_array().expect("list").is_empty());

    // alice is in the bridge's namespace, but not exclusively: she is a human, not its user.
    let alices_device = as_user(
        &format!("/_matrix/client/v3/devices/{}", alice.device_id),
        &alice.user_id,
    );
    let (status, body) = s
        .call(Method::DELETE, &alices_device, Some(token), Some(json!({})))
        .await;
    assert!(
        crate::harness::is_password_challenge(status, &body),
        "a human's device needs her password even when a service asks: {status} {body}"
    );
    let new_for_alice = as_user("/_matrix/client/v3/devices/SNEAKY", &alice.user_id);
    let (status, _) = s
        .call(Method::PUT, &new_for_alice, Some(token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nor may it make her devices");
    s.ok(
        Method::GET,
        "/_matrix/client/v3/account/whoami",
        &alice.token,
        Value::Null,
    )
    .await;

    // Without the MSC4190 opt-in a service manages devices as anyone else does.
    let plain_ghost = register_ghost(&s, &plain.as_token, "_p_x").await;
    let (status, _) = s
        .call(
            Method::PUT,
            &as_user("/_matrix/client/v3/devices/DEV2", &plain_ghost),
            Some(&plain.as_token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no device creation without MSC4190"
    );
}
