//! Errors of the SDK: what the homeserver answered, or why it could not be asked.

use crate::registration::RegistrationError;

/// A Matrix error answer: HTTP status, `errcode` and `error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {errcode}: {error}")]
pub struct MatrixError {
    pub status: u16,
    pub errcode: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The homeserver answered with a Matrix error.
    #[error("the homeserver refused: {0}")]
    Matrix(#[from] MatrixError),
    /// The homeserver could not be reached, or answered something that is not Matrix.
    #[error("cannot talk to the homeserver at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    /// Startup found the homeserver and the service cannot reach each other as registered.
    #[error("{0}")]
    Setup(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// End-to-end encryption failed (feature `e2ee`): the crypto machine or its store.
    #[error("encryption: {0}")]
    Crypto(String),
}

impl Error {
    /// The Matrix `errcode`, if the homeserver answered with one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Error::Matrix(e) => Some(&e.errcode),
            _ => None,
        }
    }
}
