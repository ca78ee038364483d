//! The `generate-registration` subcommand every service offers, as mautrix and
//! matrix-appservice-bridge do: flatten [`GenerateRegistration`] into your clap command.

use std::path::PathBuf;

use crate::{
    Error,
    registration::{Generate, Registration, generate},
};

/// Writes a new registration file (fresh random tokens) for the homeserver admin to list in
/// `app_service_config_files`.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateRegistration {
    /// Where the homeserver reaches this service, e.g. `http://127.0.0.1:9000`.
    #[arg(long)]
    pub url: String,
    /// The homeserver's server name (the part after `:` in user IDs).
    #[arg(long)]
    pub server_name: String,
    /// The registration's `id`.
    #[arg(long)]
    pub id: Option<String>,
    /// The bot's localpart (`sender_localpart`).
    #[arg(long)]
    pub sender_localpart: Option<String>,
    /// Claim `@<prefix>…` users exclusively.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Claim `#<prefix>…` aliases exclusively.
    #[arg(long)]
    pub alias_prefix: Option<String>,
    /// Third-party protocols the service bridges.
    #[arg(long = "protocol")]
    pub protocols: Vec<String>,
    /// Ask for what an encrypting service needs (to-device messages, key counts and device
    /// lists in transactions; devices without logins).
    #[arg(long)]
    pub encryption: bool,
    /// The file to write (refuses to overwrite one).
    #[arg(long, short)]
    pub output: PathBuf,
}

impl GenerateRegistration {
    /// Generates with the service's defaults for what was not given, writes the file and returns
    /// the registration.
    pub fn run(
        &self,
        default_id: &str,
        default_user_prefix: Option<&str>,
        default_alias_prefix: Option<&str>,
    ) -> Result<Registration, Error> {
        let id = self.id.as_deref().unwrap_or(default_id);
        let registration = generate(&Generate {
            id,
            url: Some(&self.url),
            sender_localpart: self.sender_localpart.as_deref().unwrap_or(id),
            server_name: &self.server_name,
            user_prefix: self.user_prefix.as_deref().or(default_user_prefix),
            alias_prefix: self.alias_prefix.as_deref().or(default_alias_prefix),
            protocols: &self.protocols,
            encryption: self.encryption,
        });
        let yaml = registration.to_yaml();
        // What is written must load (a bad --sender-localpart or prefix fails here, not later).
        crate::registration::parse(&yaml, &self.output.display().to_string())?;
        let io = |source| Error::Io {
            context: format!("cannot write {}", self.output.display()),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        // The file holds both secrets: readable by its owner only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.output).map_err(io)?;
        std::io::Write::write_all(&mut file, yaml.as_bytes()).map_err(io)?;
        Ok(registration)
    }
}
