//! The bridge: lazy channel rooms (the homeserver asks about `#irc_<network>_<#channel>`, the
//! bridge joins the channel and creates the room) and IRC → Matrix (each IRC person a virtual
//! user `@irc_<network>_<nick>` with the nick as display name).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};
use switchboard_appservice::{Context, Handler, HandlerResult};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{Config, Network},
    conn::{Connection, Event, Settings},
    format::irc_to_matrix,
    names::{self, valid_nick},
    proto::{Message, ctcp_action, fold_case},
    store::Store,
};

/// The prefix of every ID the bridge claims (`@irc_…`, `#irc_…`).
pub const PREFIX: &str = "irc_";

/// The user ID in an event's `field` (`sender`, `state_key`), if it is one.
fn user_at(event: &Value, field: &str) -> Option<OwnedUserId> {
    event[field].as_str().and_then(|s| OwnedUserId::try_from(s).ok())
}

/// The event's room.
fn room_of(event: &Value) -> Option<OwnedRoomId> {
    event["room_id"]
        .as_str()
        .and_then(|r| OwnedRoomId::try_from(r).ok())
}

/// Channel members' virtual users joined at once when the bot learns a channel's names.
const MEMBER_JOINS: usize = 8;

/// Lines for IRC that waited longer than this for a connection (while it was down) are dropped.
const STALE_LINE: Duration = Duration::from_secs(60);

/// How long a channel join may take before the alias query gives up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts at accepting an invite. The SDK acknowledges a transaction whatever its handlers
/// answer, so an invite whose join failed is not delivered again: a join that may pass later
/// (the homeserver busy or unreachable) is tried again, 1, 2 and 4 s apart.
const INVITE_JOIN_ATTEMPTS: u32 = 4;

/// Numerics that refuse a JOIN, with the channel as their second parameter.
const JOIN_REFUSALS: [&str; 6] = ["403", "405", "471", "473", "474", "475"];

pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    /// Set once the service is built (handlers and the IRC side both need it).
    context: OnceLock<Context>,
    networks: Mutex<HashMap<String, Arc<NetworkLink>>>,
    /// `(network, folded channel)` → room.
    rooms: Mutex<HashMap<(String, String), OwnedRoomId>>,
    /// `(Matrix user, network)` → that user's own IRC connection.
    puppets: Mutex<HashMap<(OwnedUserId, String), Connection>>,
    /// When each puppet last spoke for its user (for `idle_timeout_secs`).
    puppet_activity: Mutex<HashMap<(OwnedUserId, String), Instant>>,
    /// `(network, folded nick)` → the bridged channels (folded) the bot saw the nick in.
    members: Mutex<HashMap<(String, String), BTreeSet<String>>>,
    /// Private chats: room → `(network, folded nick, Matrix user)`.
    dms: Mutex<HashMap<OwnedRoomId, (String, String, OwnedUserId)>>,
    /// Rooms where a user talks to the bridge bot: room → that user.
    admin_rooms: Mutex<HashMap<OwnedRoomId, OwnedUserId>>,
    /// Channel topics the bot was told: `(network, folded channel)` → topic.
    topics: Mutex<HashMap<(String, String), String>>,
    /// Who was in each channel when the bot's connection dropped: `(network, folded channel)` →
    /// folded nicks. Whoever is not in the names after the rejoin left meanwhile (unseen).
    before_reconnect: Mutex<HashMap<(String, String), BTreeSet<String>>>,
}

type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Told whether the bot got into a channel (or why not).
type JoinWaiter = oneshot::Sender<Result<(), String>>;

/// The bot's connection to one network and who waits for its channel joins.
struct NetworkLink {
    bot: Connection,
    join_waiters: Mutex<HashMap<String, Vec<JoinWaiter>>>,
}

impl Bridge {
    pub fn new(config: Config, store: Store) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                context: OnceLock::new(),
                networks: Mutex::new(HashMap::new()),
                rooms: Mutex::new(HashMap::new()),
                puppets: Mutex::new(HashMap::new()),
                puppet_activity: Mutex::new(HashMap::new()),
                members: Mutex::new(HashMap::new()),
                dms: Mutex::new(HashMap::new()),
                admin_rooms: Mutex::new(HashMap::new()),
                topics: Mutex::new(HashMap::new()),
                before_reconnect: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A second handle to the same bridge, to hand the context to once the service is built.
    pub fn handle(&self) -> Bridge {
        Bridge {
            inner: self.inner.clone(),
        }
    }

    pub fn set_context(&self, context: Context) {
        let _ = self.inner.context.set(context);
    }

    /// Picks up where the bridge left off: the stored channel rooms, whose channels the bot
    /// rejoins (no room is created again).
    pub async fn restore(&self) -> Result<usize, sqlx::Error> {
        for (room, network, nick, user) in self.inner.store.dms().await? {
            if let (Ok(room), Ok(user)) = (OwnedRoomId::try_from(room), OwnedUserId::try_from(user))
                && let Ok(mut dms) = self.inner.dms.lock()
            {
                dms.insert(room, (network, nick, user));
            }
        }
        for (room, user) in self.inner.store.admin_rooms().await? {
            if let (Ok(room), Ok(user)) = (OwnedRoomId::try_from(room), OwnedUserId::try_from(user))
                && let Ok(mut admin) = self.inner.admin_rooms.lock()
            {
                admin.insert(room, user);
            }
        }
        let rooms = self.inner.store.rooms().await?;
        let count = rooms.len();
        for (network_id, channel, room) in rooms {
            let (Some(network), Ok(room)) = (
                self.inner.config.network(&network_id),
                OwnedRoomId::try_from(room),
            ) else {
                tracing::warn!(network = %network_id, %channel, "stored room of an unknown network or bad ID; skipped");
                continue;
            };
            if let Ok(mut map) = self.inner.rooms.lock() {
                map.insert((network_id.clone(), channel.clone()), room);
            }
            self.inner.link(network).bot.join(&channel);
        }
        let (inner, every) = (self.inner.clone(), self.inner.idle_sweep_interval());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                inner.quit_idle_puppets();
            }
        });
        Ok(count)
    }
}

