//! Registration files: parsing and validation with errors naming the file and the field (what a
//! homeserver needs), and generating new ones (what a service's `generate-registration` needs).
//!
//! ```
//! use switchboard_appservice::registration::{Generate, generate, parse};
//!
//! let registration = generate(&Generate {
//!     id: "logger",
//!     url: Some("http://127.0.0.1:9000"),
//!     sender_localpart: "logger",
//!     server_name: "example.org",
//!     user_prefix: None,
//!     alias_prefix: Some("logged_"),
//!     protocols: &[],
//!     encryption: false,
//! });
//! assert_eq!(registration.as_token.len(), 64);
//! let again = parse(&registration.to_yaml(), "logger.yaml").expect("valid");
//! assert_eq!(again.namespaces.aliases[0].regex, r"#logged_.*:example\.org$");
//! ```

use std::path::{Path, PathBuf};

use rand::{Rng, distributions::Alphanumeric};
use regex::RegexSet;
use serde::{Deserialize, Serialize};

/// A registration file that cannot be used. Startup stops on these; hot reload keeps the old set.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("cannot read application service registration {file}: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("application service registration {file} is not valid YAML: {message}")]
    Yaml { file: String, message: String },
    #[error("application service registration {file}: `{field}`: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
    #[error("application service registrations {first} and {second} both use {what}")]
    Duplicate {
        first: String,
        second: String,
        what: String,
    },
}

/// The registration as written (Synapse's format, plus the unstable keys real bridges write).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Registration {
    pub id: String,
    /// `None` is an explicit `url: null`: the service gets no traffic.
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    pub namespaces: NamespacesConfig,
    #[serde(default = "default_true")]
    pub rate_limited: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    #[serde(default)]
    pub receive_ephemeral: bool,
    #[serde(
        default,
        rename = "de.sorunome.msc2409.push_ephemeral",
        skip_serializing_if = "is_false"
    )]
    pub push_ephemeral_unstable: bool,
    #[serde(default, rename = "org.matrix.msc3202", skip_serializing_if = "is_false")]
    pub msc3202: bool,
    #[serde(default, rename = "io.element.msc4190", skip_serializing_if = "is_false")]
    pub msc4190: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

