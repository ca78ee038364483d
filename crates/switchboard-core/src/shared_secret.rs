//! Synapse's shared-secret registration (`/_synapse/admin/v1/register`): whoever knows
//! `registration_shared_secret` can create accounts (and admins), even with registration closed.
//! Tools such as Synapse's `register_new_matrix_user` speak this protocol.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::{Error, Result, util::random_string};

const NONCE_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Nonces {
    issued: Mutex<HashMap<String, Instant>>,
}

impl Nonces {
    pub fn issue(&self) -> String {
        let nonce = random_string(32);
        if let Ok(mut issued) = self.issued.lock() {
            issued.retain(|_, at| at.elapsed() < NONCE_LIFETIME);
            issued.insert(nonce.clone(), Instant::now());
        }
        nonce
    }

    /// Each nonce works once, within a minute.
    pub fn take(&self, nonce: &str) -> Result<()> {
        let mut issued = self
            .issued
            .lock()
            .map_err(|_| Error::internal("nonces poisoned"))?;
        match issued.remove(nonce) {
            Some(at) if at.elapsed() < NONCE_LIFETIME => Ok(()),
            _ => Err(Error::BadState("unrecognised nonce".to_owned())),
        }
    }
}

/// Checks the request's HMAC-SHA1 over `nonce\0username\0password\0admin|notadmin[\0user_type]`.
pub fn verify_mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
    user_type: Option<&str>,
    mac_hex: &str,
) -> Result<()> {
    let expected = mac(secret, nonce, username, password, admin, user_type);
    // Constant-time comparison through the Mac API.
    let given = decode_hex(mac_hex).ok_or_else(|| Error::Forbidden("HMAC incorrect".to_owned()))?;
    expected
        .verify_slice(&given)
        .map_err(|_| Error::Forbidden("HMAC incorrect".to_owned()))
}

fn mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
    user_type: Option<&str>,
) -> Hmac<Sha1> {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(username.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin { b"admin" } else { b"notadmin" });
    if let Some(user_type) = user_type {
        mac.update(b"\0");
        mac.update(user_type.as_bytes());
    }
    mac
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The MAC as hex, for clients and tests.
pub fn mac_hex(secret: &str, nonce: &str, username: &str, password: &str, admin: bool) -> String {
    mac(secret, nonce, username, password, admin, None)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_synapses_construction() {
        // Computed with Python: hmac.new(b"secret", b"abc\0alice\0pw\0notadmin", hashlib.sha1).hexdigest()
        assert_eq!(
            mac_hex("secret", "abc", "alice", "pw", false),
            "42e32623fe124933c326f9d2d67ff7c617915a10"
        );
    }

    #[test]
    fn nonces_work_once() {
        let nonces = Nonces::default();
        let nonce = nonces.issue();
        nonces.take(&nonce).expect("first use");
        assert!(nonces.take(&nonce).is_err());
        assert!(verify_mac("s", "n", "u", "p", true, None, &mac_hex("s", "n", "u", "p", true)).is_ok());
        assert!(
            verify_mac(
                "s",
                "n",
                "u",
                "p",
                false,
                None,
                &mac_hex("s", "n", "u", "p", true)
            )
            .is_err()
        );
    }
}
