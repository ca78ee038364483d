//! Profiles, account data, push rules, capabilities.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use ruma::{
    OwnedUserId,
    push::{
        Action, AnyPushRuleRef, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule,
        RuleKind,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{Error, Homeserver, accounts::Session, pdu::STABLE_ROOM_VERSIONS};

use super::{room_id, user_id};
use crate::{
    error::ApiResult,
    extract::{Auth, Body, Params},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/profile/{user_id}", get(profile))
        .route(
            "/profile/{user_id}/displayname",
            get(displayname).put(set_displayname),
        )
        .route(
            "/profile/{user_id}/avatar_url",
            get(avatar_url).put(set_avatar_url),
        )
        .route(
            "/user/{user_id}/account_data/{kind}",
            get(get_global).put(put_global),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/account_data/{kind}",
            get(get_room).put(put_room),
        )
        .route("/user/{user_id}/rooms/{room_id}/tags", get(tags))
        .route(
            "/user/{user_id}/rooms/{room_id}/tags/{tag}",
            axum::routing::put(put_tag).delete(delete_tag),
        )
        .route("/capabilities", get(capabilities))
        .route("/pushrules/", get(push_rules))
        .route("/pushrules", get(push_rules))
        .route("/pushrules/global/", get(push_rules_global))
        .route(
            "/pushrules/global/{kind}/{rule_id}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route(
            "/pushrules/global/{kind}/{rule_id}/enabled",
            get(get_rule_enabled).put(put_rule_enabled),
        )
        .route(
            "/pushrules/global/{kind}/{rule_id}/actions",
            get(get_rule_actions).put(put_rule_actions),
        )
}

/// Profile and account data writes are for oneself (a service masquerading counts as the user).
fn require_self(session: &Session, user: &OwnedUserId) -> Result<(), Error> {
    if &session.user_id != user {
        return Err(Error::Forbidden(format!(
            "Cannot change another user's data ({user})"
        )));
    }
    Ok(())
}

async fn profile(State(hs): State<Arc<Homeserver>>, Path(user): Path<String>) -> ApiResult<Json<Value>> {
    let profile = hs.profile(&user_id(&user)?).await?;
    let mut body = json!({});
    if let Some(name) = profile.displayname {
        body["displayname"] = json!(name);
    }
    if let Some(url) = profile.avatar_url {
        body["avatar_url"] = json!(url);
    }
    Ok(Json(body))
}

async fn displayname(State(hs): State<Arc<Homeserver>>, Path(user): Path<String>) -> ApiResult<Json<Value>> {
    let profile = hs.profile(&user_id(&user)?).await?;
    Ok(Json(json!({ "displayname": profile.displayname })))
}

async fn avatar_url(State(hs): State<Arc<Homeserver>>, Path(user): Path<String>) -> ApiResult<Json<Value>> {
    let profile = hs.profile(&user_id(&user)?).await?;
    Ok(Json(json!({ "avatar_url": profile.avatar_url })))
}

#[derive(Deserialize)]
struct DisplaynameBody {
    displayname: Option<String>,
}

#[derive(Deserialize)]
struct AvatarBody {
    avatar_url: Option<String>,
}

async fn set_displayname(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
    Body(body): Body<DisplaynameBody>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    // Each change fans out a member event into every joined room.
    hs.limits.act(&hs.limits.message, &session)?;
    hs.set_profile(&user, Some(body.displayname.as_deref()), None)
        .await?;
    Ok(Json(json!({})))
}

async fn set_avatar_url(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path(user): Path<String>,
    Body(body): Body<AvatarBody>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    hs.limits.act(&hs.limits.message, &session)?;
    hs.set_profile(&user, None, Some(body.avatar_url.as_deref()))
        .await?;
    Ok(Json(json!({})))
}

async fn get_global(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, kind)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    let data = hs.account_data.get(&user, None, &kind).await?;
    Ok(Json(data.ok_or_else(|| {
        Error::NotFound("Account data not found".to_owned())
    })?))
}

