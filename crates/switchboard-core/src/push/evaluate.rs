//! The push-rule evaluator: one task reads each new event once, in stream order, and runs the
//! push rules of every local member it concerns (ruma's evaluation, with the member's own rules
//! from account data), storing what notifies or highlights. Its place in the stream is stored
//! with the actions, so after a crash it carries on where it stopped: nothing is missed, and
//! what it evaluates again (`ON CONFLICT DO NOTHING`, read positions only move forward) is not
//! counted twice.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use ruma::{
    OwnedUserId, RoomId, UInt, UserId,
    events::{
        StateEventType, TimelineEventType,
        room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource},
    },
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx},
    serde::Raw,
};
use serde_json::value::to_raw_value;
use switchboard_store::{PushAction, ReadPosition, Store};
use tokio::sync::watch;

use super::pushers::Pushers;
use crate::{
    Result, account_data::AccountData, appservice::AppServices, pdu::Pdu, rooms::Rooms, stream::EventStream,
};

/// Events read per round.
const BATCH: usize = 500;
/// Positions passed without anything to record after which the evaluator's place is written
/// anyway, so a restart does not read far back.
const PROGRESS_EVERY: i64 = 1_000;

pub(super) struct Evaluator {
    pub store: Store,
    pub rooms: Arc<Rooms>,
    pub stream: Arc<EventStream>,
    pub account_data: Arc<AccountData>,
    pub appservices: Arc<AppServices>,
    pub pushers: Arc<Pushers>,
    pub evaluated: watch::Sender<i64>,
}

/// What the rules need to know of a room, read once per room per round.
struct RoomFacts {
    member_count: UInt,
    power_levels: Option<PushConditionPowerLevelsCtx>,
}

/// `main`, or the root of the thread the event is in.
pub(super) fn thread_of(event: &Pdu) -> String {
    #[derive(serde::Deserialize)]
    struct Relates {
        #[serde(rename = "m.relates_to")]
        relates_to: Option<Relation>,
    }
    #[derive(serde::Deserialize)]
    struct Relation {
        rel_type: Option<String>,
        event_id: Option<String>,
    }
    serde_json::from_str::<Relates>(event.content.get())
        .ok()
        .and_then(|c| c.relates_to)
        .filter(|r| r.rel_type.as_deref() == Some("m.thread"))
        .and_then(|r| r.event_id)
        .unwrap_or_else(|| "main".to_owned())
}

