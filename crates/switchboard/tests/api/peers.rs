//! Federating servers for the tests and the federation benchmark: Switchboards and Synapses on
//! 127.0.0.1, each named `localhost:<port>` after its TLS federation listener, with certificates
//! from a CA made for the run, which every server trusts (`federation_custom_ca_list`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::harness::{RELAXED_LIMITS, Server, free_port, tls_init};

/// The test CA and one certificate for `localhost` / 127.0.0.1 it issued, made once per run.
pub(crate) fn ca_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Kept for the whole run (servers read the files at start); tiny, under the system's tmp.
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=Switchboard test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        dir
    })
}

/// The TLS and trust settings both kinds of server take under the same keys.
fn tls_settings() -> String {
    let ca = ca_dir().display();
    format!(
        "tls_certificate_path: {ca}/server.pem
tls_private_key_path: {ca}/server.key
federation_verify_certificates: true
federation_custom_ca_list: ['{ca}/ca.pem']
ip_range_whitelist: ['127.0.0.0/8']
trusted_key_servers: []
"
    )
}

/// A server in the test federation.
pub struct Peer {
    pub server: Server,
    pub name: String,
    pub fed_port: u16,
}

impl Peer {
    pub async fn switchboard(extra: &str) -> Self {
        Self::switchboard_on(free_port(), extra).await
    }

    /// A Switchboard named `localhost:{fed_port}` (for configuration that needs the name first).
    pub async fn switchboard_on(fed_port: u16, extra: &str) -> Self {
        // A key `extra` sets replaces the default one.
        let settings: String = tls_settings()
            .lines()
            .filter(|line| line.split(':').next().is_none_or(|key| !extra.contains(key)))
            .map(|line| format!("{line}\n"))
            .collect();
        // So does a one-line limit.
        let limits: String = RELAXED_LIMITS
            .lines()
            .filter(|line| {
                line.starts_with(' ')
                    || line
                        .split_once(": {")
                        .is_none_or(|(key, _)| !extra.contains(&format!("{key}:")))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let server = Server::start_edited(&format!("{limits}\n{settings}\n{extra}"), |text| {
            text.replacen(
                "server_name: localhost\n",
                &format!("server_name: \"localhost:{fed_port}\"\n"),
                1,
            )
            .replacen(
                "    resources: [{names: [client]}]\n",
                &format!(
                    "    resources: [{{names: [client]}}]
  - port: {fed_port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: true
    resources: [{{names: [federation]}}]
"
                ),
                1,
            )
        })
        .await;
        Self {
            server,
            name: format!("localhost:{fed_port}"),
            fed_port,
        }
    }

    /// Synapse from `target/synapse-venv`, federating the same way; `None` if not installed.
    pub async fn synapse() -> Option<Self> {
        let fed_port = free_port();
        let server = Server::start_synapse_edited(&[], |text| {
            format!(
                "{}\n{}federation_ip_range_blacklist: []\n",
                text.replacen("server_name: localhost\n", &format!("server_name: \"localhost:{fed_port}\"\n"), 1)
                    .replacen(
                        "listeners:\n",
                        &format!(
                            "listeners:\n  - {{port: {fed_port}, bind_addresses: ['127.0.0.1'], type: http, tls: true, \
                             resources: [{{names: [federation], compress: false}}]}}\n"
                        ),
                        1,
                    ),
                tls_settings()
            )
        })
        .await?;
        Some(Self {
            server,
            name: format!("localhost:{fed_port}"),
            fed_port,
        })
    }

    pub fn federation_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.fed_port)
    }
}

/// An HTTPS client trusting the test CA.
pub fn tls_client() -> reqwest::Client {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    tls_init();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_dir().join("ca.pem")).expect("ca") {
        roots.add(cert.expect("cert")).expect("add");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .expect("client")
}

/// The end of a server's log (Synapse's or Switchboard's), for failure messages.
pub fn log_of(peer: &Peer) -> String {
    let synapse = peer.server.dir.path().join("synapse.log");
    let log = std::fs::read_to_string(&synapse).unwrap_or_else(|_| peer.server.log());
    // The end is what matters.
    log.chars()
        .rev()
        .take(20_000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Whether a test whose peers (Synapse, ngircd, the IRC bridge's binary) are missing fails
/// rather than skips: `scripts/test.sh` installs them all and sets `SWITCHBOARD_PEERS_REQUIRED`.
pub fn skip_without(what: &str) {
    assert!(
        std::env::var_os("SWITCHBOARD_PEERS_REQUIRED").is_none(),
        "{what} is missing, and SWITCHBOARD_PEERS_REQUIRED is set"
    );
    eprintln!("{what} is missing; skipped");
}
