//! Reading a room's history: what a user may see, `/messages` pagination, state at a point.

use std::{collections::HashSet, sync::Arc};

use ruma::{
    OwnedUserId, RoomId, UserId,
    events::{StateEventType, TimelineEventType},
};

use super::Rooms;
use crate::{Error, Result, filter::RoomEventFilter, pdu::Pdu, sync::StreamToken};

/// Before every stream position: history fetched from other servers (`/backfill`) lies at
/// negative ones.
const HISTORY_START: i64 = i64::MIN;

/// The most events one `/messages` request looks at to fill a filtered page.
const MAX_SCANNED: usize = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Backward,
    Forward,
}

pub struct MessagesPage {
    pub start: PageToken,
    pub end: Option<PageToken>,
    pub chunk: Vec<Pdu>,
    /// Member events of the chunk's senders, when the filter asks for lazy loading.
    pub state: Vec<Arc<Pdu>>,
}

/// A place in a room's history for `/messages`: a stream position (`s<pos>`, as `/sync`'s
/// `prev_batch` gives) or a topological one (`t<depth>_<pos>`, as `/messages` gives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageToken {
    Stream(i64),
    Topo(i64, i64),
}

impl std::fmt::Display for PageToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageToken::Stream(pos) => StreamToken(*pos).fmt(f),
            PageToken::Topo(depth, pos) => write!(f, "t{depth}_{pos}"),
        }
    }
}

impl std::str::FromStr for PageToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some(topo) = s.strip_prefix('t') else {
            return s.parse::<StreamToken>().map(|t| PageToken::Stream(t.0));
        };
        topo.split_once('_')
            .and_then(|(depth, pos)| Some(PageToken::Topo(depth.parse().ok()?, pos.parse().ok()?)))
            .ok_or_else(|| Error::InvalidParam(format!("invalid pagination token `{s}`")))
    }
}

/// What one user may see of one room's history, by the spec's history visibility rules.
/// The room's current `history_visibility` applies to all of its history.
pub struct Visibility {
    user: OwnedUserId,
    world_readable: bool,
    history: String,
    currently_joined: bool,
    /// The user's membership events, oldest first: `(stream position, membership)`.
    memberships: Vec<(i64, String)>,
}

impl Visibility {
    pub fn can_see(&self, event: &Pdu) -> bool {
        if self.world_readable {
            return true;
        }
        if event.kind == TimelineEventType::RoomMember
            && event.state_key.as_deref() == Some(self.user.as_str())
        {
            return true;
        }
        let at_event = self
            .memberships
            .iter()
            .rev()
            .find(|(pos, _)| *pos < event.stream_pos)
            .map(|(_, m)| m.as_str());
        match at_event {
            Some("join") => true,
            Some("invite") if self.history == "invited" => true,
            _ => self.history == "shared" && self.currently_joined,
        }
    }
}

