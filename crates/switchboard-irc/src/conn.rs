//! One IRC connection (the bridge bot's, or a Matrix user's puppet): connects (TCP or TLS),
//! registers (`PASS`/`NICK`/`USER`, another nick when the one asked for is taken), answers
//! `PING`, rejoins its channels after a reconnect (with backoff), and sends under flood control
//! so the server never disconnects it for flooding. Everything the server says goes to the
//! owner as [`Event`]s.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::{mpsc, watch},
    time::Instant,
};

use crate::proto::{Message, fold_case};

/// How to reach and register on a network.
#[derive(Clone, Debug)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Trust only the certificates in this PEM file (a private network's own CA, a test
    /// server); the system's trust roots otherwise.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub password: Option<String>,
    pub nick: String,
    pub username: String,
    pub realname: String,
    /// Lines sent at once before flood control paces them.
    pub flood_burst: u32,
    /// Then one line per this interval.
    pub flood_interval: Duration,
    /// Lines that waited longer than this for the connection (while it was down) are dropped:
    /// a conversation should not replay minutes later, out of context.
    pub stale_after: Duration,
}

/// What the connection reports to its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Registered (again) with this nick; channels are being rejoined.
    Registered { nick: String },
    /// A line from the server (after registration; `PING`s are answered, not reported).
    Message(Message),
    /// The connection dropped; it reconnects by itself unless it was told to quit.
    Disconnected { reason: String },
}

/// A handle to a running connection. Dropping every handle does not stop it: call
/// [`Connection::quit`].
#[derive(Clone)]
pub struct Connection {
    outgoing: mpsc::UnboundedSender<(Instant, Message)>,
    state: Arc<Mutex<Shared>>,
    quit: watch::Sender<Option<String>>,
}

#[derive(Default)]
struct Shared {
    nick: String,
    /// Channels to be in (folded), rejoined after a reconnect.
    channels: BTreeSet<String>,
    registered: bool,
}

impl Connection {
    /// Starts connecting; events go to `events` until the connection quits.
    pub fn spawn(settings: Settings, events: mpsc::UnboundedSender<Event>) -> Self {
        let (outgoing, queue) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(Shared { ..Shared::default() }));
        let (quit, quitting) = watch::channel(None);
        tokio::spawn(run(settings, queue, events, state.clone(), quitting));
        Self {
            outgoing,
            state,
            quit,
        }
    }

    /// The nick the server knows this connection by (it may differ from the one asked for).
    /// Empty while not registered.
    pub fn nick(&self) -> String {
        self.state
            .lock()
            .map(|s| {
                if s.registered {
                    s.nick.clone()
                } else {
                    String::new()
                }
            })
            .unwrap_or_default()
    }

    pub fn is_registered(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.registered)
    }

    /// Queues a line (sent under flood control, after registration).
    pub fn send(&self, message: Message) {
        let _ = self.outgoing.send((Instant::now(), message));
    }

    /// Joins a channel now (or once registered) and after every reconnect.
    pub fn join(&self, channel: &str) {
        // Under the lock the registration handler also takes: either it rejoins the channel or
        // this sends the JOIN. (Sent again when already listed: after a kick or a refusal the
        // server may let it in now, and a server ignores a JOIN to a channel the client is in.)
        if let Ok(mut state) = self.state.lock() {
            state.channels.insert(fold_case(channel));
            if state.registered {
                self.send(Message::new("JOIN", &[channel]));
            }
        }
    }

    /// Stops rejoining a channel the server refused or kicked this connection from.
    pub fn forget(&self, channel: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.channels.remove(&fold_case(channel));
        }
    }

    /// Leaves a channel (and stops rejoining it).
    pub fn part(&self, channel: &str, reason: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.channels.remove(&fold_case(channel));
        }
        self.send(Message::new("PART", &[channel, reason]));
    }

    /// Sends `QUIT` and stops for good.
    pub fn quit(&self, reason: &str) {
        self.quit.send_replace(Some(reason.to_owned()));
    }
}

/// Any stream a connection can run over (TCP, TLS over TCP).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(settings: &Settings) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect((settings.host.as_str(), settings.port)).await?;
    tcp.set_nodelay(true)?;
    if !settings.tls {
        return Ok(Box::new(tcp));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &settings.tls_ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(path).map_err(std::io::Error::other)? {
                roots
                    .add(certificate.map_err(std::io::Error::other)?)
                    .map_err(std::io::Error::other)?;
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        None => {
            <rustls::ClientConfig as rustls_platform_verifier::ConfigVerifierExt>::with_platform_verifier()
                .map_err(std::io::Error::other)?
        }
    };
    let name =
        rustls::pki_types::ServerName::try_from(settings.host.clone()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(tls))
}

