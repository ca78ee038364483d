//! Small helpers shared by the services.

use rand::{Rng, distributions::Alphanumeric};
use sha2::{Digest, Sha256};

/// A random alphanumeric string from the OS-seeded thread RNG.
pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A user ID from a client: `@localpart:server` within 255 bytes (ruma's parse), with a localpart
/// that is not empty and keeps to the spec's historical grammar — printable ASCII but `:` — so
/// spaces and control characters are refused where ruma, lenient for federation, would take
/// them. The error says why; callers choose the errcode.
pub fn parse_user_id(raw: &str) -> Result<ruma::OwnedUserId, String> {
    let user_id = ruma::OwnedUserId::try_from(raw).map_err(|e| format!("invalid user ID {raw:?}: {e}"))?;
    user_id
        .validate_historical()
        .map_err(|e| format!("invalid user ID {raw:?}: {e}"))?;
    Ok(user_id)
}

/// `deserialize_with` for a user ID field of a request body, by [`parse_user_id`].
pub fn de_user_id<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ruma::OwnedUserId, D::Error> {
    let raw = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
    parse_user_id(&raw).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for a list of user IDs, by [`parse_user_id`].
pub fn de_user_ids<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ruma::OwnedUserId>, D::Error> {
    let raw = <Vec<String> as serde::Deserialize>::deserialize(deserializer)?;
    raw.iter()
        .map(|r| parse_user_id(r).map_err(serde::de::Error::custom))
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hex SHA-256 of a secret, for storing tokens.
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Percent-encodes everything but unreserved characters: for URL path segments (user IDs and
/// aliases carry `@`, `#` and `:`) and RFC 6266 `filename*` values.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A response body up to `limit` bytes, and whether it ended there (`false`: it was longer, or
/// broke off). The rest is left unread, so a peer cannot make us read or buffer without end.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(bytes.len());
                bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    return (bytes, false);
                }
            }
            Ok(None) => return (bytes, true),
            Err(_) => return (bytes, false),
        }
    }
}

/// An error with its sources, for logs and messages ("error sending request: connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod user_id_tests {
    use super::parse_user_id;

    #[test]
    fn client_user_ids_keep_to_the_historical_grammar() {
        assert!(parse_user_id("@alice:example.org").is_ok());
        assert!(
            parse_user_id("@Old.Style!id:example.org").is_ok(),
            "historical IDs stay valid"
        );
        for bad in [
            "@bad user:example.org",
            "@bad\u{1}:example.org",
            "@tab\t:example.org",
            "@:example.org",
            "@caf\u{e9}:example.org",
            "alice:example.org",
            "@alice",
        ] {
            assert!(parse_user_id(bad).is_err(), "{bad:?} is refused");
        }
        let long = format!("@{}:example.org", "a".repeat(250));
        assert!(parse_user_id(&long).is_err(), "over 255 bytes");
    }
}
