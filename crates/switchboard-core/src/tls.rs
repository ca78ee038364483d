//! The TLS crypto provider for outgoing HTTPS (application services at `https://` URLs).

/// Installs rustls' ring provider for the process; HTTP clients must not be built before. Safe
/// to call more than once.
pub fn init() {
    // An error only says a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