impl Evaluator {
    /// Runs until the stream closes.
    pub async fn run(self) {
        let mut news = self.stream.subscribe();
        let mut pos = loop {
            match self.start_position().await {
                Ok(pos) => break pos,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read where push-rule evaluation stopped");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        self.evaluated.send_replace(pos);
        let mut stored = pos;
        loop {
            let now = *news.borrow_and_update();
            while pos < now {
                match self.round(pos, now, stored).await {
                    Ok((next, wrote)) => {
                        pos = next;
                        if wrote {
                            stored = pos;
                        }
                        self.evaluated.send_replace(pos);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "evaluating push rules failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tokio::select! {
                _ = news.changed() => {}
                () = self.stream.closed() => return,
            }
        }
    }

    /// Where the last run stopped; on the first run ever, the stream's head (history is not
    /// evaluated).
    async fn start_position(&self) -> Result<i64> {
        if let Some(pos) = self.store.push_progress().await? {
            return Ok(pos);
        }
        let head = self.stream.current();
        self.store.record_push_actions(&[], &[], head).await?;
        Ok(head)
    }

    /// Evaluates the events in `(after, until]` (at most a batch); returns how far it got and
    /// whether it wrote its place. A round that found nothing to record writes nothing (its
    /// place goes with the next actions, or after [`PROGRESS_EVERY`] positions): evaluating
    /// an event again after a crash stores nothing twice, and the writer stays free for events.
    async fn round(&self, after: i64, until: i64, stored: i64) -> Result<(i64, bool)> {
        let events = match self.stream.recent_after(after, until, BATCH) {
            Some(events) => events,
            None => self
                .store
                .events_after(after, until, BATCH as i64)
                .await?
                .into_iter()
                .map(|row| Pdu::from_row(row).map(Arc::new))
                .collect::<Result<_>>()?,
        };
        let reached = if events.len() == BATCH {
            events.last().map_or(until, |e| e.stream_pos)
        } else {
            until
        };
        let server_name = self.rooms.server_name().to_owned();
        let registry = self.appservices.registry();
        let mut facts: HashMap<ruma::OwnedRoomId, Arc<RoomFacts>> = HashMap::new();
        let (mut actions, mut read) = (Vec::new(), Vec::new());
        let mut notified = HashSet::new();
        for event in &events {
            let thread_id = thread_of(event);
            let local_sender = event.sender.server_name() == server_name;
            if local_sender {
                // Writing in a room reads it (up to there, in that thread).
                read.push(ReadPosition {
                    user_id: event.sender.to_string(),
                    room_id: event.room_id.to_string(),
                    thread_id: thread_id.clone(),
                    stream_pos: event.stream_pos,
                });
            }
            let mut recipients: Vec<OwnedUserId> = self
                .rooms
                .audience(&event.room_id)
                .await?
                .local_joined
                .iter()
                .filter_map(|u| OwnedUserId::try_from(u.as_str()).ok())
                .collect();
            // An invite concerns the invitee, who is not a member yet.
            if event.kind == TimelineEventType::RoomMember
                && event.membership().as_deref() == Some("invite")
                && let Some(target) = event
                    .state_key
                    .as_deref()
                    .and_then(|t| OwnedUserId::try_from(t).ok())
                && target.server_name() == server_name
            {
                recipients.push(target);
            }
            // Services' users read no phone: no rules run for them (as in Synapse).
            recipients.retain(|u| *u != event.sender && registry.exclusive_user_owner(u.as_str()).is_none());
            if recipients.is_empty() {
                continue;
            }
            let room_facts = match facts.get(&event.room_id) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(self.room_facts(&event.room_id).await?);
                    facts.insert(event.room_id.clone(), f.clone());
                    f
                }
            };
            let raw: Raw<serde_json::Value> =
                Raw::from_json(to_raw_value(&event.to_client(None)).map_err(crate::Error::internal)?);
            for user in recipients {
                let rules = self.account_data.cached_push_rules(&user).await?;
                let display_name = self.display_name(&event.room_id, &user).await?;
                let mut context = PushConditionRoomCtx::new(
                    event.room_id.clone(),
                    room_facts.member_count,
                    user.clone(),
                    display_name,
                );
                if let Some(levels) = &room_facts.power_levels {
                    context = context.with_power_levels(levels.clone());
                }
                let got = rules.get_actions(&raw, &context).await;
                let notify = got.iter().any(Action::should_notify);
                let highlight = got.iter().any(Action::is_highlight);
                if !(notify || highlight) {
                    continue;
                }
                if notify {
                    notified.insert(user.to_string());
                }
                actions.push(PushAction {
                    user_id: user.to_string(),
                    room_id: event.room_id.to_string(),
                    stream_pos: event.stream_pos,
                    event_id: event.event_id.to_string(),
                    thread_id: thread_id.clone(),
                    notify,
                    highlight,
                    actions: serde_json::to_string(got).map_err(crate::Error::internal)?,
                });
            }
        }
        let write = !actions.is_empty() || !read.is_empty() || reached - stored >= PROGRESS_EVERY;
        if write {
            self.store.record_push_actions(&actions, &read, reached).await?;
        }
        self.pushers.wake(&notified);
        Ok((reached, write))
    }

    async fn room_facts(&self, room_id: &RoomId) -> Result<RoomFacts> {
        let handle = self.rooms.handle(room_id).await?;
        let joined = self.store.joined_members(room_id.as_str()).await?.len();
        let levels = self
            .rooms
            .state_event(room_id, &StateEventType::RoomPowerLevels, "")
            .await?;
        let content =
            levels.and_then(|e| serde_json::from_str::<RoomPowerLevelsEventContent>(e.content.get()).ok());
        let create = self
            .rooms
            .state_event(room_id, &StateEventType::RoomCreate, "")
            .await?;
        let mut creators: Vec<OwnedUserId> = create.iter().map(|e| e.sender.clone()).collect();
        if let Some(create) = &create
            && let Some(more) = create.content_value()["additional_creators"].as_array()
        {
            creators.extend(
                more.iter()
                    .filter_map(|u| u.as_str())
                    .filter_map(|u| OwnedUserId::try_from(u).ok()),
            );
        }
        let levels = RoomPowerLevels::new(
            RoomPowerLevelsSource::from(content),
            &handle.version.rules.authorization,
            creators,
        );
        Ok(RoomFacts {
            member_count: UInt::try_from(joined as u64).unwrap_or_default(),
            power_levels: Some(levels.into()),
        })
    }

    /// The user's display name in the room (empty without one, as the rule that looks for it
    /// then never matches).
    async fn display_name(&self, room_id: &RoomId, user: &UserId) -> Result<String> {
        let member = self
            .rooms
            .state_event(room_id, &StateEventType::RoomMember, user.as_str())
            .await?;
        Ok(member
            .and_then(|m| m.content_value()["displayname"].as_str().map(str::to_owned))
            .unwrap_or_default())
    }
}
