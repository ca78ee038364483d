//! Outbound federation requests: discovery, TLS as configured, the IP-range filter on every
//! connection, and an `X-Matrix` signature on every request.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_resolver::TokioResolver;
use ipnet::IpNet;
use ruma::{
    ServerName,
    api::{
        OutgoingRequest, OutgoingRequestExt,
        auth_scheme::{AuthScheme, NoAuthentication},
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
        path_builder::SinglePath,
    },
    signatures::Ed25519KeyPair,
};

use super::{
    FederationError,
    resolve::{self, Destination, NetLookups},
};
use crate::config::{Config, parse_ip_range};

/// Synapse's default `ip_range_blacklist`: loopback, private, link-local, CGNAT, documentation
/// and multicast ranges.
const DEFAULT_BLACKLIST: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

fn parse_ranges(list: &[String]) -> Vec<IpNet> {
    list.iter().filter_map(|r| parse_ip_range(r)).collect()
}

/// Which addresses outbound requests may reach: the whitelist wins, then the blacklist refuses.
#[derive(Debug, Default)]
pub struct IpFilter {
    blacklist: Vec<IpNet>,
    whitelist: Vec<IpNet>,
}

impl IpFilter {
    /// The filter of federation requests, from Synapse's keys and with Synapse's precedence:
    /// `federation_ip_range_blacklist`, when given, replaces both lists.
    pub fn for_federation(config: &Config) -> Self {
        match &config.federation_ip_range_blacklist {
            Some(list) => Self::new(parse_ranges(list), Vec::new()),
            None => Self::for_outbound(config),
        }
    }

    /// The filter of the server's other outbound requests (push gateways): Synapse's
    /// `ip_range_blacklist` (its defaults when absent) and `ip_range_whitelist`.
    pub fn for_outbound(config: &Config) -> Self {
        let blacklist = match &config.ip_range_blacklist {
            Some(list) => parse_ranges(list),
            None => DEFAULT_BLACKLIST
                .iter()
                .filter_map(|r| parse_ip_range(r))
                .collect(),
        };
        Self::new(blacklist, parse_ranges(&config.ip_range_whitelist))
    }

    /// The address a URL names literally (such a host never passes the filtering resolver).
    pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
        // IPv6 hosts come bracketed (`[::1]`).
        url.host_str()?.trim_matches(['[', ']']).parse().ok()
    }

    pub fn new(mut blacklist: Vec<IpNet>, whitelist: Vec<IpNet>) -> Self {
        // The unspecified addresses are never a peer (Synapse adds them to every blacklist).
        blacklist.extend(
            ["0.0.0.0/32", "::/128"]
                .iter()
                .filter_map(|r| r.parse::<IpNet>().ok()),
        );
        Self { blacklist, whitelist }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // `::ffff:127.0.0.1` is 127.0.0.1.
        let ip = ip.to_canonical();
        self.whitelist.iter().any(|n| n.contains(&ip)) || !self.blacklist.iter().any(|n| n.contains(&ip))
    }
}