async fn put_global(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, kind)): Path<(String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    if kind == switchboard_core::account_data::PUSH_RULES {
        return Err(Error::BadJson("Cannot set m.push_rules through the account data API".to_owned()).into());
    }
    hs.account_data.set(&user, None, &kind, &body).await?;
    Ok(Json(json!({})))
}

async fn get_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, room, kind)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    let data = hs.account_data.get(&user, Some(&room_id(&room)?), &kind).await?;
    Ok(Json(data.ok_or_else(|| {
        Error::NotFound("Room account data not found".to_owned())
    })?))
}

async fn put_room(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, room, kind)): Path<(String, String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    hs.account_data
        .set(&user, Some(&room_id(&room)?), &kind, &body)
        .await?;
    Ok(Json(json!({})))
}

async fn capabilities(State(hs): State<Arc<Homeserver>>, _auth: Auth) -> Json<Value> {
    let available: serde_json::Map<String, Value> = STABLE_ROOM_VERSIONS
        .iter()
        .map(|v| ((*v).to_owned(), json!("stable")))
        .collect();
    Json(json!({
        "capabilities": {
            "m.room_versions": { "default": hs.config.default_room_version, "available": available },
            "m.change_password": { "enabled": false },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
        }
    }))
}

async fn push_rules(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "global": hs.account_data.push_rules(&session.user_id).await? }),
    ))
}

async fn push_rules_global(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(json!(hs.account_data.push_rules(&session.user_id).await?)))
}

fn rule_kind(kind: &str) -> Result<RuleKind, Error> {
    match kind {
        "override" => Ok(RuleKind::Override),
        "underride" => Ok(RuleKind::Underride),
        "sender" => Ok(RuleKind::Sender),
        "room" => Ok(RuleKind::Room),
        "content" => Ok(RuleKind::Content),
        other => Err(Error::InvalidParam(format!("unknown push rule kind `{other}`"))),
    }
}

/// Loads the user's rules, changes them, stores them (which syncs `m.push_rules`).
async fn edit_rules(
    hs: &Homeserver,
    session: &Session,
    change: impl FnOnce(&mut ruma::push::Ruleset) -> Result<(), Error>,
) -> ApiResult<Json<Value>> {
    let mut rules = hs.account_data.push_rules(&session.user_id).await?;
    change(&mut rules)?;
    hs.account_data.set_push_rules(&session.user_id, &rules).await?;
    Ok(Json(json!({})))
}

fn not_found() -> Error {
    Error::NotFound("Unknown push rule".to_owned())
}

async fn get_rule(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let rules = hs.account_data.push_rules(&session.user_id).await?;
    let rule = rules.get(rule_kind(&kind)?, &rule_id).ok_or_else(not_found)?;
    let value = match rule {
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => serde_json::to_value(r),
        AnyPushRuleRef::Content(r) => serde_json::to_value(r),
        AnyPushRuleRef::Room(r) => serde_json::to_value(r),
        AnyPushRuleRef::Sender(r) => serde_json::to_value(r),
        _ => Ok(Value::Null),
    };
    Ok(Json(value.map_err(Error::internal)?))
}

#[derive(Deserialize)]
struct RuleBody {
    actions: Vec<Action>,
    #[serde(default)]
    conditions: Vec<ruma::push::PushCondition>,
    pattern: Option<String>,
}

#[derive(Deserialize)]
struct Position {
    before: Option<String>,
    after: Option<String>,
}