impl Inner {
    /// The bot's connection to a network, started on first use.
    fn link(self: &Arc<Self>, network: &Network) -> Arc<NetworkLink> {
        let mut networks = match self.networks.lock() {
            Ok(networks) => networks,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(link) = networks.get(&network.id) {
            return link.clone();
        }
        let (events, mut incoming) = mpsc::unbounded_channel();
        let settings = Settings {
            host: network.host.clone(),
            port: network.port,
            tls: network.tls,
            tls_ca_file: network.tls_ca_file.clone(),
            password: network.password.clone(),
            nick: network.bot_nick.clone(),
            username: "matrix".to_owned(),
            realname: "Matrix bridge (Switchboard)".to_owned(),
            flood_burst: network.flood_burst,
            flood_interval: Duration::from_millis(network.flood_interval_ms),
            stale_after: STALE_LINE,
        };
        let link = Arc::new(NetworkLink {
            bot: Connection::spawn(settings, events),
            join_waiters: Mutex::new(HashMap::new()),
        });
        networks.insert(network.id.clone(), link.clone());
        let (inner, id, link_for_task) = (self.clone(), network.id.clone(), link.clone());
        tokio::spawn(async move {
            while let Some(event) = incoming.recv().await {
                match event {
                    Event::Message(message) => {
                        if let Err(e) = inner.relay_from_irc(&id, &link_for_task, message).await {
                            tracing::warn!(network = %id, error = %e, "relaying from IRC failed");
                        }
                    }
                    Event::Disconnected { .. } => inner.bot_disconnected(&id),
                    Event::Registered { .. } => {}
                }
            }
        });
        link
    }

    /// The channel a room bridges: `(network, channel)`.
    fn channel_of(&self, room: &ruma::RoomId) -> Option<(String, String)> {
        self.rooms
            .lock()
            .ok()?
            .iter()
            .find(|(_, r)| r.as_str() == room.as_str())
            .map(|(key, _)| key.clone())
    }

    /// How often idle puppets are looked for: a quarter of the shortest idle timeout, 1–60 s.
    fn idle_sweep_interval(&self) -> Duration {
        let shortest = self
            .config
            .networks
            .iter()
            .map(|n| n.idle_timeout_secs)
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(240);
        Duration::from_millis(shortest * 250).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Quits the puppets whose users said nothing on their network for its `idle_timeout_secs`.
    fn quit_idle_puppets(&self) {
        let idle: Vec<(OwnedUserId, String)> = self
            .puppet_activity
            .lock()
            .map(|activity| {
                activity
                    .iter()
                    .filter(|((_, network), last)| {
                        self.config.network(network).is_some_and(|n| {
                            n.idle_timeout_secs > 0
                                && last.elapsed() >= Duration::from_secs(n.idle_timeout_secs)
                        })
                    })
                    .map(|(key, _)| key.clone())
                    .collect()
            })
            .unwrap_or_default();
        for key in idle {
            if let Ok(mut activity) = self.puppet_activity.lock() {
                activity.remove(&key);
            }
            let connection = self.puppets.lock().ok().and_then(|mut p| p.remove(&key));
            if let Some(connection) = connection {
                tracing::info!(user = %key.0, network = %key.1, "quitting an idle IRC connection");
                connection.quit("idle");
            }
        }
    }

    /// Whether a nick on a network is one of the bridge's own puppets (their lines are not
    /// bridged back).
    fn is_puppet(&self, network: &str, nick: &str) -> bool {
        let nick = fold_case(nick);
        self.puppets.lock().is_ok_and(|puppets| {
            puppets
                .iter()
                .any(|((_, n), c)| n == network && fold_case(&c.nick()) == nick)
        })
    }

    /// The IRC connection of a Matrix user on a network, started on first use with a nick made
    /// from their display name; `None` when the network's `max_connections` are all in use.
    async fn puppet(
        self: &Arc<Self>,
        network: &Network,
        user: &ruma::UserId,
    ) -> Result<Option<Connection>, Box<dyn std::error::Error + Send + Sync>> {
        let key = (user.to_owned(), network.id.clone());
        if let Ok(mut activity) = self.puppet_activity.lock() {
            activity.insert(key.clone(), Instant::now());
        }
        if let Some(connection) = self.puppets.lock().ok().and_then(|p| p.get(&key).cloned()) {
            return Ok(Some(connection));
        }
        let context = self.context.get().ok_or("the bridge is not started")?;
        let path = format!(
            "/_matrix/client/v3/profile/{}/displayname",
            names::percent(user.as_str())
        );
        let display = context
            .client()
            .request(reqwest::Method::GET, &path, None, &[], None)
            .await
            .ok()
            .and_then(|v| v["displayname"].as_str().map(str::to_owned));
        let nick = match self.store.puppet_nick(user.as_str(), &network.id).await? {
            Some(nick) => nick,
            None => {
                let display = display.as_deref().unwrap_or(user.localpart());
                let wanted = network
                    .nick_template
                    .replace("$DISPLAY", display)
                    .replace("$LOCALPART", user.localpart());
                names::nick_for(&wanted, user.localpart())
            }
        };
        let (events, mut incoming) = mpsc::unbounded_channel();
        // Checked and inserted under one lock: two events of the same user handled at once
        // must not open two connections.
        let mut puppets = self.puppets.lock().map_err(|_| "puppets poisoned")?;
        if let Some(connection) = puppets.get(&key) {
            return Ok(Some(connection.clone()));
        }
        // Under the same lock, so concurrent first messages cannot overshoot the limit.
        if puppets.keys().filter(|(_, n)| *n == network.id).count() >= network.max_connections {
            return Ok(None);
        }
        let connection = Connection::spawn(
            Settings {
                host: network.host.clone(),
                port: network.port,
                tls: network.tls,
                tls_ca_file: network.tls_ca_file.clone(),
                password: network.password.clone(),
                nick,
                username: user
                    .localpart()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(10)
                    .collect::<String>()
                    + "m",
                realname: user.to_string(),
                flood_burst: network.flood_burst,
                flood_interval: Duration::from_millis(network.flood_interval_ms),
                stale_after: STALE_LINE,
            },
            events,
        );
        // The channel's lines reach Matrix through the bot; a puppet hears what is said to its
        // user alone (private messages) and remembers the nick it got.
        let (inner, user_id, network_id) = (self.clone(), user.to_owned(), network.id.clone());
        tokio::spawn(async move {
            while let Some(event) = incoming.recv().await {
                match event {
                    Event::Registered { nick } => {
                        if let Err(e) = inner
                            .store
                            .set_puppet_nick(user_id.as_str(), &network_id, &nick)
                            .await
                        {
                            tracing::warn!(error = %e, "cannot store a puppet's nick");
                        }
                    }
                    Event::Message(message) => {
                        if let Err(e) = inner.private_from_irc(&network_id, &user_id, message).await {
                            tracing::warn!(error = %e, "relaying a private message failed");
                        }
                    }
                    Event::Disconnected { .. } => {}
                }
            }
        });
        puppets.insert(key, connection.clone());
        Ok(Some(connection))
    }

    /// A Matrix user's message in a bridged room, said on IRC by their puppet.
    async fn relay_to_irc(self: &Arc<Self>, event: &Value) -> HandlerResult {
        let (Some(sender), Some(room)) = (user_at(event, "sender"), room_of(event)) else {
            return Ok(());
        };
        // The bridge's own users (the bot, IRC people) are not echoed back.
        if sender.localpart().starts_with(PREFIX)
            || self.context.get().is_some_and(|c| c.bot().user_id() == &*sender)
        {
            return Ok(());
        }
        // A command to the bot in its admin room.
        let admin = self.admin_rooms.lock().ok().and_then(|a| a.get(&room).cloned());
        if let Some(owner) = admin {
            let body = event["content"]["body"].as_str().unwrap_or_default();
            if owner == sender && body.starts_with('!') {
                return self.command(&room, &sender, body).await;
            }
            return Ok(());
        }
        // A channel room, or a private chat with one IRC person.
        let (network_id, target) = match self.channel_of(&room) {
            Some(found) => found,
            None => match self.dm_of(&room) {
                Some((network, nick, _)) => (network, nick),
                None => return Ok(()),
            },
        };
        let Some(network) = self.config.network(&network_id) else {
            return Ok(());
        };
        let Some(puppet) = self.puppet(network, &sender).await? else {
            // No connection left for another person: the bot says it for them.
            let body = event["content"]["body"].as_str().unwrap_or_default();
            let name = sender.localpart();
            let link = self.link(network);
            for line in crate::proto::split_message(&format!("<{name}> {body}"), "PRIVMSG", &target, 100) {
                link.bot.send(Message::new("PRIVMSG", &[&target, &line]));
            }
            return Ok(());
        };
        if target.starts_with(['#', '&', '+', '!']) {
            puppet.join(&target);
        }
        let channel = target;
        let content = &event["content"];
        let edited = content["m.new_content"].is_object();
        let body = if edited {
            // An edit: the new text, marked the way IRC people mark corrections.
            format!(
                "* {}",
                content["m.new_content"]["body"].as_str().unwrap_or_default()
            )
        } else {
            self.reply_text(content)
        };
        let body = body.as_str();
        let (command, text) = match content["msgtype"].as_str() {
            Some("m.emote") => ("ACTION", body.to_owned()),
            Some("m.notice") => ("NOTICE", body.to_owned()),
            Some("m.image" | "m.file" | "m.video" | "m.audio") => {
                let url = content["url"].as_str().map(|mxc| self.media_link(mxc));
                (
                    "PRIVMSG",
                    format!("{body} {}", url.unwrap_or_default()).trim().to_owned(),
                )
            }
            _ => ("PRIVMSG", body.to_owned()),
        };
        // ":nick!user@host " as the server will prefix it, generously estimated.
        let prefix_len = puppet.nick().len() + 64;
        if command == "ACTION" {
            // Each piece of a long emote is an ACTION of its own.
            for line in crate::proto::split_message(&text, "PRIVMSG", &channel, prefix_len + 9) {
                puppet.send(Message::new(
                    "PRIVMSG",
                    &[&channel, &format!("\u{1}ACTION {line}\u{1}")],
                ));
            }
            return Ok(());
        }
        for line in crate::proto::split_message(&text, command, &channel, prefix_len) {
            puppet.send(Message::new(command, &[&channel, &line]));
        }
        Ok(())
    }

    /// A reply's text without the quoted fallback, addressed to the IRC person replied to
    /// (`nick: text`), as IRC people write it.
    fn reply_text(&self, content: &Value) -> String {
        let body = content["body"].as_str().unwrap_or_default();
        if content["m.relates_to"]["m.in_reply_to"].is_null() {
            return body.to_owned();
        }
        let mut quoted_sender = None;
        let mut lines = body.lines().peekable();
        while let Some(line) = lines.peek() {
            let Some(quoted) = line.strip_prefix("> ") else {
                break;
            };
            if quoted_sender.is_none() {
                quoted_sender = quoted
                    .strip_prefix("* ")
                    .unwrap_or(quoted)
                    .strip_prefix('<')
                    .and_then(|q| q.split_once('>'))
                    .map(|(user, _)| user.to_owned());
            }
            lines.next();
        }
        let reply = lines
            .collect::<Vec<_>>()
            .join("\n")
            .trim_start_matches('\n')
            .to_owned();
        let nick = quoted_sender.and_then(|user| {
            let id = OwnedUserId::try_from(user).ok()?;
            self.config
                .networks
                .iter()
                .find_map(|n| names::nick_from_localpart(PREFIX, &n.id, id.localpart()))
        });
        match nick {
            Some(nick) => format!("{nick}: {reply}"),
            None => reply,
        }
    }

    /// A download link for an `mxc://server/id` URI.
    fn media_link(&self, mxc: &str) -> String {
        let rest = mxc.strip_prefix("mxc://").unwrap_or(mxc);
        format!(
            "{}/_matrix/media/v3/download/{rest}",
            self.config.homeserver.url.trim_end_matches('/')
        )
    }

    fn room(&self, network: &str, channel: &str) -> Option<OwnedRoomId> {
        self.rooms
            .lock()
            .ok()?
            .get(&(network.to_owned(), fold_case(channel)))
            .cloned()
    }

    fn virtual_user(&self, network: &str, nick: &str) -> Result<OwnedUserId, String> {
        let localpart = names::user_localpart(PREFIX, network, nick);
        OwnedUserId::try_from(format!("@{localpart}:{}", self.config.homeserver.domain))
            .map_err(|e| e.to_string())
    }

    /// One line from a network.
    async fn relay_from_irc(
        self: &Arc<Self>,
        network: &str,
        link: &NetworkLink,
        message: Message,
    ) -> HandlerResult {
        let bot_nick = fold_case(&link.bot.nick());
        let from = message.source_nick().map(fold_case);
        match message.command.as_str() {
            // The bot is in: after its JOIN the server sends the topic (332) and the names, ending
            // with 366. Waiting for that end means the room is made knowing both.
            "JOIN" if from.as_deref() == Some(&bot_nick) => {}
            "366" => {
                let channel = fold_case(message.param(1).unwrap_or_default());
                self.joined(link, &channel, Ok(()));
                self.gone_while_disconnected(network, &channel).await?;
            }
            // The members of a channel the bot joined (`353`): their virtual users join too.
            "353" => {
                if let (Some(channel), Some(names)) = (message.param(2), message.param(3)) {
                    let mut nicks = Vec::new();
                    for name in names.split_whitespace() {
                        let nick = name.trim_start_matches(['@', '+', '%', '&', '~']);
                        if fold_case(nick) == bot_nick || self.is_puppet(network, nick) {
                            continue;
                        }
                        self.track(network, nick, channel, true);
                        nicks.push(nick.to_owned());
                    }
                    if let Some(room) = self.room(network, channel) {
                        // A big channel means hundreds of joins: off this network's line of
                        // events, a few at a time.
                        tokio::spawn(self.clone().mirror_members(
                            network.to_owned(),
                            channel.to_owned(),
                            room,
                            nicks,
                        ));
                    }
                }
            }
            code if JOIN_REFUSALS.contains(&code) => {
                let channel = fold_case(message.param(1).unwrap_or_default());
                let why = message.param(2).unwrap_or("refused").to_owned();
                link.bot.forget(&channel);
                self.joined(link, &channel, Err(why));
            }
            "PRIVMSG" | "NOTICE"
                if from.as_deref() != Some(&bot_nick)
                    && !message.source_nick().is_some_and(|n| self.is_puppet(network, n)) =>
            {
                let (Some(nick), Some(target), Some(text)) =
                    (message.source_nick(), message.param(0), message.param(1))
                else {
                    return Ok(());
                };
                let Some(room) = self.room(network, target) else {
                    return Ok(());
                };
                let content = message_content(&message.command, text);
                self.send_as(network, nick, &room, &content).await?;
            }
            "KICK" => {
                if let (Some(channel), Some(nick)) = (message.param(0), message.param(1)) {
                    if fold_case(nick) == bot_nick {
                        // The bot was kicked: it stops rejoining; people can bridge it again.
                        link.bot.forget(channel);
                    } else if !self.is_puppet(network, nick) {
                        self.track(network, nick, channel, false);
                        self.leave(network, nick, channel).await?;
                    }
                }
            }
            _ if message.source_nick().is_some_and(|n| self.is_puppet(network, n)) => {}
            "JOIN" => {
                // Someone joined a bridged channel: their virtual user joins the room.
                if let (Some(nick), Some(channel)) = (message.source_nick(), message.param(0)) {
                    self.track(network, nick, channel, true);
                    if let Some(room) = self.room(network, channel) {
                        self.intent(network, nick).await?.ensure_joined(&room).await?;
                    }
                }
            }
            "PART" => {
                if let (Some(nick), Some(channel)) = (message.source_nick(), message.param(0)) {
                    self.track(network, nick, channel, false);
                    self.leave(network, nick, channel).await?;
                }
            }
            "QUIT" => {
                if let Some(nick) = message.source_nick() {
                    for channel in self.forget(network, nick) {
                        self.leave(network, nick, &channel).await?;
                    }
                }
            }
            "NICK" => {
                // A new nick is a new virtual user: the old one leaves, the new one joins.
                if let (Some(old), Some(new)) = (message.source_nick(), message.param(0)) {
                    for channel in self.forget(network, old) {
                        self.leave(network, old, &channel).await?;
                        self.track(network, new, &channel, true);
                        if let Some(room) = self.room(network, &channel) {
                            self.intent(network, new).await?.ensure_joined(&room).await?;
                        }
                    }
                }
            }
            // The channel's topic as the bot joins (`332`), or a change of it.
            "332" | "TOPIC" => {
                let (channel, topic) = if message.command == "332" {
                    (message.param(1), message.param(2))
                } else {
                    (message.param(0), message.param(1))
                };
                if let (Some(channel), Some(topic)) = (channel, topic)
                    && let Ok(mut topics) = self.topics.lock()
                {
                    topics.insert((network.to_owned(), fold_case(channel)), irc_to_matrix(topic).0);
                }
                if let (Some(channel), Some(topic)) = (channel, topic)
                    && let Some(room) = self.room(network, channel)
                    && let Some(context) = self.context.get()
                {
                    context
                        .bot()
                        .send_state(
                            &room,
                            "m.room.topic",
                            "",
                            &json!({ "topic": irc_to_matrix(topic).0 }),
                        )
                        .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The bot lost its connection: what it knows of the channels' members is out of date. It is
    /// set aside to compare with the names the server sends after the rejoin.
    fn bot_disconnected(&self, network: &str) {
        let Ok(mut members) = self.members.lock() else {
            return;
        };
        let Ok(mut before) = self.before_reconnect.lock() else {
            return;
        };
        members.retain(|(net, nick), channels| {
            if net != network {
                return true;
            }
            for channel in channels.iter() {
                before
                    .entry((network.to_owned(), channel.clone()))
                    .or_default()
                    .insert(nick.clone());
            }
            false
        });
    }

    /// After the names of a rejoined channel: the people who left while the bot was away leave
    /// the room too.
    async fn gone_while_disconnected(&self, network: &str, channel: &str) -> HandlerResult {
        let Some(before) = self
            .before_reconnect
            .lock()
            .ok()
            .and_then(|mut b| b.remove(&(network.to_owned(), channel.to_owned())))
        else {
            return Ok(());
        };
        let now: BTreeSet<String> = self.members_of(network, channel).into_iter().collect();
        for nick in before.difference(&now) {
            self.leave(network, nick, channel).await?;
        }
        Ok(())
    }

    /// Records that a nick is (or is no longer) in a channel.
    fn track(&self, network: &str, nick: &str, channel: &str, present: bool) {
        if let Ok(mut members) = self.members.lock() {
            let channels = members.entry((network.to_owned(), fold_case(nick))).or_default();
            if present {
                channels.insert(fold_case(channel));
            } else {
                channels.remove(&fold_case(channel));
            }
        }
    }

    /// The virtual users of these channel members join the room, `MEMBER_JOINS` at a time. One
    /// that left the channel while its join was on the way leaves again.
    async fn mirror_members(
        self: Arc<Self>,
        network: String,
        channel: String,
        room: OwnedRoomId,
        nicks: Vec<String>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MEMBER_JOINS));
        let mut joins = tokio::task::JoinSet::new();
        for nick in nicks {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (inner, network, channel, room) =
                (self.clone(), network.clone(), channel.clone(), room.clone());
            joins.spawn(async move {
                let joined = match inner.intent(&network, &nick).await {
                    Ok(intent) => intent.ensure_joined(&room).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = joined {
                    tracing::warn!(%nick, error = %e, "cannot mirror a channel member");
                } else if !inner.members_of(&network, &channel).contains(&fold_case(&nick)) {
                    let _ = inner.leave(&network, &nick, &channel).await;
                }
                drop(slot);
            });
        }
        while joins.join_next().await.is_some() {}
    }

    /// The nicks the bot saw in a channel.
    fn members_of(&self, network: &str, channel: &str) -> Vec<String> {
        let channel = fold_case(channel);
        self.members
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((n, _), channels)| n == network && channels.contains(&channel))
                    .map(|((_, nick), _)| nick.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The private chat a room is: `(network, nick, Matrix user)`.
    fn dm_of(&self, room: &ruma::RoomId) -> Option<(String, String, OwnedUserId)> {
        self.dms.lock().ok()?.get(room).cloned()
    }

    /// A line sent to a Matrix user's puppet: a private message from an IRC person reaches the
    /// user in a direct chat with that person's virtual user (created on the first one).
    async fn private_from_irc(&self, network: &str, user: &OwnedUserId, message: Message) -> HandlerResult {
        if message.command == "KICK" {
            // The puppet was kicked: it stops rejoining that channel.
            let puppet = self
                .puppets
                .lock()
                .ok()
                .and_then(|p| p.get(&(user.clone(), network.to_owned())).cloned());
            if let (Some(puppet), Some(channel), Some(kicked)) = (puppet, message.param(0), message.param(1))
                && fold_case(kicked) == fold_case(&puppet.nick())
            {
                puppet.forget(channel);
            }
            return Ok(());
        }
        if !matches!(message.command.as_str(), "PRIVMSG" | "NOTICE") {
            return Ok(());
        }
        let (Some(nick), Some(target), Some(text)) =
            (message.source_nick(), message.param(0), message.param(1))
        else {
            return Ok(());
        };
        let own_nick = self
            .puppets
            .lock()
            .ok()
            .and_then(|p| p.get(&(user.clone(), network.to_owned())).map(|c| c.nick()));
        // Only what is said to this puppet by a person: not server notices, not channel
        // messages, not CTCP requests other than ACTION.
        if own_nick.is_none_or(|own| fold_case(&own) != fold_case(target))
            || self.is_puppet(network, nick)
            || !valid_nick(nick)
            || (text.starts_with('\u{1}') && ctcp_action(text).is_none())
        {
            return Ok(());
        }
        let existing = self.dms.lock().ok().and_then(|dms| {
            dms.iter()
                .find(|(_, (n, k, u))| n == network && *k == fold_case(nick) && u == user)
                .map(|(room, _)| room.clone())
        });
        let intent = self.intent(network, nick).await?;
        let room = match existing {
            Some(room) => room,
            None => {
                let mut create = json!({
                    "preset": "trusted_private_chat",
                    "is_direct": true,
                    "invite": [user],
                    "name": format!("{nick} (IRC)"),
                });
                if self.config.encryption {
                    // The IRC person's user gets a device when it first speaks (just below),
                    // which then reads what the Matrix user answers.
                    create["initial_state"] = encryption_state();
                }
                let room = intent.create_room(create).await?;
                self.remember_dm(&room, network, nick, user).await?;
                room
            }
        };
        intent
            .send(&room, "m.room.message", &message_content(&message.command, text))
            .await?;
        Ok(())
    }

    async fn remember_dm(
        &self,
        room: &OwnedRoomId,
        network: &str,
        nick: &str,
        user: &OwnedUserId,
    ) -> HandlerResult {
        self.store
            .add_dm(room.as_str(), network, &fold_case(nick), user.as_str())
            .await?;
        if let Ok(mut dms) = self.dms.lock() {
            dms.insert(room.clone(), (network.to_owned(), fold_case(nick), user.clone()));
        }
        Ok(())
    }

    /// A Matrix user invited an IRC person's virtual user: it accepts, and the room becomes
    /// their private chat.
    async fn invited(&self, event: &Value) -> HandlerResult {
        let (Some(invitee), Some(inviter), Some(room)) = (
            user_at(event, "state_key"),
            user_at(event, "sender"),
            room_of(event),
        ) else {
            return Ok(());
        };
        if inviter.localpart().starts_with(PREFIX) || self.channel_of(&room).is_some() {
            return Ok(());
        }
        if self.context.get().is_some_and(|c| c.bot().user_id() == &*invitee) {
            return self.bot_invited(&room, &inviter).await;
        }
        let Some((network, nick)) = self.config.networks.iter().find_map(|n| {
            names::nick_from_localpart(PREFIX, &n.id, invitee.localpart())
                .filter(|nick| valid_nick(nick))
                .map(|nick| (n.id.clone(), nick))
        }) else {
            return Ok(());
        };
        let context = self.context.get().ok_or("the bridge is not started")?;
        let intent = context.intent(&invitee);
        accept_invite(&intent, &room).await?;
        intent.set_display_name(&nick).await?;
        self.remember_dm(&room, &network, &nick, &inviter).await
    }

    /// The room of a channel, bridging it first if needed: the bot joins the channel, then
    /// creates a public room with its alias. `None` if the channel cannot be joined.
    async fn bridge_channel(
        self: &Arc<Self>,
        network: &Network,
        channel: &str,
    ) -> Result<Option<OwnedRoomId>, HandlerError> {
        if let Some(room) = self.room(&network.id, channel) {
            return Ok(Some(room));
        }
        let context = self.context.get().ok_or("the bridge is not started")?;
        let link = self.link(network);
        if let Err(why) = self.join(&link, channel).await {
            tracing::warn!(network = %network.id, %channel, %why, "cannot join the channel");
            return Ok(None);
        }
        let alias = names::alias_localpart(PREFIX, &network.id, channel);
        let network_name = network.name.clone().unwrap_or_else(|| network.id.clone());
        let used_topic = self
            .topics
            .lock()
            .ok()
            .and_then(|t| t.get(&(network.id.clone(), fold_case(channel))).cloned())
            .unwrap_or_else(|| format!("{channel} on {network_name}, bridged from IRC"));
        let mut create = json!({
            "room_alias_name": alias,
            "name": format!("{channel} ({network_name})"),
            "topic": used_topic,
            "preset": "public_chat",
            "visibility": "public",
        });
        if self.config.encryption && self.config.encrypt_channel_rooms {
            create["initial_state"] = encryption_state();
        }
        let created = context.bot().create_room(create).await;
        let room = match created {
            Ok(room) => room,
            // Made at the same moment by another request: find it by its alias.
            Err(e) if e.errcode() == Some("M_ROOM_IN_USE") => {
                let path = format!(
                    "/_matrix/client/v3/directory/room/{}",
                    names::percent(&format!("#{alias}:{}", self.config.homeserver.domain))
                );
                let found = context
                    .client()
                    .request(reqwest::Method::GET, &path, None, &[], None)
                    .await?;
                let room = found["room_id"]
                    .as_str()
                    .and_then(|r| OwnedRoomId::try_from(r).ok());
                if let Some(room) = &room {
                    // Its mapping may have been lost (or its maker failed after creating it).
                    self.store
                        .add_room(&network.id, &fold_case(channel), room.as_str())
                        .await?;
                    if let Ok(mut rooms) = self.rooms.lock() {
                        rooms.insert((network.id.clone(), fold_case(channel)), room.clone());
                    }
                }
                return Ok(room);
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(network = %network.id, %channel, %room, "bridged a channel");
        self.store
            .add_room(&network.id, &fold_case(channel), room.as_str())
            .await?;
        if let Ok(mut rooms) = self.rooms.lock() {
            rooms.insert((network.id.clone(), fold_case(channel)), room.clone());
        }
        // A topic (332) that arrived while the room was being made is applied now.
        let topic = self
            .topics
            .lock()
            .ok()
            .and_then(|t| t.get(&(network.id.clone(), fold_case(channel))).cloned());
        if let Some(topic) = topic.filter(|t| *t != used_topic) {
            context
                .bot()
                .send_state(&room, "m.room.topic", "", &json!({ "topic": topic }))
                .await?;
        }
        // The people already in the channel appear in the room (after answering).
        tokio::spawn(self.clone().mirror_members(
            network.id.clone(),
            channel.to_owned(),
            room.clone(),
            self.members_of(&network.id, channel),
        ));
        Ok(Some(room))
    }

    /// A Matrix user invited the bridge bot: the room becomes their admin room, where the bot
    /// takes commands.
    async fn bot_invited(&self, room: &OwnedRoomId, user: &OwnedUserId) -> HandlerResult {
        let context = self.context.get().ok_or("the bridge is not started")?;
        accept_invite(&context.bot(), room).await?;
        self.store.add_admin_room(room.as_str(), user.as_str()).await?;
        if let Ok(mut admin) = self.admin_rooms.lock() {
            admin.insert(room.clone(), user.clone());
        }
        self.notice(room, "Hello! I bridge IRC. Send !help for what I can do.")
            .await
    }

    async fn notice(&self, room: &OwnedRoomId, text: &str) -> HandlerResult {
        let context = self.context.get().ok_or("the bridge is not started")?;
        context
            .bot()
            .send(
                room,
                "m.room.message",
                &json!({"msgtype": "m.notice", "body": text}),
            )
            .await?;
        Ok(())
    }

    /// `!help`, `!nick <network> <nick>`, `!join <network> <#channel>` in an admin room.
    async fn command(self: &Arc<Self>, room: &OwnedRoomId, user: &OwnedUserId, text: &str) -> HandlerResult {
        let words: Vec<&str> = text.split_whitespace().collect();
        let networks: Vec<&str> = self.config.networks.iter().map(|n| n.id.as_str()).collect();
        let reply = match words.as_slice() {
            ["!help", ..] => format!(
                "Commands:\n!join <network> <#channel> — bridge a channel and invite you\n\
                 !nick <network> <nick> — your nick on a network\n!help — this\n\
                 Networks: {}. You can also join #{PREFIX}<network>_<#channel>:{} directly.",
                networks.join(", "),
                self.config.homeserver.domain
            ),
            ["!join", network, channel] => match self.config.network(network) {
                None => format!("Unknown network `{network}`; networks: {}", networks.join(", ")),
                Some(_) if !names::valid_channel(channel) => {
                    format!("`{channel}` is not a channel name (they start with #)")
                }
                Some(network) => match self.bridge_channel(network, channel).await? {
                    Some(channel_room) => {
                        let context = self.context.get().ok_or("the bridge is not started")?;
                        let invite = format!(
                            "/_matrix/client/v3/rooms/{}/invite",
                            names::percent(channel_room.as_str())
                        );
                        let invited = context
                            .client()
                            .request(
                                reqwest::Method::POST,
                                &invite,
                                None,
                                &[],
                                Some(&json!({"user_id": user})),
                            )
                            .await;
                        match invited {
                            Ok(_) => format!("Invited you to {channel} on {}.", network.id),
                            Err(e) => format!("{channel} is bridged, but inviting you failed: {e}"),
                        }
                    }
                    None => format!("Cannot join {channel} on {}.", network.id),
                },
            },
            ["!nick", network, nick] => match self.config.network(network) {
                None => format!("Unknown network `{network}`; networks: {}", networks.join(", ")),
                Some(_) if names::nick_for(nick, "x") != *nick => format!("`{nick}` is not a valid IRC nick"),
                Some(network) => {
                    self.store
                        .set_puppet_nick(user.as_str(), &network.id, nick)
                        .await?;
                    let puppet = self
                        .puppets
                        .lock()
                        .ok()
                        .and_then(|p| p.get(&(user.clone(), network.id.clone())).cloned());
                    if let Some(puppet) = puppet {
                        puppet.send(Message::new("NICK", &[nick]));
                    }
                    format!("Your nick on {} is now {nick}.", network.id)
                }
            },
            _ => "Unknown command; send !help.".to_owned(),
        };
        self.notice(room, &reply).await
    }

    /// A Matrix user left a bridged room: their puppet leaves the channel.
    async fn left_room(&self, event: &Value) {
        let (Some(user), Some(room)) = (user_at(event, "state_key"), room_of(event)) else {
            return;
        };
        if let Some((network, nick, dm_user)) = self.dm_of(&room) {
            if dm_user == user {
                self.end_dm(&room, &network, &nick).await;
            }
            return;
        }
        let Some((network, channel)) = self.channel_of(&room) else {
            return;
        };
        let puppet = self
            .puppets
            .lock()
            .ok()
            .and_then(|p| p.get(&(user, network)).cloned());
        if let Some(puppet) = puppet {
            puppet.part(&channel, "left the Matrix room");
        }
    }

    /// The Matrix user left a private chat: it ends. The IRC person's user leaves too, and their
    /// next message opens a new chat (with a new invite) instead of talking to an empty room.
    async fn end_dm(&self, room: &OwnedRoomId, network: &str, nick: &str) {
        if let Ok(mut dms) = self.dms.lock() {
            dms.remove(room);
        }
        if let Err(e) = self.store.remove_dm(room.as_str()).await {
            tracing::warn!(%room, error = %e, "cannot forget a private chat");
        }
        let left = match self.intent(network, nick).await {
            Ok(intent) => intent.leave(room).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = left {
            tracing::warn!(%room, error = %e, "the IRC person's user cannot leave the ended chat");
        }
    }

    /// The channels a nick was in, forgetting it (it quit or changed nick).
    fn forget(&self, network: &str, nick: &str) -> Vec<String> {
        self.members
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&(network.to_owned(), fold_case(nick))))
            .map(|channels| channels.into_iter().collect())
            .unwrap_or_default()
    }

    /// The virtual user of `nick` leaves the room of `channel`.
    async fn leave(&self, network: &str, nick: &str, channel: &str) -> HandlerResult {
        let Some(room) = self.room(network, channel) else {
            return Ok(());
        };
        let Some(context) = self.context.get() else {
            return Ok(());
        };
        let intent = context.intent(&self.virtual_user(network, nick)?);
        match intent.leave(&room).await {
            // Never joined on the Matrix side: nothing to mirror.
            Err(e) if e.errcode() == Some("M_FORBIDDEN") => Ok(()),
            other => Ok(other?),
        }
    }

    /// The virtual user of an IRC nick, with the nick as display name.
    async fn intent(
        &self,
        network: &str,
        nick: &str,
    ) -> Result<switchboard_appservice::Intent, Box<dyn std::error::Error + Send + Sync>> {
        let context = self.context.get().ok_or("the bridge is not started")?;
        let intent = context.intent(&self.virtual_user(network, nick)?);
        intent.set_display_name(nick).await?;
        Ok(intent)
    }

    async fn send_as(&self, network: &str, nick: &str, room: &OwnedRoomId, content: &Value) -> HandlerResult {
        let intent = self.intent(network, nick).await?;
        intent.send(room, "m.room.message", content).await?;
        Ok(())
    }

    fn joined(&self, link: &NetworkLink, channel: &str, outcome: Result<(), String>) {
        let waiters = link
            .join_waiters
            .lock()
            .ok()
            .and_then(|mut w| w.remove(channel))
            .unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Joins the channel with the bot and waits for the server to confirm it.
    async fn join(&self, link: &NetworkLink, channel: &str) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiters) = link.join_waiters.lock() {
            waiters.entry(fold_case(channel)).or_default().push(tx);
        }
        link.bot.join(channel);
        match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err("the connection went away".to_owned()),
            Err(_) => Err(format!("no answer to JOIN {channel} within {JOIN_TIMEOUT:?}")),
        }
    }
}

/// `initial_state` that makes a new room encrypted (Megolm).
fn encryption_state() -> Value {
    json!([{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
}

/// Joins a room the user was invited to, trying again (up to [`INVITE_JOIN_ATTEMPTS`] times)
/// while the failure may pass: no answer, a 5xx or a 429. A refusal fails at once.
async fn accept_invite(
    intent: &switchboard_appservice::Intent,
    room: &ruma::RoomId,
) -> Result<(), switchboard_appservice::Error> {
    let mut attempt = 1;
    loop {
        match intent.ensure_joined(room).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < INVITE_JOIN_ATTEMPTS && may_pass(&e) => {
                tracing::warn!(
                    %room, user = %intent.user_id(), error = %e, attempt,
                    "accepting an invite failed; trying again"
                );
                tokio::time::sleep(Duration::from_secs(1u64 << (attempt - 1))).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a failed request may succeed if made again: the homeserver was unreachable, failed
/// (5xx) or asked to slow down (429).
fn may_pass(e: &switchboard_appservice::Error) -> bool {
    match e {
        switchboard_appservice::Error::Unreachable { .. } => true,
        switchboard_appservice::Error::Matrix(m) => m.status >= 500 || m.status == 429,
        _ => false,
    }
}

/// The `m.room.message` content of a `PRIVMSG` (an ACTION is an `m.emote`) or `NOTICE`, with
/// IRC formatting as HTML.
fn message_content(command: &str, text: &str) -> Value {
    let (msgtype, text) = match ctcp_action(text) {
        Some(action) => ("m.emote", action),
        None if command == "NOTICE" => ("m.notice", text),
        None => ("m.text", text),
    };
    let (body, html) = irc_to_matrix(text);
    let mut content = json!({"msgtype": msgtype, "body": body});
    if let Some(html) = html {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(html);
    }
    content
}

impl Handler for Bridge {
    async fn raw_event(&self, _ctx: Context, event: Value) -> HandlerResult {
        match event["type"].as_str() {
            Some("m.room.message") => self.inner.relay_to_irc(&event).await?,
            Some("m.room.member") => match event["content"]["membership"].as_str() {
                Some("leave" | "ban") => self.inner.left_room(&event).await,
                Some("invite") => self.inner.invited(&event).await?,
                _ => {}
            },
            _ => {}
        }
        Ok(())
    }

    async fn query_alias(&self, _ctx: Context, alias: OwnedRoomAliasId) -> HandlerResult<bool> {
        let inner = &self.inner;
        if alias.server_name().as_str() != inner.config.homeserver.domain {
            return Ok(false);
        }
        let ids: Vec<String> = inner.config.networks.iter().map(|n| n.id.clone()).collect();
        let Some((network_id, channel)) = names::channel_from_alias(PREFIX, &ids, alias.alias()) else {
            return Ok(false);
        };
        let Some(network) = inner.config.network(network_id) else {
            return Ok(false);
        };
        Ok(inner.bridge_channel(network, &channel).await?.is_some())
    }

    /// `/thirdparty/protocol/irc` describes the networks; `location` and `user` turn a network and
    /// a channel or nick into the alias or user ID, and back.
    async fn thirdparty(
        &self,
        _ctx: Context,
        kind: &str,
        protocol: &str,
        query: Vec<(String, String)>,
    ) -> HandlerResult<Option<Value>> {
        let inner = &self.inner;
        let domain = &inner.config.homeserver.domain;
        let field = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if !protocol.is_empty() && protocol != "irc" {
            return Ok(None);
        }
        let answer = match (kind, protocol) {
            ("protocol", _) => json!({
                "user_fields": ["network", "nickname"],
                "location_fields": ["network", "channel"],
                "icon": "",
                "field_types": {
                    "network": {"regexp": "[a-z0-9-]+", "placeholder": "libera"},
                    "nickname": {"regexp": "[^#\\s]+", "placeholder": "SomeNick"},
                    "channel": {"regexp": "[#&+!][^\\s,]+", "placeholder": "#channel"},
                },
                "instances": inner.config.networks.iter().map(|n| json!({
                    "network_id": n.id,
                    "desc": n.name.clone().unwrap_or_else(|| n.host.clone()),
                    "icon": "",
                    "fields": {"network": n.id},
                })).collect::<Vec<_>>(),
            }),
            ("location", "irc") => {
                let (Some(network), Some(channel)) = (field("network"), field("channel")) else {
                    return Ok(Some(json!([])));
                };
                if inner.config.network(&network).is_none() {
                    return Ok(Some(json!([])));
                }
                let alias = names::alias_localpart(PREFIX, &network, &channel);
                json!([{
                    "alias": format!("#{alias}:{domain}"),
                    "protocol": "irc",
                    "fields": {"network": network, "channel": fold_case(&channel)},
                }])
            }
            ("user", "irc") => {
                let (Some(network), Some(nick)) = (field("network"), field("nickname")) else {
                    return Ok(Some(json!([])));
                };
                if inner.config.network(&network).is_none() {
                    return Ok(Some(json!([])));
                }
                json!([{
                    "userid": format!("@{}:{domain}", names::user_localpart(PREFIX, &network, &nick)),
                    "protocol": "irc",
                    "fields": {"network": network, "nickname": nick},
                }])
            }
            ("location", "") => {
                let ids: Vec<String> = inner.config.networks.iter().map(|n| n.id.clone()).collect();
                let found = field("alias")
                    .and_then(|a| OwnedRoomAliasId::try_from(a).ok())
                    .and_then(|a| {
                        let (network, channel) = names::channel_from_alias(PREFIX, &ids, a.alias())?;
                        Some(json!([{
                            "alias": a,
                            "protocol": "irc",
                            "fields": {"network": network, "channel": channel},
                        }]))
                    });
                found.unwrap_or_else(|| json!([]))
            }
            ("user", "") => {
                let found = field("userid")
                    .and_then(|u| OwnedUserId::try_from(u).ok())
                    .and_then(|u| {
                        inner.config.networks.iter().find_map(|n| {
                            let nick = names::nick_from_localpart(PREFIX, &n.id, u.localpart())?;
                            Some(json!([{
                                "userid": u,
                                "protocol": "irc",
                                "fields": {"network": n.id, "nickname": nick},
                            }]))
                        })
                    });
                found.unwrap_or_else(|| json!([]))
            }
            _ => return Ok(None),
        };
        Ok(Some(answer))
    }

    async fn query_user(&self, ctx: Context, user_id: OwnedUserId) -> HandlerResult<bool> {
        // `@irc_<network>_<nick>` exists for every nick on a configured network (so a Matrix
        // user can invite any IRC person); it is registered when asked about.
        let inner = &self.inner;
        let ours = user_id.server_name().as_str() == inner.config.homeserver.domain
            && inner
                .config
                .networks
                .iter()
                .any(|n| names::nick_from_localpart(PREFIX, &n.id, user_id.localpart()).is_some());
        if ours {
            ctx.intent(&user_id).ensure_registered().await?;
        }
        Ok(ours)
    }
}
