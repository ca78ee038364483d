//! Starts the real `switchboard` binary on a loopback port with a temporary data directory.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub struct Server {
    child: Option<Child>,
    /// The PostgreSQL database when the tests run on it; dropped after the server stops.
    pub database: Option<switchboard_store::testing::TestPostgres>,
    pub dir: tempfile::TempDir,
    pub base: String,
    /// One client per server: building one loads the TLS trust roots, which is slow unoptimised.
    pub http: reqwest::Client,
}

/// Generous limits so tests exercise behaviour, not the rate limiter (which has its own test).
pub const RELAXED_LIMITS: &str = "
rc_message: {per_second: 1000, burst_count: 1000}
rc_registration: {per_second: 1000, burst_count: 1000}
rc_login:
  address: {per_second: 1000, burst_count: 1000}
  account: {per_second: 1000, burst_count: 1000}
  failed_attempts: {per_second: 1000, burst_count: 1000}
rc_joins: {local: {per_second: 1000, burst_count: 1000}, remote: {per_second: 1000, burst_count: 1000}}
rc_invites:
  per_room: {per_second: 1000, burst_count: 1000}
  per_user: {per_second: 1000, burst_count: 1000}
  per_issuer: {per_second: 1000, burst_count: 1000}
rc_media_create: {per_second: 1000, burst_count: 1000}
";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn config_text(port: u16, dir: &std::path::Path, extra: &str) -> String {
    // Tests that register services pass their own `app_service_config_files`.
    let services = if extra.contains("app_service_config_files") {
        ""
    } else {
        "app_service_config_files: []"
    };
    format!(
        "server_name: localhost
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    resources: [{{names: [client]}}]
database: {{name: sqlite3, args: {{database: {dir}/homeserver.db}}}}
media_store_path: {dir}/media
signing_key_path: {dir}/signing.key
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: test
{services}
{extra}",
        dir = dir.display()
    )
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchboard"))
}