/// The DNS resolver of the federation HTTP client: follows SRV targets chosen by discovery and
/// drops every address the filter refuses, so no connection — redirects included — reaches one.
struct FilteringResolver {
    dns: Arc<TokioResolver>,
    filter: Arc<IpFilter>,
    /// URL host → SRV target, written by discovery.
    targets: Arc<Mutex<HashMap<String, String>>>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let dns = self.dns.clone();
        let filter = self.filter.clone();
        let host = name.as_str().to_owned();
        let target = self
            .targets
            .lock()
            .ok()
            .and_then(|t| t.get(&host).cloned())
            .unwrap_or_else(|| host.clone());
        Box::pin(async move {
            let found = dns.lookup_ip(target.as_str()).await?;
            let allowed: Vec<SocketAddr> = found
                .iter()
                .filter(|ip| filter.allows(*ip))
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if allowed.is_empty() {
                return Err(format!("every address of {target} is in ip_range_blacklist").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The system's DNS resolver; without a usable /etc/resolv.conf, public resolvers rather than
/// no outbound requests at all.
fn system_resolver() -> TokioResolver {
    match TokioResolver::builder_tokio() {
        Ok(builder) => builder.build(),
        Err(_) => TokioResolver::builder_with_config(
            hickory_resolver::config::ResolverConfig::default(),
            hickory_resolver::name_server::TokioConnectionProvider::default(),
        )
        .build(),
    }
}

/// An HTTP client for requests outside federation (push gateways) whose connections reach
/// only the addresses `filter` allows; it follows no redirects (they would bypass nothing, but a
/// gateway has no reason to send any).
pub fn filtered_http_client(filter: Arc<IpFilter>) -> Result<reqwest::Client, String> {
    let dns = Arc::new(system_resolver());
    reqwest::Client::builder()
        .dns_resolver(Arc::new(FilteringResolver {
            dns,
            filter,
            targets: Arc::new(Mutex::new(HashMap::new())),
        }))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("Switchboard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// The signing step of a request's authentication scheme: `X-Matrix` for most federation
/// endpoints, nothing for the key API.
pub trait Signing: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a>;
}

impl Signing for ServerSignatures {
    fn input<'a>(
        origin: &ServerName,
        destination: &ServerName,
        key: &'a Ed25519KeyPair,
    ) -> XMatrixSigningInput<'a> {
        XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key)
    }
}

impl Signing for NoAuthentication {
    fn input(_: &ServerName, _: &ServerName, _: &Ed25519KeyPair) {}
}

/// Largest response accepted (a `send_join` of a big room is the largest; Synapse's default).
const MAX_RESPONSE: usize = 100 * 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FederationClient {
    origin: ruma::OwnedServerName,
    key: Arc<crate::keys::SigningKey>,
    http: reqwest::Client,
    lookups: NetLookups,
    filter: Arc<IpFilter>,
    targets: Arc<Mutex<HashMap<String, String>>>,
    whitelist: Option<HashSet<String>>,
}

impl FederationClient {
    pub fn new(
        config: &Config,
        origin: ruma::OwnedServerName,
        key: Arc<crate::keys::SigningKey>,
    ) -> Result<Self, String> {
        let filter = Arc::new(IpFilter::for_federation(config));
        let dns = Arc::new(system_resolver());
        let targets = Arc::new(Mutex::new(HashMap::new()));
        let tls = tls_config(config)?;
        let build = |redirects: reqwest::redirect::Policy| {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .dns_resolver(Arc::new(FilteringResolver {
                    dns: dns.clone(),
                    filter: filter.clone(),
                    targets: targets.clone(),
                }))
                .redirect(redirects)
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("Switchboard/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot build the federation HTTP client: {e}"))
        };
        // Federation requests never follow redirects; `.well-known` lookups may (the spec allows 30x).
        let http = build(reqwest::redirect::Policy::none())?;
        let well_known = build(reqwest::redirect::Policy::limited(5))?;
        Ok(Self {
            origin,
            key,
            http,
            lookups: NetLookups::new(well_known, dns),
            filter,
            targets,
            whitelist: config
                .federation_domain_whitelist
                .as_ref()
                .map(|list| list.iter().cloned().collect()),
        })
    }

    /// Whether `federation_domain_whitelist` lets this server be talked to (both ways).
    pub fn allowed(&self, server: &ServerName) -> bool {
        self.whitelist
            .as_ref()
            .is_none_or(|w| w.contains(server.as_str()))
    }

    /// Where requests for `server` go.
    pub async fn destination(&self, server: &ServerName) -> Result<Destination, FederationError> {
        let destination = resolve::resolve(server.as_str(), &self.lookups)
            .await
            .ok_or_else(|| FederationError::Unreachable(format!("{server}: not a resolvable server name")))?;
        if let Ok(ip) = destination.host.parse::<IpAddr>() {
            // Literal addresses never pass the resolver, so the filter is applied here.
            if !self.filter.allows(ip) {
                return Err(FederationError::Blocked(server.to_string()));
            }
        }
        if let (Some(target), Ok(mut targets)) = (&destination.connect_to, self.targets.lock()) {
            targets.insert(destination.host.clone(), target.clone());
        }
        Ok(destination)
    }

    /// Where a request to `destination` goes, if this server may make it.
    async fn target(&self, destination: &ServerName) -> Result<Destination, FederationError> {
        if !self.allowed(destination) {
            return Err(FederationError::NotWhitelisted(destination.to_string()));
        }
        if destination == self.origin {
            return Err(FederationError::Unreachable(
                "a request to this server itself".to_owned(),
            ));
        }
        self.destination(destination).await
    }

    /// A `GET` of `path_and_query` on `destination` — signed (`X-Matrix`), or not for the legacy
    /// media routes — whose successful answer is handed back unread, to be streamed.
    pub async fn get_stream(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        signed: bool,
    ) -> Result<reqwest::Response, FederationError> {
        let target = self.target(destination).await?;
        let mut request = self
            .http
            .get(format!("{}{path_and_query}", target.base_url()))
            .header(reqwest::header::HOST, target.host_header.as_str())
            .timeout(REQUEST_TIMEOUT);
        if signed {
            let unsigned = http::Request::builder()
                .method(http::Method::GET)
                .uri(path_and_query)
                .body(Vec::<u8>::new())
                .map_err(|e| FederationError::Internal(format!("cannot build the request: {e}")))?;
            let x_matrix = ruma::api::federation::authentication::XMatrix::sign_http_request(
                &unsigned,
                XMatrixSigningInput::new(self.origin.clone(), destination.to_owned(), &self.key.key_pair),
            )
            .map_err(|e| FederationError::Internal(format!("cannot sign the request: {e}")))?;
            let header = http::HeaderValue::from(&x_matrix);
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let response = request.send().await.map_err(|e| {
            FederationError::Unreachable(format!("{destination}: {}", crate::util::error_chain(&e)))
        })?;
        let status = response.status();
        if status.is_redirection() && !signed {
            // The legacy media routes may send the client elsewhere (Synapse follows).
            let location = redirect_target(&response)?;
            return self.get_url(&location).await;
        }
        if !status.is_success() {
            let (body, _) = crate::util::read_capped(response, 64 * 1024).await;
            return Err(remote_error(destination, status, &body));
        }
        Ok(response)
    }

    /// A plain `GET` of `url` — where an origin's media answer points (`Location`) —, through
    /// the same IP filter, following at most five redirects; the answer handed back unread.
    pub async fn get_url(&self, url: &str) -> Result<reqwest::Response, FederationError> {
        let mut url = reqwest::Url::parse(url)
            .map_err(|e| FederationError::BadResponse(format!("a redirect to a bad URL {url:?}: {e}")))?;
        for _ in 0..=5 {
            if !matches!(url.scheme(), "https" | "http") {
                return Err(FederationError::BadResponse(format!("a redirect to {url}")));
            }
            // Names pass the filtering resolver; literal addresses are checked here.
            let literal = url
                .host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                .and_then(|h| h.parse::<IpAddr>().ok());
            if literal.is_some_and(|ip| !self.filter.allows(ip)) {
                return Err(FederationError::Blocked(url.to_string()));
            }
            let response = self
                .http
                .get(url.clone())
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(|e| {
                    FederationError::Unreachable(format!("{url}: {}", crate::util::error_chain(&e)))
                })?;
            let status = response.status();
            if status.is_redirection() {
                let next = redirect_target(&response)?;
                url = url
                    .join(&next)
                    .map_err(|e| FederationError::BadResponse(format!("a redirect to {next:?}: {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(FederationError::BadResponse(format!("{url} answered {status}")));
            }
            return Ok(response);
        }
        Err(FederationError::BadResponse(format!(
            "too many redirects from {url}"
        )))
    }

    /// Sends one request to `destination`, signed as the endpoint requires, and parses the answer.
    pub async fn send<R>(
        &self,
        destination: &ServerName,
        request: R,
    ) -> Result<R::IncomingResponse, FederationError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: Signing,
    {
        let target = self.target(destination).await?;
        let input = R::Authentication::input(&self.origin, destination, &self.key.key_pair);
        let http_request = request
            .try_into_http_request::<Vec<u8>>(&target.base_url(), input, ())
            .map_err(|e| FederationError::Internal(format!("cannot build the request: {e}")))?;
        let mut request = reqwest::Request::try_from(http_request)
            .map_err(|e| FederationError::Internal(format!("cannot build the request: {e}")))?;
        if let Ok(host) = target.host_header.parse() {
            request.headers_mut().insert(reqwest::header::HOST, host);
        }
        *request.timeout_mut() = Some(REQUEST_TIMEOUT);
        let path = request.url().path().to_owned();
        let response = self.http.execute(request).await.map_err(|e| {
            FederationError::Unreachable(format!("{destination}: {}", crate::util::error_chain(&e)))
        })?;
        let status = response.status();
        let (body, complete) = crate::util::read_capped(response, MAX_RESPONSE).await;
        if !complete {
            return Err(FederationError::BadResponse(format!(
                "{destination} {path}: the answer broke off or exceeded {MAX_RESPONSE} bytes"
            )));
        }
        if !status.is_success() {
            return Err(remote_error(destination, status, &body));
        }
        let mut http_response = http::Response::new(body.as_slice());
        *http_response.status_mut() = status;
        <R::IncomingResponse as ruma::api::IncomingResponseExt>::try_from_http_response(http_response)
            .map_err(|e| FederationError::BadResponse(format!("{destination} {path}: {e}")))
    }
}

/// Where a redirect points.
fn redirect_target(response: &reqwest::Response) -> Result<String, FederationError> {
    response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|target| {
            // Relative targets are resolved against the URL answered.
            response
                .url()
                .join(target)
                .map_or_else(|_| target.to_owned(), |u| u.to_string())
        })
        .ok_or_else(|| {
            FederationError::BadResponse(format!("a redirect from {} without Location", response.url()))
        })
}

/// Another server's refusal: its Matrix error if it gave one.
fn remote_error(destination: &ServerName, status: reqwest::StatusCode, body: &[u8]) -> FederationError {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    FederationError::Remote {
        status: status.as_u16(),
        errcode: json["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned(),
        message: json["error"]
            .as_str()
            .map_or_else(|| format!("{destination} answered {status}"), str::to_owned),
    }
}

/// rustls for outbound federation: the system's roots plus `federation_custom_ca_list`, or no
/// checks at all with `federation_verify_certificates: false`.
fn tls_config(config: &Config) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if !config.federation_verify_certificates {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for path in &config.federation_custom_ca_list {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("federation_custom_ca_list: {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "federation_custom_ca_list: {}: no certificate in it",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("federation_custom_ca_list: {}: {e}", path.display()))?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// `federation_verify_certificates: false`: any certificate is taken, its signatures still checked.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whitelist_wins_and_the_defaults_block_private_ranges() {
        let config = Config::parse(
            "server_name: a.org\nlisteners: [{port: 1, resources: [{names: [client]}]}]",
            "t",
            std::path::Path::new("/"),
        )
        .unwrap();
        let filter = IpFilter::for_federation(&config);
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
        ] {
            assert!(!filter.allows(blocked.parse().unwrap()), "{blocked}");
        }
        assert!(filter.allows("8.8.8.8".parse().unwrap()));
        let config = Config::parse(
            "server_name: a.org\nlisteners: [{port: 1, resources: [{names: [client]}]}]\nip_range_whitelist: ['127.0.0.0/8']",
            "t",
            std::path::Path::new("/"),
        )
        .unwrap();
        let filter = IpFilter::for_federation(&config);
        assert!(filter.allows("127.0.0.1".parse().unwrap()));
        assert!(!filter.allows("10.0.0.1".parse().unwrap()));
        // The older key replaces both lists, as in Synapse.
        let config = Config::parse(
            "server_name: a.org\nlisteners: [{port: 1, resources: [{names: [client]}]}]\nfederation_ip_range_blacklist: []",
            "t",
            std::path::Path::new("/"),
        )
        .unwrap();
        let filter = IpFilter::for_federation(&config);
        assert!(filter.allows("10.0.0.1".parse().unwrap()));
        assert!(
            !filter.allows("0.0.0.0".parse().unwrap()),
            "the unspecified address, always"
        );
    }
}
