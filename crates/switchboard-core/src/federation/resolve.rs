//! Server discovery: where requests for a server name go, as the spec's "Resolving server names"
//! orders it — IP literal, explicit port, `.well-known/matrix/server` (cached, errors backed
//! off), SRV `_matrix-fed._tcp` then the deprecated `_matrix._tcp`, then port 8448.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::TokioResolver;

/// Where to send the requests for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The URL's host: the name the TLS certificate must carry (or an IP literal).
    pub host: String,
    pub port: u16,
    /// The `Host` header.
    pub host_header: String,
    /// An SRV target to connect to instead of resolving `host`.
    pub connect_to: Option<String>,
}

impl Destination {
    pub fn base_url(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("https://[{ip}]:{}", self.port),
            _ => format!("https://{}:{}", self.host, self.port),
        }
    }

    fn direct(host: &str, port: u16, host_header: String) -> Self {
        Self {
            host: host.to_owned(),
            port,
            host_header,
            connect_to: None,
        }
    }
}

/// What discovery asks the network; a trait so the order of the steps is tested without one.
pub trait Lookups: Send + Sync {
    /// The `m.server` of `https://<hostname>/.well-known/matrix/server`, if it delegates.
    fn well_known(&self, hostname: &str) -> impl Future<Output = Option<String>> + Send;
    /// The best SRV record's target and port.
    fn srv(&self, name: &str) -> impl Future<Output = Option<(String, u16)>> + Send;
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 literal.
pub fn split_host_port(name: &str) -> Option<(&str, Option<u16>)> {
    let (host, rest) = if let Some(inner) = name.strip_prefix('[') {
        let end = inner.find(']')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        match name.rsplit_once(':') {
            Some((host, _)) => (host, &name[host.len()..]),
            None => (name, ""),
        }
    };
    let port = match rest.strip_prefix(':') {
        Some(port) => Some(port.parse().ok()?),
        None if rest.is_empty() => None,
        None => return None,
    };
    (!host.is_empty()).then_some((host, port))
}

const DEFAULT_PORT: u16 = 8448;

/// Resolves a server name (validated as a Matrix server name) to where its requests go.
pub async fn resolve(server_name: &str, lookups: &impl Lookups) -> Option<Destination> {
    let (host, port) = split_host_port(server_name)?;
    // 1. An IP literal, 2. an explicit port: straight there.
    if host.parse::<IpAddr>().is_ok() || port.is_some() {
        return Some(Destination::direct(
            host,
            port.unwrap_or(DEFAULT_PORT),
            server_name.to_owned(),
        ));
    }
    // 3. Delegation through .well-known.
    if let Some(delegated) = lookups.well_known(host).await
        && let Some((d_host, d_port)) = split_host_port(&delegated)
    {
        if d_host.parse::<IpAddr>().is_ok() || d_port.is_some() {
            return Some(Destination::direct(
                d_host,
                d_port.unwrap_or(DEFAULT_PORT),
                delegated.clone(),
            ));
        }
        if let Some(found) = srv(d_host, lookups).await {
            return Some(found);
        }
        return Some(Destination::direct(d_host, DEFAULT_PORT, d_host.to_owned()));
    }
    // 4, 5. SRV records of the server name itself; 6. port 8448.
    if let Some(found) = srv(host, lookups).await {
        return Some(found);
    }
    Some(Destination::direct(host, DEFAULT_PORT, host.to_owned()))
}

async fn srv(hostname: &str, lookups: &impl Lookups) -> Option<Destination> {
    for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
        if let Some((target, port)) = lookups.srv(&format!("{service}.{hostname}")).await {
            return Some(Destination {
                host: hostname.to_owned(),
                port,
                host_header: hostname.to_owned(),
                connect_to: Some(target),
            });
        }
    }
    None
}

/// A cached `.well-known` answer.
#[derive(Clone)]
struct WellKnown {
    delegated: Option<String>,
    until: Instant,
    /// Failures in a row, for the back-off of unreachable servers.
    failures: u32,
}

