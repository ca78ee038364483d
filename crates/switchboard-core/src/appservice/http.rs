//! Talking HTTP to services: `hs_token` auth, and the spec's legacy-route fallback. When a
//! service answers a `/_matrix/app/v1/...` route with 404, 405 or 501, the unprefixed route of that
//! endpoint family is used instead and remembered; v1 is probed again after 30 minutes. A 5xx is a
//! failure, never a reason to switch routes.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use reqwest::{Method, StatusCode};

use super::AppService;

/// How long a service stays on legacy routes before v1 is tried again.
const REPROBE_AFTER: Duration = Duration::from_secs(30 * 60);

/// The longest wait a service's `Retry-After` can impose: the backoff ceiling.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(512);

/// The most of a reply body read from a service (answers are `{}` or a small object; the body
/// is kept only for error messages). The rest is never read, so a service cannot fill memory.
pub const MAX_REPLY_BODY: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Family {
    Transactions,
    /// `/ping` exists only under v1: never falls back.
    Ping,
    Users,
    Rooms,
    ThirdParty,
}

/// The outcome of one request to a service.
#[derive(Debug)]
pub enum Reply {
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
    /// Connection refused, reset, DNS failure: the service is not there.
    Unreachable(String),
    TimedOut,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        matches!(self, Reply::Status { status, .. } if status.is_success())
    }

    pub fn describe(&self) -> String {
        match self {
            Reply::Status { status, body, .. } => {
                format!("HTTP {status}: {}", body.chars().take(200).collect::<String>())
            }
            Reply::Unreachable(e) => format!("unreachable: {e}"),
            Reply::TimedOut => "timed out".to_owned(),
        }
    }
}

pub struct ServiceHttp {
    client: reqwest::Client,
    /// Also send `?access_token=hs_token` (Synapse's `use_appservice_legacy_authorization`).
    legacy_auth: bool,
    legacy_since: Mutex<HashMap<(String, Family), Instant>>,
}

impl ServiceHttp {
    pub fn new(timeout: Duration, legacy_auth: bool) -> Self {
        crate::tls::init();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            client,
            legacy_auth,
            legacy_since: Mutex::new(HashMap::new()),
        }
    }

    fn on_legacy(&self, service: &AppService, family: Family) -> bool {
        let Ok(mut map) = self.legacy_since.lock() else {
            return false;
        };
        let key = (service.id().to_owned(), family);
        match map.get(&key) {
            Some(since) if since.elapsed() < REPROBE_AFTER => true,
            Some(_) => {
                map.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_legacy(&self, service: &AppService, family: Family) {
        if let Ok(mut map) = self.legacy_since.lock()
            && map
                .insert((service.id().to_owned(), family), Instant::now())
                .is_none()
        {
            tracing::info!(
                service = service.id(),
                ?family,
                "service lacks the v1 route; using the legacy route"
            );
        }
    }

    /// Sends a request to `v1_path` (under `/_matrix/app/v1`), falling back to `legacy_path`.
    /// `None` when the service has no URL.
    pub async fn request(
        &self,
        service: &AppService,
        family: Family,
        method: Method,
        v1_path: &str,
        legacy_path: &str,
        body: Option<&str>,
    ) -> Option<Reply> {
        let base = service.registration.url.as_deref()?;
        if !self.on_legacy(service, family) {
            let reply = self
                .send(
                    service,
                    method.clone(),
                    &format!("{base}/_matrix/app/v1{v1_path}"),
                    body,
                )
                .await;
            let missing = match &reply {
                Reply::Status { status, body, .. } => route_missing(*status, body),
                _ => false,
            };
            if !missing || family == Family::Ping {
                return Some(reply);
            }
            // Switch for a while only if the legacy route really answers: a stray 404 page from a
            // proxy must not send a v1 service's traffic to routes it does not have.
            let legacy = self
                .send(service, method, &format!("{base}{legacy_path}"), body)
                .await;
            if legacy.is_success() {
                self.remember_legacy(service, family);
            }
            return Some(legacy);
        }
        Some(
            self.send(service, method, &format!("{base}{legacy_path}"), body)
                .await,
        )
    }

    async fn send(&self, service: &AppService, method: Method, url: &str, body: Option<&str>) -> Reply {
        let hs_token = &service.registration.hs_token;
        let mut request = self.client.request(method, url).bearer_auth(hs_token);
        if self.legacy_auth {
            request = request.query(&[("access_token", hs_token)]);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_owned());
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let body = read_limited(response, MAX_REPLY_BODY).await;
                Reply::Status {
                    status,
                    retry_after,
                    body,
                }
            }
            Err(e) if e.is_timeout() => Reply::TimedOut,
            Err(e) => Reply::Unreachable(crate::util::error_chain(&e)),
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date, at most [`MAX_RETRY_AFTER`] (a huge value must
/// neither overflow a deadline nor park the sender for years).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        // All digits but beyond u64: as long as we allow.
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => MAX_RETRY_AFTER,
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The body up to `limit` bytes; a longer one is cut there and the rest left unread. Cut-off or
/// broken bodies come back as far as they got.
async fn read_limited(response: reqwest::Response, limit: usize) -> String {
    String::from_utf8_lossy(&crate::util::read_capped(response, limit).await.0).into_owned()
}

/// Whether a reply means "no such route" rather than an answer from the route. A 404 with a JSON
/// object body (`{}` from mautrix, `M_NOT_FOUND` from others) is an answer to a query, unless it is
/// `M_UNRECOGNIZED`; a bare or HTML 404, as a 2015-era service gives for the v1 paths, is a
/// missing route.
fn route_missing(status: StatusCode, body: &str) -> bool {
    match status {
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => true,
        StatusCode::NOT_FOUND => match serde_json::from_str::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(object)) => {
                object.get("errcode").and_then(|e| e.as_str()) == Some("M_UNRECOGNIZED")
            }
            _ => true,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date_and_never_beyond_the_backoff_ceiling() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        let in_a_minute = httpdate::fmt_http_date(now + Duration::from_secs(60));
        assert_eq!(
            parse_retry_after(&in_a_minute, now),
            Some(Duration::from_secs(60))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn tells_missing_routes_from_answers() {
        assert!(route_missing(StatusCode::NOT_FOUND, "<html>Not Found</html>"));
        assert!(route_missing(
            StatusCode::NOT_FOUND,
            r#"{"errcode":"M_UNRECOGNIZED"}"#
        ));
        assert!(!route_missing(
            StatusCode::NOT_FOUND,
            r#"{"errcode":"M_NOT_FOUND"}"#
        ));
        assert!(route_missing(StatusCode::NOT_IMPLEMENTED, ""));
        assert!(
            !route_missing(StatusCode::INTERNAL_SERVER_ERROR, ""),
            "never fall back on 5xx"
        );
    }
}