async fn put_rule(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    Params(position): Params<Position>,
    Body(body): Body<RuleBody>,
) -> ApiResult<Json<Value>> {
    let bad = |e: String| Error::InvalidParam(e);
    let rule = match rule_kind(&kind)? {
        RuleKind::Override => NewPushRule::Override(NewConditionalPushRule::new(
            rule_id,
            body.conditions,
            body.actions,
        )),
        RuleKind::Underride => NewPushRule::Underride(NewConditionalPushRule::new(
            rule_id,
            body.conditions,
            body.actions,
        )),
        RuleKind::Content => {
            let pattern = body
                .pattern
                .ok_or_else(|| Error::MissingParam("content rules need a pattern".to_owned()))?;
            NewPushRule::Content(NewPatternedPushRule::new(rule_id, pattern, body.actions))
        }
        RuleKind::Room => NewPushRule::Room(NewSimplePushRule::new(room_id(&rule_id)?, body.actions)),
        RuleKind::Sender => NewPushRule::Sender(NewSimplePushRule::new(user_id(&rule_id)?, body.actions)),
        _ => return Err(Error::InvalidParam("unsupported push rule kind".to_owned()).into()),
    };
    edit_rules(&hs, &session, |rules| {
        let (after, before) = (position.after.as_deref(), position.before.as_deref());
        rules.insert(rule, after, before).map_err(|e| bad(e.to_string()))
    })
    .await
}

async fn delete_rule(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = rule_kind(&kind)?;
    edit_rules(&hs, &session, |rules| {
        rules.get(kind.clone(), &rule_id).ok_or_else(not_found)?;
        rules
            .remove(kind, &rule_id)
            .map_err(|e| Error::InvalidParam(e.to_string()))
    })
    .await
}

async fn get_rule_enabled(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let rules = hs.account_data.push_rules(&session.user_id).await?;
    let rule = rules.get(rule_kind(&kind)?, &rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "enabled": rule.enabled() })))
}

#[derive(Deserialize)]
struct EnabledBody {
    enabled: bool,
}

async fn put_rule_enabled(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    Body(body): Body<EnabledBody>,
) -> ApiResult<Json<Value>> {
    let kind = rule_kind(&kind)?;
    edit_rules(&hs, &session, |rules| {
        rules
            .set_enabled(kind, &rule_id, body.enabled)
            .map_err(|_| not_found())
    })
    .await
}

async fn get_rule_actions(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let rules = hs.account_data.push_rules(&session.user_id).await?;
    let rule = rules.get(rule_kind(&kind)?, &rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "actions": rule.actions() })))
}

#[derive(Deserialize)]
struct ActionsBody {
    actions: Vec<Action>,
}

async fn put_rule_actions(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    Body(body): Body<ActionsBody>,
) -> ApiResult<Json<Value>> {
    let kind = rule_kind(&kind)?;
    edit_rules(&hs, &session, |rules| {
        rules
            .set_actions(kind, &rule_id, body.actions)
            .map_err(|_| not_found())
    })
    .await
}

/// Room tags are the room's `m.tag` account data, as in Synapse.
async fn tags(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, room)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = user_id(&user)?;
    require_self(&session, &user)?;
    let data = hs
        .account_data
        .get(&user, Some(&room_id(&room)?), "m.tag")
        .await?;
    Ok(Json(
        json!({ "tags": data.and_then(|d| d.get("tags").cloned()).unwrap_or_else(|| json!({})) }),
    ))
}

async fn change_tag(
    hs: &Homeserver,
    session: &Session,
    (user, room, tag): (&str, &str, &str),
    value: Option<Value>,
) -> ApiResult<Json<Value>> {
    let user = user_id(user)?;
    require_self(session, &user)?;
    let room = room_id(room)?;
    let mut data = hs
        .account_data
        .get(&user, Some(&room), "m.tag")
        .await?
        .unwrap_or_else(|| json!({ "tags": {} }));
    if !data["tags"].is_object() {
        data["tags"] = json!({});
    }
    if let Some(tags) = data["tags"].as_object_mut() {
        match value {
            Some(value) => tags.insert(tag.to_owned(), value),
            None => tags.remove(tag),
        };
    }
    hs.account_data.set(&user, Some(&room), "m.tag", &data).await?;
    Ok(Json(json!({})))
}

async fn put_tag(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, room, tag)): Path<(String, String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    change_tag(&hs, &session, (&user, &room, &tag), Some(body)).await
}

async fn delete_tag(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((user, room, tag)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    change_tag(&hs, &session, (&user, &room, &tag), None).await
}
