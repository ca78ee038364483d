//! EDUs for other servers — typing, receipts, presence, device-list and cross-signing updates,
//! to-device messages. They wait in a stored outbox per destination (so a server that is down
//! gets its device-list updates and to-device messages when it is back), and each destination's
//! queue in [`super::sender`] sends them with its next transaction, deleting them once answered.

use std::{collections::BTreeSet, sync::Arc};

use ruma::{OwnedServerName, RoomId, ServerName, UserId};
use serde_json::Value;
use switchboard_store::{OutboundEdu, Store};
use tokio::sync::mpsc;

use crate::{Result, rooms::Rooms, util::now_ms};

/// One EDU for other servers.
pub struct Edu {
    pub edu_type: &'static str,
    pub content: Value,
    /// A waiting EDU of the same destination and key is replaced by this one.
    pub replace_key: Option<String>,
}

pub struct Outbox {
    store: Store,
    rooms: Arc<Rooms>,
    server_name: OwnedServerName,
    /// Destinations with new EDUs, for the sender to wake their queues.
    wake: mpsc::UnboundedSender<OwnedServerName>,
}

impl Outbox {
    /// The outbox, and what tells the sender which destinations have news.
    pub fn new(
        store: Store,
        rooms: Arc<Rooms>,
        server_name: OwnedServerName,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<OwnedServerName>) {
        let (wake, news) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                store,
                rooms,
                server_name,
                wake,
            }),
            news,
        )
    }

    /// Whether `user` is one of this server's.
    pub fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.server_name
    }

    /// Sends `edu` to `servers` (never to this one).
    pub async fn to_servers(&self, servers: BTreeSet<OwnedServerName>, edu: Edu) -> Result<()> {
        let content = edu.content.to_string();
        let edus: Vec<OutboundEdu> = servers
            .into_iter()
            .filter(|server| *server != self.server_name)
            .map(|server| OutboundEdu {
                destination: server.to_string(),
                edu_type: edu.edu_type.to_owned(),
                content: content.clone(),
                replace_key: edu.replace_key.clone(),
            })
            .collect();
        self.queue(edus).await
    }

    /// Sends `edu` to the other servers with members in `room`.
    pub async fn to_room(&self, room: &RoomId, edu: Edu) -> Result<()> {
        let servers = self.rooms.joined_servers(room).await?;
        self.to_servers(servers, edu).await
    }

    /// Sends `edu` to the other servers sharing a room with `user`.
    pub async fn to_peers_of(&self, user: &UserId, edu: Edu) -> Result<()> {
        let servers = self.servers_sharing_rooms(user).await?;
        self.to_servers(servers, edu).await
    }

    /// The servers with members in a room `user` is joined to.
    pub async fn servers_sharing_rooms(&self, user: &UserId) -> Result<BTreeSet<OwnedServerName>> {
        let mut servers = BTreeSet::new();
        for room in self.rooms.joined_rooms(user).await? {
            if let Ok(room) = <&RoomId>::try_from(room.as_str()) {
                servers.extend(self.rooms.joined_servers(room).await?);
            }
        }
        servers.remove(&self.server_name);
        Ok(servers)
    }

    /// Stores EDUs and wakes their destinations' queues.
    pub async fn queue(&self, edus: Vec<OutboundEdu>) -> Result<()> {
        if edus.is_empty() {
            return Ok(());
        }
        self.store.queue_federation_edus(&edus, now_ms() as i64).await?;
        let destinations: BTreeSet<&str> = edus.iter().map(|e| e.destination.as_str()).collect();
        for destination in destinations {
            if let Ok(server) = <&ServerName>::try_from(destination) {
                // The sender gone means the server is stopping; the EDUs wait in the store.
                let _ = self.wake.send(server.to_owned());
            }
        }
        Ok(())
    }
}
