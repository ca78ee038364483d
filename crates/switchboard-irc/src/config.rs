//! The bridge's YAML config.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub homeserver: Homeserver,
    /// Where the homeserver reaches the bridge (the registration's `url`).
    pub listen: SocketAddr,
    /// The registration file (`switchboard-irc generate-registration` writes one).
    pub registration: PathBuf,
    /// Where the bridge keeps its state.
    pub data_dir: PathBuf,
    pub networks: Vec<Network>,
    /// Bridge encrypted rooms and private chats: the bot and each IRC person's user get a
    /// device, keys kept under `data_dir/crypto`. The registration needs the keys
    /// `generate-registration --encryption` writes.
    #[serde(default)]
    pub encryption: bool,
    /// With `encryption`: the channel rooms the bridge creates are encrypted too (private chats
    /// it opens always are).
    #[serde(default)]
    pub encrypt_channel_rooms: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Homeserver {
    /// The client API base URL.
    pub url: String,
    /// The server name (the part after `:` in user IDs).
    pub domain: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Network {
    /// Short name in IDs: `#irc_<id>_#channel`, `@irc_<id>_nick`.
    pub id: String,
    /// Shown in room directories and third-party lookups.
    #[serde(default)]
    pub name: Option<String>,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: trust only the certificates in this PEM file (a private network's CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The server password (`PASS`), if the network wants one.
    #[serde(default)]
    pub password: Option<String>,
    /// The bridge bot's nick on this network.
    #[serde(default = "default_bot_nick")]
    pub bot_nick: String,
    /// The nick a Matrix user gets: `$DISPLAY` (display name) and `$LOCALPART` are replaced, then
    /// what a nick cannot hold is dropped. A taken nick gets `_` appended.
    #[serde(default = "default_nick_template")]
    pub nick_template: String,
    /// IRC connections for Matrix users at most (networks limit connections per address);
    /// beyond, the bot relays for the others as `<user> text`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A Matrix user's IRC connection quits after this long without them saying anything on
    /// this network (0: never), as matrix-appservice-irc's `idleTimeout`; their next message
    /// connects again with the same nick.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Lines sent at once before flood control paces them, and then one per interval.
    #[serde(default = "default_flood_burst")]
    pub flood_burst: u32,
    #[serde(default = "default_flood_interval_ms")]
    pub flood_interval_ms: u64,
}

fn default_port() -> u16 {
    6667
}

fn default_bot_nick() -> String {
    "MatrixBridge".to_owned()
}

fn default_nick_template() -> String {
    "$DISPLAY".to_owned()
}

fn default_max_connections() -> usize {
    100
}

fn default_idle_timeout_secs() -> u64 {
    2 * 24 * 3600
}

fn default_flood_burst() -> u32 {
    5
}

fn default_flood_interval_ms() -> u64 {
    700
}

/// A config that cannot be used, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let error = |message: String| ConfigError {
            file: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let value: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| error(format!("not valid YAML: {e}")))?;
        let mut config: Config = serde_path_to_error::deserialize(value)
            .map_err(|e| error(format!("`{}`: {}", e.path(), e.inner())))?;
        if config.networks.is_empty() {
            return Err(error("`networks`: at least one network is needed".to_owned()));
        }
        for (i, network) in config.networks.iter().enumerate() {
            if network.id.is_empty()
                || !network
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(error(format!(
                    "`networks[{i}].id`: `{}` must be lower-case letters, digits or `-`",
                    network.id
                )));
            }
        }
        // Paths are read relative to the config file.
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        config.registration = base.join(&config.registration);
        config.data_dir = base.join(&config.data_dir);
        for network in &mut config.networks {
            network.tls_ca_file = network.tls_ca_file.as_ref().map(|p| base.join(p));
        }
        Ok(config)
    }

    pub fn network(&self, id: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_with_defaults_and_names_bad_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.yaml");
        std::fs::write(
            &path,
            "homeserver: {url: 'http://127.0.0.1:8008', domain: localhost}\n\
             listen: 127.0.0.1:9010\nregistration: irc.yaml\ndata_dir: state\n\
             networks:\n  - {id: libera, host: irc.libera.chat}\n",
        )
        .expect("write");
        let config = Config::load(&path).expect("loads");
        let libera = config.network("libera").expect("network");
        assert_eq!((libera.port, libera.tls, libera.flood_burst), (6667, false, 5));
        assert_eq!(
            (libera.nick_template.as_str(), libera.max_connections),
            ("$DISPLAY", 100)
        );
        assert_eq!(config.registration, dir.path().join("irc.yaml"));

        std::fs::write(
            &path,
            "homeserver: {url: x, domain: example.org}\nlisten: nowhere\nregistration: r\ndata_dir: d\nnetworks: []\n",
        )
        .expect("write");
        let err = Config::load(&path).expect_err("bad listen").to_string();
        assert!(err.contains("listen") && err.contains("bridge.yaml"), "{err}");
    }
}