/// Reconnect delays: 1, 2, 4 … 60 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

async fn run(
    settings: Settings,
    mut queue: mpsc::UnboundedReceiver<(Instant, Message)>,
    events: mpsc::UnboundedSender<Event>,
    state: Arc<Mutex<Shared>>,
    mut quitting: watch::Receiver<Option<String>>,
) {
    let mut attempt = 0;
    loop {
        let reason = match connect(&settings).await {
            Ok(stream) => {
                let session = Session {
                    settings: &settings,
                    events: &events,
                    state: &state,
                };
                match session.run(stream, &mut queue, &mut quitting).await {
                    Ended::Quit => return,
                    // Only a session that got registered resets the backoff: a server that
                    // accepts connections but refuses us is not hammered.
                    Ended::Lost { reason, registered } => {
                        if registered {
                            attempt = 0;
                        }
                        reason
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        if let Ok(mut state) = state.lock() {
            state.registered = false;
        }
        tracing::warn!(host = %settings.host, %reason, "IRC connection lost; reconnecting");
        if events.send(Event::Disconnected { reason }).is_err() {
            return;
        }
        let delay = backoff(attempt);
        attempt += 1;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = quitting.changed() => return,
        }
    }
}

enum Ended {
    Quit,
    Lost { reason: String, registered: bool },
}

/// Silence after which the connection asks the server whether it is still there, and after
/// which (plus as long again) it gives up on it: half-open TCP connections end.
const IDLE_PING: Duration = Duration::from_secs(120);

struct Session<'a> {
    settings: &'a Settings,
    events: &'a mpsc::UnboundedSender<Event>,
    state: &'a Arc<Mutex<Shared>>,
}

impl Session<'_> {
    async fn run(
        &self,
        stream: Box<dyn Stream>,
        queue: &mut mpsc::UnboundedReceiver<(Instant, Message)>,
        quitting: &mut watch::Receiver<Option<String>>,
    ) -> Ended {
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(reader);
        let mut buffer = Vec::new();
        // After a reconnect, the nick it had (changed by the server or by `NICK`), not the first.
        let mut nick = self
            .state
            .lock()
            .ok()
            .map(|s| s.nick.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.settings.nick.clone());
        let mut attempts = 0u32;
        let mut hello = Vec::new();
        if let Some(password) = &self.settings.password {
            hello.push(Message::new("PASS", &[password]));
        }
        hello.push(Message::new("NICK", &[&nick]));
        hello.push(Message::new(
            "USER",
            &[&self.settings.username, "0", "*", &self.settings.realname],
        ));
        for message in hello {
            if let Err(e) = write_line(&mut writer, &message).await {
                return lost(e.to_string(), false);
            }
        }
        let mut registered = false;
        let mut pacer = Pacer::new(self.settings.flood_burst, self.settings.flood_interval);
        let mut pending: VecDeque<Message> = VecDeque::new();
        let mut last_heard = Instant::now();
        let mut pinged = false;
        loop {
            let due = pacer.next_slot();
            let idle_deadline = last_heard + IDLE_PING * if pinged { 2 } else { 1 };
            tokio::select! {
                read = reader.read_until(b'\n', &mut buffer) => {
                    match read {
                        Ok(0) => return lost("the server closed the connection".to_owned(), registered),
                        Ok(_) => {}
                        Err(e) => return lost(e.to_string(), registered),
                    }
                    // IRC has no encoding: bytes that are not UTF-8 (Latin-1 clients) become U+FFFD
                    // instead of breaking the connection.
                    let line = String::from_utf8_lossy(&buffer).into_owned();
                    buffer.clear();
                    (last_heard, pinged) = (Instant::now(), false);
                    let Some(message) = Message::parse(&line) else { continue };
                    match message.command.as_str() {
                        "PING" => {
                            let token = message.param(0).unwrap_or_default();
                            if let Err(e) = write_line(&mut writer, &Message::new("PONG", &[token])).await {
                                return lost(e.to_string(), registered);
                            }
                            continue;
                        }
                        // Nick taken or refused while registering: try another.
                        "433" | "432" | "436" if !registered => {
                            attempts += 1;
                            if attempts > 20 {
                                return lost(format!("no nick accepted (last tried {nick})"), false);
                            }
                            nick = next_nick(&self.settings.nick, attempts);
                            if let Err(e) = write_line(&mut writer, &Message::new("NICK", &[&nick])).await {
                                return lost(e.to_string(), registered);
                            }
                            continue;
                        }
                        "001" => {
                            registered = true;
                            let (nick_now, channels) = match self.state.lock() {
                                Ok(mut state) => {
                                    state.nick = message.param(0).unwrap_or(&nick).to_owned();
                                    state.registered = true;
                                    (state.nick.clone(), state.channels.clone())
                                }
                                Err(_) => (nick.clone(), BTreeSet::new()),
                            };
                            for channel in channels {
                                pending.push_back(Message::new("JOIN", &[&channel]));
                            }
                            let _ = self.events.send(Event::Registered { nick: nick_now });
                        }
                        "NICK" => self.own_nick_changed(&message),
                        "ERROR" => {
                            let reason = message.param(0).unwrap_or("ERROR from server").to_owned();
                            let _ = self.events.send(Event::Message(message));
                            return lost(reason, registered);
                        }
                        _ => {}
                    }
                    if registered && self.events.send(Event::Message(message)).is_err() {
                        return Ended::Quit;
                    }
                }
                // Nothing is taken from the queue before registration: the rejoins go first.
                queued = queue.recv(), if registered && pending.is_empty() => match queued {
                    Some((at, message)) if at.elapsed() > self.settings.stale_after => {
                        tracing::warn!(
                            host = %self.settings.host,
                            command = %message.command,
                            waited_s = at.elapsed().as_secs(),
                            "dropping a line that waited too long for the connection"
                        );
                    }
                    Some((_, message)) => pending.push_back(message),
                    None => return Ended::Quit,
                },
                () = tokio::time::sleep_until(due), if registered && !pending.is_empty() => {
                    if let Some(message) = pending.pop_front() {
                        pacer.take();
                        if let Err(e) = write_line(&mut writer, &message).await {
                            // Lost with the connection (IRC has no delivery receipts).
                            return lost(e.to_string(), registered);
                        }
                    }
                }
                () = tokio::time::sleep_until(idle_deadline) => {
                    if pinged {
                        return lost("no answer from the server".to_owned(), registered);
                    }
                    pinged = true;
                    if let Err(e) = write_line(&mut writer, &Message::new("PING", &["switchboard"])).await {
                        return lost(e.to_string(), registered);
                    }
                }
                _ = quitting.changed() => {
                    let reason = quitting.borrow().clone().unwrap_or_default();
                    let _ = write_line(&mut writer, &Message::new("QUIT", &[&reason])).await;
                    let _ = writer.shutdown().await;
                    return Ended::Quit;
                }
            }
        }
    }

    fn own_nick_changed(&self, message: &Message) {
        if let (Some(old), Some(new)) = (message.source_nick(), message.param(0))
            && let Ok(mut state) = self.state.lock()
            && fold_case(old) == fold_case(&state.nick)
        {
            state.nick = new.to_owned();
        }
    }
}

fn lost(reason: String, registered: bool) -> Ended {
    Ended::Lost { reason, registered }
}

/// The nick to try after `attempt` refusals (taken, or too long or invalid for the server): the
/// wanted nick's letters and digits, cut to fit the 9 characters every server allows, with the
/// attempt number.
fn next_nick(wanted: &str, attempt: u32) -> String {
    let mut base: String = wanted.chars().filter(char::is_ascii_alphanumeric).collect();
    if !base.starts_with(|c: char| c.is_ascii_alphabetic()) {
        base.insert(0, 'M');
    }
    let suffix = attempt.to_string();
    let keep = 9usize.saturating_sub(suffix.len());
    format!("{}{suffix}", base.chars().take(keep).collect::<String>())
}

async fn write_line(writer: &mut (impl AsyncWrite + Unpin), message: &Message) -> std::io::Result<()> {
    let mut line = message.to_string();
    // Never let a line (or a stray line break in a parameter) exceed or break the protocol.
    line.retain(|c| c != '\r' && c != '\n');
    let mut cut = line.len().min(crate::proto::MAX_LINE - 2);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    line.push_str("\r\n");
    writer.write_all(line.as_bytes()).await?;
    writer.flush().await
}

/// Flood control as IRC servers expect it: a burst, then one line per interval.
struct Pacer {
    burst: u32,
    interval: Duration,
    /// When the bucket is back to full; each line moves it one interval later.
    full_at: Instant,
}

impl Pacer {
    fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: burst.max(1),
            interval,
            full_at: Instant::now(),
        }
    }

    /// When the next line may go.
    fn next_slot(&self) -> Instant {
        // A line may go while at least one of the `burst` slots is free.
        let allowance = self.interval * (self.burst - 1);
        self.full_at.checked_sub(allowance).unwrap_or(self.full_at)
    }

    fn take(&mut self) {
        self.full_at = self.full_at.max(Instant::now()) + self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nick_fallbacks() {
        assert_eq!(next_nick("alice", 1), "alice1");
        assert_eq!(next_nick("9 lives!", 2), "M9lives2");
        assert_eq!(next_nick("MatrixBridge", 12), "MatrixB12", "cut to 9 characters");
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(10), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_allows_a_burst_then_one_line_per_interval() {
        let mut pacer = Pacer::new(3, Duration::from_secs(1));
        let start = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep_until(pacer.next_slot()).await;
            pacer.take();
            sent.push(start.elapsed().as_secs());
        }
        assert_eq!(sent, [0, 0, 0, 1, 2, 3]);
    }

    /// A scripted IRC server for one test: accepts connections and hands each to the test.
    async fn fake_server() -> (u16, mpsc::UnboundedReceiver<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                if tx.send(socket).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    struct Peer {
        lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<TcpStream>>>,
        writer: tokio::io::WriteHalf<TcpStream>,
    }

    impl Peer {
        fn new(socket: TcpStream) -> Self {
            let (reader, writer) = tokio::io::split(socket);
            Self {
                lines: BufReader::new(reader).lines(),
                writer,
            }
        }

        async fn expect(&mut self, want: &str) {
            let line = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
                .await
                .expect("in time")
                .expect("read")
                .expect("a line");
            assert_eq!(line, want);
        }

        async fn say(&mut self, line: &str) {
            self.writer
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .expect("write");
        }
    }

    async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("in time")
            .expect("an event")
    }

    #[tokio::test]
    async fn registers_answers_pings_rejoins_after_a_reconnect_and_quits() {
        let (port, mut accepted) = fake_server().await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let connection = Connection::spawn(
            Settings {
                host: "127.0.0.1".to_owned(),
                port,
                tls: false,
                tls_ca_file: None,
                password: Some("secret".to_owned()),
                nick: "bot".to_owned(),
                username: "bridge".to_owned(),
                realname: "Switchboard".to_owned(),
                flood_burst: 5,
                flood_interval: Duration::from_millis(10),
                stale_after: Duration::from_millis(300),
            },
            tx,
        );
        connection.join("#Test");
        let mut peer = Peer::new(accepted.recv().await.expect("connects"));
        peer.expect("PASS secret").await;
        peer.expect("NICK bot").await;
        peer.expect("USER bridge 0 * Switchboard").await;
        peer.say(":srv 433 * bot :Nickname is already in use").await;
        peer.expect("NICK bot1").await;
        peer.say(":srv 001 bot1 :Welcome").await;
        assert_eq!(
            next_event(&mut events).await,
            Event::Registered {
                nick: "bot1".to_owned()
            }
        );
        assert_eq!(connection.nick(), "bot1");
        peer.expect("JOIN #test").await;
        peer.say("PING :token").await;
        peer.expect("PONG token").await;
        peer.say(":alice!a@h PRIVMSG #test :hi").await;
        // Everything after registration is reported (the welcome too); wait for the message.
        let message = loop {
            if let Event::Message(m) = next_event(&mut events).await
                && m.command == "PRIVMSG"
            {
                break m;
            }
        };
        assert_eq!(
            (message.source_nick(), message.param(1)),
            (Some("alice"), Some("hi"))
        );
        connection.send(Message::new("PRIVMSG", &["#test", "hello back"]));
        peer.expect("PRIVMSG #test :hello back").await;

        // The server goes away; the connection comes back by itself and rejoins.
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        // Said while the connection is down: this one waits past `stale_after` (the reconnect
        // comes after a second's backoff) and is dropped; the next one goes out.
        connection.send(Message::new("PRIVMSG", &["#test", "stale"]));
        let mut peer = Peer::new(accepted.recv().await.expect("reconnects"));
        connection.send(Message::new("PRIVMSG", &["#test", "fresh"]));
        peer.expect("PASS secret").await;
        // It asks for the nick it had, not the first one it wanted.
        peer.expect("NICK bot1").await;
        peer.expect("USER bridge 0 * Switchboard").await;
        peer.say(":srv 001 bot1 :Welcome back").await;
        assert_eq!(
            next_event(&mut events).await,
            Event::Registered {
                nick: "bot1".to_owned()
            }
        );
        peer.expect("JOIN #test").await;
        peer.expect("PRIVMSG #test fresh").await;

        connection.quit("bye");
        peer.expect("QUIT bye").await;
    }
}
