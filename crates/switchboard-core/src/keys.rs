//! The server's ed25519 signing key, stored in Synapse's format (`ed25519 <version> <base64 seed>`),
//! so a key file moves between Synapse and Switchboard unchanged.

use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use rand::RngCore;
use ruma::signatures::Ed25519KeyPair;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write signing key {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("signing key {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

/// PKCS#8 v1 header for a bare ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

pub struct SigningKey {
    pub key_pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(ed25519:{})", self.key_pair.version())
    }
}

impl SigningKey {
    /// Loads the key, generating and writing a new one if the file does not exist.
    /// Returns whether a key was generated.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), KeyError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let text = generate_key_file_contents();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| KeyError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        std::fs::write(path, &text).map_err(|source| KeyError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok((Self::parse(&text, &path.display().to_string())?, true))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the first key line of a Synapse signing key file.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        let malformed = |reason: &str| KeyError::Malformed {
            path: origin.to_owned(),
            reason: reason.to_owned(),
        };
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| malformed("the file is empty"))?;
        let mut parts = line.split_whitespace();
        let (Some(algorithm), Some(version), Some(seed)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed("expected `ed25519 <version> <base64 seed>`"));
        };
        if algorithm != "ed25519" {
            return Err(malformed("only ed25519 keys are supported"));
        }
        let seed = STANDARD_NO_PAD
            .decode(seed.trim_end_matches('='))
            .map_err(|_| malformed("the seed is not valid base64"))?;
        if seed.len() != 32 {
            return Err(malformed("the seed must be 32 bytes"));
        }
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key_pair =
            Ed25519KeyPair::from_der(&der, version.to_owned()).map_err(|e| malformed(&e.to_string()))?;
        Ok(Self { key_pair })
    }
}

/// A fresh key line: random version suffix and seed, as Synapse's `generate_signing_key` writes.
pub fn generate_key_file_contents() -> String {
    let mut rng = rand::thread_rng();
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let version: String = crate::util::random_string(4);
    format!("ed25519 a_{version} {}\n", STANDARD_NO_PAD.encode(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_synapse_key_format() {
        // A key in the exact format Synapse writes.
        let key = SigningKey::parse(
            "ed25519 a_AbCd nCbqpn2A/dtpWuJb4Ckv/DJkxNPx4u6AzE81ebxwIu8\n",
            "k",
        )
        .expect("valid");
        assert_eq!(key.key_pair.version(), "a_AbCd");
    }

    #[test]
    fn generated_key_parses() {
        let text = generate_key_file_contents();
        assert!(SigningKey::parse(&text, "k").is_ok(), "{text}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(SigningKey::parse("ed25519 a_x not-base64!!", "k").is_err());
        assert!(SigningKey::parse("", "k").is_err());
    }
}