#[derive(Clone, Debug)]
pub struct User {
    pub user_id: String,
    pub token: String,
    pub device_id: String,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(RELAXED_LIMITS).await
    }

    pub async fn start_with(extra_config: &str) -> Self {
        Self::start_edited(extra_config, |text| text).await
    }

    /// Starts with the generated config text passed through `edit` first, on the database engine
    /// the tests run on (`SWITCHBOARD_TEST_DATABASE`).
    pub async fn start_edited(extra_config: &str, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_on(
            switchboard_store::testing::postgres_selected(),
            extra_config,
            edit,
        )
        .await
    }

    /// Starts on SQLite whatever engine the tests run on (the source of `port-db`).
    pub async fn start_on_sqlite(extra_config: &str) -> Self {
        Self::start_on(false, extra_config, |text| text).await
    }

    /// Starts on PostgreSQL (a fresh database) or SQLite, whatever the tests run on.
    pub async fn start_on(postgres: bool, extra_config: &str, edit: impl FnOnce(String) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut text = edit(config_text(port, dir.path(), extra_config));
        let database = if postgres {
            let database = switchboard_store::testing::TestPostgres::create().await;
            let sqlite = format!(
                "database: {{name: sqlite3, args: {{database: {}/homeserver.db}}}}",
                dir.path().display()
            );
            assert!(text.contains(&sqlite), "the config names the default database");
            text = text.replace(&sqlite, &database.config_block());
            Some(database)
        } else {
            None
        };
        std::fs::write(dir.path().join("homeserver.yaml"), text).expect("config");
        tls_init();
        let mut server = Self {
            child: None,
            database,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        // `free_port` can only find a port that was free a moment ago: another test may take it
        // before the server binds it. Then the server starts again on another.
        for _ in 0..5 {
            if !server.spawn_on_port().await {
                return server;
            }
            let taken = server.base.rsplit(':').next().unwrap_or_default().to_owned();
            let port = free_port();
            let text = std::fs::read_to_string(server.config_path()).expect("config");
            let text = text.replacen(&format!("port: {taken}\n"), &format!("port: {port}\n"), 1);
            std::fs::write(server.config_path(), text).expect("config");
            server.base = format!("http://127.0.0.1:{port}");
        }
        panic!("no free port for switchboard after 5 tries: {}", server.log());
    }

    /// Spawns the server; `true` if its port was taken meanwhile (it exited saying so).
    async fn spawn_on_port(&mut self) -> bool {
        let earlier = self.log().len();
        match self.try_spawn().await {
            Ok(()) => false,
            Err(_)
                if self
                    .log()
                    .get(earlier..)
                    .is_some_and(|new| new.contains("Address already in use")) =>
            {
                true
            }
            Err(log) => panic!("switchboard exited: {log}"),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("homeserver.yaml")
    }

    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("switchboard exited: {log}");
        }
    }

    /// Starts the binary and waits until it answers; `Err` with its log if it exited first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        tls_init();
        let earlier = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let child = Command::new(binary())
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start switchboard");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = self.http.clone();
        // Answered by this process: another test's server may hold the port for a moment (it
        // was free when picked) and answer first, while this one fails to bind it.
        let address = self.base.trim_start_matches("http://").to_owned();
        let listening = |log: &str| {
            log.get(earlier..)
                .is_some_and(|new| new.contains("listening") && new.contains(&address))
        };
        while Instant::now() < deadline {
            if let Ok(r) = client
                .get(format!("{}/_matrix/client/versions", self.base))
                .send()
                .await
                && r.status().is_success()
                && listening(&self.log())
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("{status}: {}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("switchboard did not answer within 30 s: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Resident memory of the server process, from `/proc` (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmRSS:")
    }

    /// The most resident memory the server process ever had.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmHWM:")
    }

    /// CPU time (user + system) the server has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.child.as_ref()?.id().to_string())
    }

    fn proc_status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Sends a signal (`HUP`, …) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
    }

    /// SIGTERM and wait; returns how the process exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        child.wait().expect("wait")
    }

    /// SIGKILL: a crash, with no chance to flush anything.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
    }

    pub async fn restart(&mut self) {
        if self.child.is_some() {
            assert!(self.terminate().success(), "clean shutdown: {}", self.log());
        }
        self.spawn().await;
    }

    pub async fn crash_and_restart(&mut self) {
        self.crash();
        self.spawn().await;
    }

    /// Sends a request; returns status and JSON body (`Null` if the body is not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request that must succeed; returns its body.
    pub async fn ok(&self, method: Method, path: &str, token: &str, body: Value) -> Value {
        let body = if method == Method::GET { None } else { Some(body) };
        let (status, value) = self.call(method.clone(), path, Some(token), body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {value}");
        value
    }

    pub async fn register(&self, name: &str) -> User {
        let (status, body) = self
            .call(
                Method::POST,
                "/_matrix/client/v3/register",
                None,
                Some(json!({"username": name, "password": "password", "auth": {"type": "m.login.dummy"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "register {name}: {body}");
        User {
            user_id: body["user_id"].as_str().expect("user_id").to_owned(),
            token: body["access_token"].as_str().expect("token").to_owned(),
            device_id: body["device_id"].as_str().expect("device").to_owned(),
        }
    }

    pub async fn create_room(&self, user: &User, body: Value) -> String {
        let v = self
            .ok(Method::POST, "/_matrix/client/v3/createRoom", &user.token, body)
            .await;
        v["room_id"].as_str().expect("room_id").to_owned()
    }

    pub async fn send_text(&self, user: &User, room: &str, txn: &str, text: &str) -> (StatusCode, Value) {
        self.call(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
            Some(&user.token),
            Some(json!({"msgtype": "m.text", "body": text})),
        )
        .await
    }

    /// Content of one state event, which must exist.
    pub async fn state(&self, user: &User, room: &str, kind: &str, state_key: &str) -> Value {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{kind}/{}",
            enc(room),
            enc(state_key)
        );
        self.ok(Method::GET, &path, &user.token, Value::Null).await
    }

    pub async fn sync(&self, user: &User, query: &str) -> Value {
        self.ok(
            Method::GET,
            &format!("/_matrix/client/v3/sync?{query}"),
            &user.token,
            Value::Null,
        )
        .await
    }
}

impl Server {
    /// Starts Synapse, the reference homeserver, from `target/synapse-venv` (made by
    /// `tests/interop/setup.sh synapse`) on a loopback port: SQLite, `server_name: localhost`,
    /// registration open, rate limits as relaxed as Switchboard's in the tests, and these
    /// application-service registration files. `None` if Synapse is not installed.
    pub async fn start_synapse(app_service_files: &[PathBuf]) -> Option<Self> {
        Self::start_synapse_edited(app_service_files, |text| text).await
    }

    /// [`Self::start_synapse`] with the config text passed through `edit` first.
    pub async fn start_synapse_edited(
        app_service_files: &[PathBuf],
        edit: impl FnOnce(String) -> String,
    ) -> Option<Self> {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/synapse-venv/bin/python");
        if !python.exists() {
            return None;
        }
        tls_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
        let files: Vec<String> = app_service_files
            .iter()
            .map(|p| format!("'{}'", p.display()))
            .collect();
        let config = format!(
            "server_name: localhost
pid_file: {d}/homeserver.pid
listeners:
  - {{port: {port}, bind_addresses: ['127.0.0.1'], type: http, tls: false,
     resources: [{{names: [client], compress: false}}]}}
database: {{name: sqlite3, args: {{database: {d}/homeserver.db}}}}
media_store_path: {d}/media
signing_key_path: {d}/signing.key
registration_shared_secret: test
enable_registration: true
enable_registration_without_verification: true
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
macaroon_secret_key: bench-macaroon
form_secret: bench-form
app_service_config_files: [{files}]
rc_message: {{per_second: 100000, burst_count: 100000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login: {{address: {{per_second: 1000, burst_count: 1000}}, account: {{per_second: 1000, burst_count: 1000}}}}
rc_joins: {{local: {{per_second: 1000, burst_count: 1000}}, remote: {{per_second: 1000, burst_count: 1000}}}}
",
            files = files.join(", ")
        );
        let config_path = dir.path().join("homeserver.yaml");
        std::fs::write(&config_path, edit(config)).expect("synapse config");
        let keys = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--generate-keys", "-c"])
            .arg(&config_path)
            .output()
            .expect("run synapse");
        assert!(keys.status.success(), "synapse --generate-keys: {keys:?}");
        let mut server = Self {
            child: None,
            database: None,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        server.spawn_synapse().await;
        Some(server)
    }

    /// Starts (or starts again) the Synapse of this `Server` and waits until it answers.
    pub async fn spawn_synapse(&mut self) {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/synapse-venv/bin/python");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("synapse.log"))
            .expect("log");
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(self.config_path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start synapse");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .http
                .get(format!("{}/_matrix/client/versions", self.base))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "synapse did not start; log in {}",
            self.dir.path().join("synapse.log").display()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Percent-encodes a path segment (room IDs and aliases carry `!`, `#` and `:`).
pub fn enc(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A user-interactive auth challenge asking for the password (`401` with a session and an
/// `m.login.password` flow), not some other `401` such as an unknown token.
pub fn is_password_challenge(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::UNAUTHORIZED
        && body["session"].is_string()
        && body["flows"]
            .as_array()
            .is_some_and(|flows| flows.iter().any(|f| f["stages"][0] == "m.login.password"))
}

pub fn errcode(body: &Value) -> &str {
    body["errcode"].as_str().unwrap_or("<none>")
}

/// CPU time (user + system) a process (`self` or a PID) has used so far, in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel reports clock ticks; USER_HZ is 100 on every Linux platform Rust targets.
    Some(ticks / 100.0)
}

/// reqwest is built without a default TLS crypto provider (see the workspace manifest): tests
/// install the server's before building any client.
pub fn tls_init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