/// The spec's caching rules, as Synapse applies them.
const WELL_KNOWN_DEFAULT: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_MIN: Duration = Duration::from_secs(5 * 60);
const WELL_KNOWN_MAX: Duration = Duration::from_secs(48 * 3600);
/// A server that answers without a valid delegation: asked again after an hour.
const WELL_KNOWN_INVALID: Duration = Duration::from_secs(3600);
/// A server that could not be reached: 2 minutes, doubling to an hour.
const WELL_KNOWN_DOWN: Duration = Duration::from_secs(120);
const WELL_KNOWN_MAX_BODY: usize = 50 * 1024;

/// The network side of discovery: `.well-known` over HTTPS (with the federation client's TLS
/// settings and address filter) and SRV through the system's resolver.
pub struct NetLookups {
    http: reqwest::Client,
    dns: Arc<TokioResolver>,
    cache: Mutex<HashMap<String, WellKnown>>,
}

impl NetLookups {
    pub fn new(http: reqwest::Client, dns: Arc<TokioResolver>) -> Self {
        Self {
            http,
            dns,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn fetch_well_known(&self, hostname: &str) -> Result<(Option<String>, Duration), ()> {
        let url = format!("https://{hostname}/.well-known/matrix/server");
        let response = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| tracing::debug!(%hostname, error = %e, "no .well-known"))?;
        if response.status().is_server_error() {
            return Err(());
        }
        if !response.status().is_success() {
            return Ok((None, WELL_KNOWN_INVALID));
        }
        let lifetime = cache_lifetime(response.headers()).unwrap_or(WELL_KNOWN_DEFAULT);
        let (body, complete) = crate::util::read_capped(response, WELL_KNOWN_MAX_BODY).await;
        if !complete {
            return Ok((None, WELL_KNOWN_INVALID));
        }
        let delegated = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("m.server")?.as_str().map(str::to_owned))
            .filter(|d| ruma::ServerName::parse(d).is_ok());
        Ok(match delegated {
            Some(d) => (Some(d), lifetime.clamp(WELL_KNOWN_MIN, WELL_KNOWN_MAX)),
            None => (None, WELL_KNOWN_INVALID),
        })
    }
}

/// `Cache-Control: max-age` (or `no-store`/`no-cache`: the minimum).
fn cache_lifetime(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|directive| {
        if directive == "no-store" || directive == "no-cache" {
            return Some(Duration::ZERO);
        }
        directive
            .strip_prefix("max-age=")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
    })
}

