//! History of a room joined through another server that lies before this server's join:
//! fetched with `/backfill` when a local user pages back past the oldest event held.

use ruma::{RoomId, UInt, UserId, api::federation::backfill::get_backfill};

use crate::{
    Homeserver, Result,
    filter::RoomEventFilter,
    rooms::{Direction, MessagesPage, PageToken},
};

/// Events asked for per `/backfill` request, at least and at most.
const BACKFILL_MIN: u64 = 20;
const BACKFILL_MAX: u64 = 100;

impl Homeserver {
    /// `GET /rooms/{roomId}/messages`: [`crate::rooms::Rooms::messages`], and when a backward
    /// page reaches the oldest event this server holds with history missing before it, that
    /// history fetched from the room's other servers first.
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
        let page = self
            .rooms
            .messages(room_id, user, from, to, dir, limit, filter)
            .await?;
        if dir != Direction::Backward || to.is_some() || page.end.is_some() {
            return Ok(page);
        }
        match self.backfill(room_id, limit).await {
            Ok(0) => Ok(page),
            Ok(_) => {
                let mut page = self
                    .rooms
                    .messages(room_id, user, from, to, dir, limit, filter)
                    .await?;
                // More may lie before what was fetched: the client asks again from here.
                if page.end.is_none()
                    && let Some(last) = page.chunk.last()
                {
                    page.end = Some(PageToken::Topo(i64::from(last.depth), last.stream_pos));
                }
                Ok(page)
            }
            Err(e) => {
                tracing::info!(%room_id, error = %e, "no history from other servers");
                Ok(page)
            }
        }
    }

    /// Asks the room's other servers, one after another, for the history before the oldest
    /// event this server holds; returns how many events were new. A point the servers had
    /// nothing more before is not asked about again (until a restart).
    async fn backfill(&self, room_id: &RoomId, limit: u64) -> Result<usize> {
        let Some(oldest) = self.rooms.history_gap(room_id).await? else {
            return Ok(0);
        };
        if self
            .federation
            .history_ends
            .lock()
            .is_ok_and(|ends| ends.contains(&oldest.event_id))
        {
            return Ok(0);
        }
        let mut servers: Vec<_> = self
            .rooms
            .joined_servers(room_id)
            .await?
            .into_iter()
            .filter(|s| *s != self.server_name)
            .collect();
        // The oldest event's own server surely has what came before it.
        servers.sort_by_key(|s| s != oldest.sender.server_name());
        let limit = UInt::try_from(limit.clamp(BACKFILL_MIN, BACKFILL_MAX)).unwrap_or_default();
        for server in servers {
            let request =
                get_backfill::v1::Request::new(room_id.to_owned(), vec![oldest.event_id.clone()], limit);
            match self.federation.client.send(&server, request).await {
                Ok(response) => {
                    let added = self
                        .rooms
                        .take_backfill(room_id, response.pdus, &self.federation.keys)
                        .await?;
                    tracing::info!(%room_id, %server, added, "history fetched from another server");
                    if added == 0
                        && let Ok(mut ends) = self.federation.history_ends.lock()
                    {
                        ends.insert(oldest.event_id.clone());
                    }
                    return Ok(added);
                }
                Err(e) => tracing::info!(%room_id, %server, error = %e, "backfill failed"),
            }
        }
        Ok(0)
    }
}