impl Rooms {
    pub async fn visibility(&self, room_id: &RoomId, user: &UserId) -> Result<Visibility> {
        let history = self
            .state_event(room_id, &StateEventType::RoomHistoryVisibility, "")
            .await?
            .and_then(|e| {
                e.content_value()["history_visibility"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "shared".to_owned());
        let mut memberships = Vec::new();
        for row in self
            .store
            .membership_history(room_id.as_str(), user.as_str())
            .await?
        {
            let pdu = Pdu::from_row(row)?;
            memberships.push((pdu.stream_pos, pdu.membership().unwrap_or_default()));
        }
        Ok(Visibility {
            user: user.to_owned(),
            world_readable: history == "world_readable",
            currently_joined: memberships.last().is_some_and(|(_, m)| m == "join"),
            history,
            memberships,
        })
    }

    /// The newest stream position of the room the user may read from: now for members, their
    /// leave or ban for former members, now for anyone in a `world_readable` room. Others,
    /// including invitees, get `M_FORBIDDEN` (as in Synapse). Which events below that bound are
    /// visible is [`Visibility::can_see`]'s business.
    pub async fn visible_until(&self, room_id: &RoomId, user: &UserId) -> Result<i64> {
        let current = self.stream.current();
        if let Some(member) = self
            .state_event(room_id, &StateEventType::RoomMember, user.as_str())
            .await?
        {
            match member.membership().as_deref() {
                Some("join") => return Ok(current),
                Some("leave" | "ban") => return Ok(member.stream_pos),
                _ => {}
            }
        }
        let world_readable = self
            .state_event(room_id, &StateEventType::RoomHistoryVisibility, "")
            .await?
            .is_some_and(|e| e.content_value()["history_visibility"] == "world_readable");
        if world_readable {
            return Ok(current);
        }
        Err(Error::Forbidden(format!("User {user} is not in room {room_id}")))
    }

    /// One event, if the user may see it.
    pub async fn event_for_user(&self, room_id: &RoomId, event_id: &str, user: &UserId) -> Result<Pdu> {
        let until = self.visible_until(room_id, user).await?;
        let visibility = self.visibility(room_id, user).await?;
        match self.event(event_id).await? {
            Some(pdu) if pdu.room_id == room_id && pdu.stream_pos <= until && visibility.can_see(&pdu) => {
                Ok(pdu)
            }
            _ => Err(Error::NotFound("Event not found.".to_owned())),
        }
    }

    /// The room state a user may see: current state while in the room, the state at their
    /// departure otherwise.
    pub async fn state_for_user(&self, room_id: &RoomId, user: &UserId) -> Result<Vec<Arc<Pdu>>> {
        let until = self.visible_until(room_id, user).await?;
        if until >= self.stream.current() {
            return self.current_state(room_id).await;
        }
        self.state_at(room_id, until).await
    }

    /// Room state right after the event at stream position `pos`.
    pub async fn state_at(&self, room_id: &RoomId, pos: i64) -> Result<Vec<Arc<Pdu>>> {
        self.store
            .state_at(room_id.as_str(), pos)
            .await?
            .into_iter()
            .map(|row| Pdu::from_row(row).map(Arc::new))
            .collect()
    }

    /// A page token as `(depth, stream_pos)`. A stream position stands for the room's greatest
    /// depth up to it: as an upper bound (paging back from it, or forward up to it) it includes
    /// the event at it, as a lower bound it does not.
    async fn topological(&self, room_id: &RoomId, token: PageToken, upper: bool) -> Result<(i64, i64)> {
        match token {
            PageToken::Topo(depth, pos) => Ok((depth, pos)),
            PageToken::Stream(pos) => {
                let (depth, pos) = self.store.topological_position(room_id.as_str(), pos).await?;
                Ok((depth, if upper { pos.saturating_add(1) } else { pos }))
            }
        }
    }

    /// `GET /rooms/{roomId}/messages`: up to `limit` events the filter keeps and the user may
    /// see, from `from` in direction `dir`, in topological order (depth, then stream position),
    /// with the token to go on from.
    #[allow(clippy::too_many_arguments)]
    pub async fn messages(
        &self,
        room_id: &RoomId,
        user: &UserId,
        from: Option<PageToken>,
        to: Option<PageToken>,
        dir: Direction,
        limit: u64,
        filter: &RoomEventFilter,
    ) -> Result<MessagesPage> {
        let until = self.visible_until(room_id, user).await?;
        let limit = limit.clamp(1, 1000) as i64;
        let visibility = self.visibility(room_id, user).await?;
        let backward = dir == Direction::Backward;
        let start = from.unwrap_or(if backward {
            PageToken::Stream(self.stream.current())
        } else {
            PageToken::Topo(i64::MIN, i64::MIN)
        });
        let mut cursor = self.topological(room_id, start, backward).await?;
        let bound = match to {
            Some(to) => self.topological(room_id, to, !backward).await?,
            None if backward => (i64::MIN, i64::MIN),
            None => (i64::MAX, i64::MAX),
        };
        // `limit` counts the events the filter keeps, as in Synapse: pages of the room are read
        // until that many are kept, the room ends, or MAX_SCANNED events were looked at (then
        // `end` lets the client go on from there).
        let mut chunk: Vec<Pdu> = Vec::new();
        let mut examined: Option<(i64, i64)> = None;
        let mut scanned = 0;
        let mut exhausted = false;
        loop {
            let rows = self
                .store
                .room_events_topo(room_id.as_str(), cursor, bound, until, limit, backward)
                .await?;
            let got = rows.len() as i64;
            for row in rows {
                let event = Pdu::from_row(row)?;
                scanned += 1;
                examined = Some((i64::from(event.depth), event.stream_pos));
                if filter.matches(&event) && visibility.can_see(&event) {
                    chunk.push(event);
                    if chunk.len() as i64 == limit {
                        break;
                    }
                }
            }
            if chunk.len() as i64 == limit || scanned >= MAX_SCANNED {
                break;
            }
            if got < limit {
                exhausted = true;
                break;
            }
            match examined {
                Some(position) => cursor = position,
                None => break,
            }
        }
        // The next page starts after the last event looked at, whether or not the filter kept it.
        let end = match (exhausted, examined) {
            (false, Some((depth, pos))) => Some(PageToken::Topo(depth, pos)),
            _ => None,
        };
        let state = if filter.lazy_load_members {
            let senders: HashSet<&str> = chunk.iter().map(|e| e.sender.as_str()).collect();
            let mut members = Vec::new();
            for sender in senders {
                if let Some(m) = self
                    .state_event(room_id, &StateEventType::RoomMember, sender)
                    .await?
                {
                    members.push(m);
                }
            }
            members
        } else {
            Vec::new()
        };
        Ok(MessagesPage {
            start,
            end,
            chunk,
            state,
        })
    }

    /// `GET /rooms/{roomId}/context/{eventId}`: the event, up to `limit` visible events around it
    /// (split before/after), tokens to paginate on, and the room state at the event.
    pub async fn context(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &str,
        limit: u64,
        filter: &RoomEventFilter,
    ) -> Result<Context> {
        let event = self.event_for_user(room_id, event_id, user).await?;
        let until = self.visible_until(room_id, user).await?;
        let visibility = self.visibility(room_id, user).await?;
        let half = (limit.min(100) / 2) as i64;
        let mut before: Vec<Pdu> = self
            .store
            .room_events(room_id.as_str(), HISTORY_START, event.stream_pos - 1, half, true)
            .await?
            .into_iter()
            .map(Pdu::from_row)
            .collect::<Result<_>>()?;
        before.reverse();
        let after: Vec<Pdu> = self
            .store
            .room_events(room_id.as_str(), event.stream_pos, until, half, false)
            .await?
            .into_iter()
            .map(Pdu::from_row)
            .collect::<Result<_>>()?;
        let start = StreamToken(before.last().map_or(event.stream_pos - 1, |e| e.stream_pos - 1));
        let end = StreamToken(after.last().map_or(event.stream_pos, |e| e.stream_pos));
        let keep = |e: &Pdu| filter.matches(e) && visibility.can_see(e);
        let state = self.state_at(room_id, event.stream_pos).await?;
        Ok(Context {
            start,
            end,
            events_before: before.into_iter().filter(|e| keep(e)).collect(),
            events_after: after.into_iter().filter(|e| keep(e)).collect(),
            event,
            state,
        })
    }
}

pub struct Context {
    pub start: StreamToken,
    pub end: StreamToken,
    pub event: Pdu,
    /// Newest first, as the spec orders `events_before`.
    pub events_before: Vec<Pdu>,
    pub events_after: Vec<Pdu>,
    pub state: Vec<Arc<Pdu>>,
}

impl Rooms {
    /// `GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`, as the user may see it.
    #[allow(clippy::too_many_arguments)]
    pub async fn relations(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &str,
        rel_type: Option<&str>,
        kind: Option<&str>,
        from: Option<StreamToken>,
        dir: Direction,
        limit: u64,
    ) -> Result<(Vec<Pdu>, Option<StreamToken>)> {
        self.event_for_user(room_id, event_id, user).await?;
        let until = self.visible_until(room_id, user).await?;
        let limit = limit.clamp(1, 100) as i64;
        let (after, upto, newest) = match dir {
            Direction::Backward => (0, from.map_or(until, |t| t.0.min(until)), true),
            Direction::Forward => (from.map_or(0, |t| t.0), until, false),
        };
        let rows = self
            .store
            .relations(
                room_id.as_str(),
                event_id,
                rel_type,
                kind,
                after,
                upto,
                limit,
                newest,
            )
            .await?;
        let full = rows.len() as i64 == limit;
        let events: Vec<Pdu> = rows.into_iter().map(Pdu::from_row).collect::<Result<_>>()?;
        let next = match (full, events.last()) {
            (true, Some(last)) if dir == Direction::Backward => Some(StreamToken(last.stream_pos - 1)),
            (true, Some(last)) => Some(StreamToken(last.stream_pos)),
            _ => None,
        };
        let visibility = self.visibility(room_id, user).await?;
        Ok((
            events.into_iter().filter(|e| visibility.can_see(e)).collect(),
            next,
        ))
    }
}