impl Lookups for NetLookups {
    async fn well_known(&self, hostname: &str) -> Option<String> {
        let now = Instant::now();
        let cached = self.cache.lock().ok()?.get(hostname).cloned();
        if let Some(entry) = &cached
            && entry.until > now
        {
            return entry.delegated.clone();
        }
        let entry = match self.fetch_well_known(hostname).await {
            Ok((delegated, lifetime)) => WellKnown {
                delegated,
                until: now + lifetime,
                failures: 0,
            },
            Err(()) => {
                let failures = cached.as_ref().map_or(0, |c| c.failures).saturating_add(1);
                let backoff = WELL_KNOWN_DOWN
                    .saturating_mul(2u32.saturating_pow(failures - 1))
                    .min(WELL_KNOWN_INVALID);
                WellKnown {
                    // An unreachable server keeps the delegation it had.
                    delegated: cached.and_then(|c| c.delegated),
                    until: now + backoff,
                    failures,
                }
            }
        };
        let delegated = entry.delegated.clone();
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(hostname.to_owned(), entry);
        }
        delegated
    }

    async fn srv(&self, name: &str) -> Option<(String, u16)> {
        let lookup = self.dns.srv_lookup(name).await.ok()?;
        // Lowest priority first, then highest weight (no weighted randomness: one target suffices).
        let best = lookup
            .iter()
            .min_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())))?;
        let target = best.target().to_utf8();
        let target = target.trim_end_matches('.');
        (!target.is_empty()).then(|| (target.to_owned(), best.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        well_known: HashMap<&'static str, &'static str>,
        srv: HashMap<&'static str, (&'static str, u16)>,
    }

    impl Lookups for Fake {
        async fn well_known(&self, hostname: &str) -> Option<String> {
            self.well_known.get(hostname).map(|s| (*s).to_owned())
        }
        async fn srv(&self, name: &str) -> Option<(String, u16)> {
            self.srv.get(name).map(|(t, p)| ((*t).to_owned(), *p))
        }
    }

    fn dest(host: &str, port: u16, header: &str, connect_to: Option<&str>) -> Destination {
        Destination {
            host: host.to_owned(),
            port,
            host_header: header.to_owned(),
            connect_to: connect_to.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn discovery_follows_the_specs_order() {
        let mut fake = Fake::default();
        // Delegation and SRV records everywhere, to show which step wins.
        fake.well_known.insert("example.org", "matrix.example.org");
        fake.well_known.insert("ported.org", "other.example.org:1234");
        fake.well_known.insert("ip.org", "10.0.0.1");
        fake.srv.insert(
            "_matrix-fed._tcp.matrix.example.org",
            ("backend.example.org", 9000),
        );
        fake.srv
            .insert("_matrix._tcp.legacy.org", ("old.legacy.org", 7000));
        fake.srv
            .insert("_matrix-fed._tcp.legacy.org", ("new.legacy.org", 7001));
        fake.srv
            .insert("_matrix._tcp.onlylegacy.org", ("old.onlylegacy.org", 7002));
        fake.well_known.insert("localhost", "elsewhere.org");

        // IP literals and explicit ports skip everything else.
        assert_eq!(
            resolve("1.2.3.4", &fake).await,
            Some(dest("1.2.3.4", 8448, "1.2.3.4", None))
        );
        assert_eq!(
            resolve("[::1]:8080", &fake).await,
            Some(dest("::1", 8080, "[::1]:8080", None))
        );
        assert_eq!(
            resolve("localhost:8448", &fake).await,
            Some(dest("localhost", 8448, "localhost:8448", None))
        );
        // Delegation, then the delegated name's SRV record; the certificate is the delegated name's.
        assert_eq!(
            resolve("example.org", &fake).await,
            Some(dest(
                "matrix.example.org",
                9000,
                "matrix.example.org",
                Some("backend.example.org")
            ))
        );
        assert_eq!(
            resolve("ported.org", &fake).await,
            Some(dest("other.example.org", 1234, "other.example.org:1234", None))
        );
        assert_eq!(
            resolve("ip.org", &fake).await,
            Some(dest("10.0.0.1", 8448, "10.0.0.1", None))
        );
        // No delegation: _matrix-fed before the deprecated _matrix, then 8448.
        assert_eq!(
            resolve("legacy.org", &fake).await,
            Some(dest("legacy.org", 7001, "legacy.org", Some("new.legacy.org")))
        );
        assert_eq!(
            resolve("onlylegacy.org", &fake).await,
            Some(dest(
                "onlylegacy.org",
                7002,
                "onlylegacy.org",
                Some("old.onlylegacy.org")
            ))
        );
        assert_eq!(
            resolve("plain.org", &fake).await,
            Some(dest("plain.org", 8448, "plain.org", None))
        );
        assert_eq!(resolve("bad:port", &fake).await, None);
        assert_eq!(
            dest("::1", 8448, "", None).base_url(),
            "https://[::1]:8448",
            "IPv6 literals are bracketed in URLs"
        );
    }

    #[test]
    fn cache_control_sets_the_lifetime() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(cache_lifetime(&headers), None);
        headers.insert(
            reqwest::header::CACHE_CONTROL,
            "public, max-age=600".parse().unwrap(),
        );
        assert_eq!(cache_lifetime(&headers), Some(Duration::from_secs(600)));
        headers.insert(reqwest::header::CACHE_CONTROL, "no-store".parse().unwrap());
        assert_eq!(cache_lifetime(&headers), Some(Duration::ZERO));
    }
}