impl Registration {
    /// The registration as a YAML file.
    pub fn to_yaml(&self) -> String {
        // Serialising plain strings, bools and lists cannot fail.
        serde_saphyr::to_string(self).unwrap_or_default()
    }
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct NamespacesConfig {
    #[serde(default)]
    pub users: Vec<NamespaceEntry>,
    #[serde(default)]
    pub aliases: Vec<NamespaceEntry>,
    #[serde(default)]
    pub rooms: Vec<NamespaceEntry>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NamespaceEntry {
    pub exclusive: bool,
    pub regex: String,
}

/// One namespace kind of one service, compiled. Matching follows Synapse (Python `re.match`):
/// anchored at the start only, case-sensitive.
#[derive(Clone, Debug)]
pub struct Namespace {
    all: RegexSet,
    exclusive: RegexSet,
}

impl Namespace {
    pub fn compile(entries: &[NamespaceEntry], file: &str, kind: &str) -> Result<Self, RegistrationError> {
        for (i, entry) in entries.iter().enumerate() {
            regex::Regex::new(&anchor(&entry.regex)).map_err(|e| RegistrationError::Field {
                file: file.to_owned(),
                field: format!("namespaces.{kind}[{i}].regex"),
                message: format!(
                    "`{}` does not compile: {}",
                    entry.regex,
                    first_line(&e.to_string())
                ),
            })?;
        }
        let set = |pick: &dyn Fn(&NamespaceEntry) -> bool| {
            RegexSet::new(entries.iter().filter(|e| pick(e)).map(|e| anchor(&e.regex))).map_err(|e| {
                RegistrationError::Field {
                    file: file.to_owned(),
                    field: format!("namespaces.{kind}"),
                    message: e.to_string(),
                }
            })
        };
        Ok(Self {
            all: set(&|_| true)?,
            exclusive: set(&|e| e.exclusive)?,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        self.all.is_match(value)
    }

    pub fn matches_exclusive(&self, value: &str) -> bool {
        self.exclusive.is_match(value)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

/// Python's `re.match` anchors at the start only; so do we, so Synapse registrations claim the
/// same IDs here.
pub fn anchor(regex: &str) -> String {
    format!("^(?:{regex})")
}

fn first_line(text: &str) -> String {
    // regex's errors are multi-line pictures; the last line says what is wrong.
    text.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .trim()
        .to_owned()
}

/// Reads and checks one registration file.
pub fn load(path: &Path) -> Result<(Registration, PathBuf), RegistrationError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file).map(|r| (r, path.to_owned()))
}

pub fn parse(text: &str, file: &str) -> Result<Registration, RegistrationError> {
    let field = |field: &str, message: String| RegistrationError::Field {
        file: file.to_owned(),
        field: field.to_owned(),
        message,
    };
    let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| RegistrationError::Yaml {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let Some(map) = value.as_object() else {
        return Err(RegistrationError::Yaml {
            file: file.to_owned(),
            message: "not a mapping of keys".to_owned(),
        });
    };
    // Synapse's rule: `url` must be present; only an explicit null turns traffic off, so a typo
    // cannot silently disable a bridge.
    match map.get("url") {
        None => {
            return Err(field(
                "url",
                "is required (use `url: null` for a service that gets no traffic)".to_owned(),
            ));
        }
        Some(serde_json::Value::Null | serde_json::Value::String(_)) => {}
        Some(_) => return Err(field("url", "must be a string or null".to_owned())),
    }
    let mut registration: Registration = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        field(
            if path == "." { "(top level)" } else { &path },
            e.inner().to_string(),
        )
    })?;
    if registration.id.is_empty() || registration.id.contains('|') {
        return Err(field(
            "id",
            "must be non-empty and must not contain `|`".to_owned(),
        ));
    }
    let localpart = &registration.sender_localpart;
    if localpart.is_empty()
        || !localpart
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._=-/+".contains(c))
    {
        return Err(field(
            "sender_localpart",
            format!("`{localpart}` is not a valid user localpart"),
        ));
    }
    if registration.as_token.is_empty() {
        return Err(field("as_token", "must not be empty".to_owned()));
    }
    if registration.hs_token.is_empty() {
        return Err(field("hs_token", "must not be empty".to_owned()));
    }
    let namespaces = &registration.namespaces;
    for (kind, entries) in [
        ("users", &namespaces.users),
        ("aliases", &namespaces.aliases),
        ("rooms", &namespaces.rooms),
    ] {
        Namespace::compile(entries, file, kind)?;
    }
    if let Some(url) = &registration.url {
        let url = url.trim_end_matches('/');
        if url.is_empty() || url == "null" {
            registration.url = None;
        } else if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(field("url", format!("`{url}` is not an http:// or https:// URL")));
        } else {
            registration.url = Some(url.to_owned());
        }
    }
    Ok(registration)
}

/// What a new registration claims.
#[derive(Clone, Copy, Debug)]
pub struct Generate<'a> {
    pub id: &'a str,
    /// Where the homeserver reaches the service; `None` for a service that gets no traffic.
    pub url: Option<&'a str>,
    pub sender_localpart: &'a str,
    pub server_name: &'a str,
    /// Claims `@<prefix>…:<server_name>` exclusively.
    pub user_prefix: Option<&'a str>,
    /// Claims `#<prefix>…:<server_name>` exclusively.
    pub alias_prefix: Option<&'a str>,
    pub protocols: &'a [String],
    /// The keys an encrypting service needs: `receive_ephemeral` (and MSC2409's unstable
    /// name) for to-device messages, `org.matrix.msc3202` for key counts and device lists,
    /// `io.element.msc4190` for making devices without logins.
    pub encryption: bool,
}

/// A new registration with fresh random 64-character tokens.
pub fn generate(options: &Generate<'_>) -> Registration {
    let token = || {
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(64)
            .map(char::from)
            .collect::<String>()
    };
    let server = regex::escape(options.server_name);
    let claim = |sigil: char, prefix: Option<&str>| -> Vec<NamespaceEntry> {
        prefix
            .map(|p| NamespaceEntry {
                exclusive: true,
                // `$`: matching is anchored at the start only (Synapse's rule), so without it the
                // namespace would also claim `…:example.org.evil.com`.
                regex: format!("{sigil}{}.*:{server}$", regex::escape(p)),
            })
            .into_iter()
            .collect()
    };
    Registration {
        id: options.id.to_owned(),
        url: options.url.map(str::to_owned),
        as_token: token(),
        hs_token: token(),
        sender_localpart: options.sender_localpart.to_owned(),
        namespaces: NamespacesConfig {
            users: claim('@', options.user_prefix),
            aliases: claim('#', options.alias_prefix),
            rooms: Vec::new(),
        },
        rate_limited: false,
        protocols: options.protocols.to_vec(),
        receive_ephemeral: options.encryption,
        push_ephemeral_unstable: options.encryption,
        msc3202: options.encryption,
        msc4190: options.encryption,
    }
}

/// Warnings (not failures) for registrations that load but are probably wrong.
pub fn warnings(registration: &Registration) -> Vec<String> {
    let mut warnings = Vec::new();
    if registration.hs_token == registration.as_token {
        warnings.push("hs_token equals as_token: one leaked secret opens both directions".to_owned());
    }
    for entry in &registration.namespaces.users {
        if !entry.regex.contains(':') {
            warnings.push(format!(
                "users regex `{}` has no server part and also matches remote users",
                entry.regex
            ));
        }
    }
    for entry in &registration.namespaces.rooms {
        if entry.regex.contains(':') {
            warnings.push(format!(
                "rooms regex `{}` contains `:`; room version 12 IDs have no server part and will not match",
                entry.regex
            ));
        }
        if entry.exclusive {
            warnings.push(format!(
                "rooms regex `{}` is exclusive, which the spec leaves undefined",
                entry.regex
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id: irc
url: "http://127.0.0.1:9999/"
as_token: aaa
hs_token: bbb
sender_localpart: _irc_bot
protocols: [irc]
de.sorunome.msc2409.push_ephemeral: true
heisenbridge: {displayname: x}
namespaces:
  users: [{exclusive: true, regex: '@_irc_.*:example\.org'}]
  aliases: [{exclusive: false, regex: '#_irc_.*'}]
"#;

    #[test]
    fn parses_real_world_registration() {
        let r = parse(GOOD, "irc.yaml").expect("valid");
        assert_eq!(
            r.url.as_deref(),
            Some("http://127.0.0.1:9999"),
            "trailing slash stripped"
        );
        assert!(r.rate_limited, "Synapse's default");
        assert!(r.push_ephemeral_unstable);
        let users = Namespace::compile(&r.namespaces.users, "irc.yaml", "users").expect("compiles");
        assert!(users.matches("@_irc_alice:example.org"));
        assert!(
            users.matches("@_irc_alice:example.org.evil"),
            "anchored at the start only, like re.match"
        );
        assert!(!users.matches("x@_irc_alice:example.org"));
        assert!(!users.matches("@_IRC_alice:example.org"), "case-sensitive");
        assert!(users.matches_exclusive("@_irc_alice:example.org"));
    }

    #[test]
    fn url_must_be_present_but_may_be_null() {
        let missing = GOOD.replace("url: \"http://127.0.0.1:9999/\"\n", "");
        let err = parse(&missing, "irc.yaml").expect_err("missing url").to_string();
        assert!(err.contains("irc.yaml") && err.contains("`url`"), "{err}");
        let null = GOOD.replace("url: \"http://127.0.0.1:9999/\"", "url: null");
        assert_eq!(parse(&null, "irc.yaml").expect("null url").url, None);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = parse(&GOOD.replace("as_token: aaa", "as_token: [1]"), "f.yaml")
            .expect_err("bad type")
            .to_string();
        assert!(err.contains("as_token"), "{err}");
        let look_around = GOOD.replace(r"'@_irc_.*:example\.org'", "'@(?=x).*'");
        // Parsing compiles every namespace: a regex Rust cannot run stops the file from loading.
        let err = parse(&look_around, "f.yaml")
            .expect_err("look-around")
            .to_string();
        assert!(
            err.contains("f.yaml") && err.contains("namespaces.users[0].regex"),
            "{err}"
        );
        let err = parse(&GOOD.replace("_irc_bot", "bad bot"), "f.yaml")
            .expect_err("a space in the sender")
            .to_string();
        assert!(
            err.contains("f.yaml") && err.contains("sender_localpart"),
            "{err}"
        );
    }

    #[test]
    fn warns_about_doubtful_namespaces() {
        let r = parse(&GOOD.replace("hs_token: bbb", "hs_token: aaa"), "f.yaml").expect("parses");
        let w = warnings(&r);
        assert!(w.iter().any(|w| w.contains("hs_token")));
    }

    #[test]
    fn generated_registrations_are_valid_and_claim_the_prefixes() {
        let protocols = vec!["irc".to_owned()];
        let generated = generate(&Generate {
            id: "irc",
            url: Some("http://127.0.0.1:9999"),
            sender_localpart: "irc_bot",
            server_name: "example.org",
            user_prefix: Some("irc_"),
            alias_prefix: Some("irc_"),
            protocols: &protocols,
            encryption: true,
        });
        assert_eq!(generated.as_token.len(), 64);
        assert_ne!(generated.as_token, generated.hs_token, "two secrets");
        let yaml = generated.to_yaml();
        let parsed = parse(&yaml, "irc.yaml").expect("the generated file loads");
        assert_eq!(parsed.as_token, generated.as_token);
        assert_eq!(parsed.protocols, protocols);
        assert!(
            parsed.receive_ephemeral && parsed.push_ephemeral_unstable && parsed.msc3202 && parsed.msc4190,
            "an encrypting service's keys"
        );
        assert!(warnings(&parsed).is_empty(), "{:?}", warnings(&parsed));
        let users = Namespace::compile(&parsed.namespaces.users, "irc.yaml", "users").expect("compiles");
        assert!(users.matches_exclusive("@irc_alice:example.org"));
        assert!(!users.matches("@irc_alice:example.com"), "dots are escaped");
        assert!(
            !users.matches("@irc_alice:example.org.evil"),
            "anchored at the end too"
        );
        let aliases =
            Namespace::compile(&parsed.namespaces.aliases, "irc.yaml", "aliases").expect("compiles");
        assert!(aliases.matches("#irc_libera_#rust:example.org"));

        let silent = generate(&Generate {
            url: None,
            ..Generate {
                id: "x",
                url: None,
                sender_localpart: "x",
                server_name: "example.org",
                user_prefix: None,
                alias_prefix: None,
                protocols: &[],
                encryption: false,
            }
        });
        let parsed = parse(&silent.to_yaml(), "x.yaml").expect("loads");
        assert_eq!(parsed.url, None, "written as url: null");
    }
}
