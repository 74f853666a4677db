//! TLS for `amqps://` endpoints, the same for every transport: [`TlsConfig`] (what
//! to trust, which client certificate to present, which name to verify) and
//! [`TlsErrorKind`] (why a handshake failed).
//!
//! The configuration is parsed and checked when it is built (PEM that holds no
//! certificate, or no key, is a [`ConfigError::Tls`]); the transport turns it into
//! its TLS client's configuration at every dial. With the `rustls` feature,
//! [`rustls`](mod@self::rustls) does that for rustls-based transports (both
//! adapters of this workspace use it), and maps rustls's errors to
//! [`TlsErrorKind`].
//!
//! ```no_run
//! use amqp_rebound_core::tls::TlsConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = TlsConfig::new()
//!     // trust this CA (and, from now on, only it)
//!     .ca_pem(std::fs::read("ca.pem")?)?
//!     // mutual TLS; EXTERNAL authentication with `?auth_mechanism=external`
//!     .client_cert_pem(std::fs::read("client.pem")?, std::fs::read("client.key")?)?;
//! # let _ = tls;
//! # Ok(())
//! # }
//! ```
//!
//! # What is trusted
//!
//! The server's certificate must chain to one of: the CA certificates given with
//! [`TlsConfig::ca_pem`]; the system's roots, when [`TlsConfig::native_roots`] is
//! on; the public [webpki roots](https://github.com/rustls/webpki-roots) (Mozilla's
//! set), which are on by default *only while neither of the others is given*
//! (an `amqps://` URI without a TLS configuration trusts them, as before), and
//! can be turned on or off with [`TlsConfig::webpki_roots`].
//!
//! # Secrets
//!
//! The private key never appears in `Debug`, `Display` or an error: the `Debug`
//! output counts the certificates and says whether a key is there.

use std::fmt;
use std::sync::Arc;

pub use rustls_pki_types as pki_types;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::endpoint::Endpoint;
use crate::error::ConfigError;

#[cfg(feature = "rustls")]
pub mod rustls;

/// How to make TLS connections to `amqps://` endpoints; plain `amqp://` endpoints
/// of the same client ignore it (a host list may mix them).
///
/// Give it to the client with
/// [`ClientBuilder::tls`](crate::ClientBuilder::tls); transports receive it in
/// [`ConnectOptions::tls`](crate::transport::ConnectOptions::tls). See the
/// [module docs](self) for what is trusted.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    ca_certificates: Vec<CertificateDer<'static>>,
    client_identity: Option<ClientIdentity>,
    webpki_roots: Option<bool>,
    native_roots: bool,
    server_name: Option<String>,
    accept_invalid_certs: bool,
}

/// A certificate chain and its key. The key sits behind an `Arc` because
/// `PrivateKeyDer` is deliberately not `Clone`.
#[derive(Clone, PartialEq, Eq)]
struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig::new()
    }
}

impl TlsConfig {
    /// The configuration an `amqps://` URI gets without one: the public webpki
    /// roots, no client certificate, the URI's host as the name to verify.
    pub fn new() -> Self {
        TlsConfig {
            ca_certificates: Vec::new(),
            client_identity: None,
            webpki_roots: None,
            native_roots: false,
            server_name: None,
            accept_invalid_certs: false,
        }
    }

    /// Trusts the CA certificates in `pem` (every `CERTIFICATE` section; other
    /// sections are skipped). May be called more than once; the certificates
    /// add up. Unless [`webpki_roots`](Self::webpki_roots) turns them back on,
    /// the public roots are then no longer trusted: a private CA is usually
    /// meant to be the only one.
    ///
    /// Fails with [`ConfigError::Tls`] when `pem` holds no certificate or a
    /// malformed section.
    pub fn ca_pem(mut self, pem: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        let certificates = certificates(pem.as_ref(), "the CA PEM")?;
        self.ca_certificates.extend(certificates);
        Ok(self)
    }

    /// Presents this client certificate (mutual TLS): `chain_pem` holds the
    /// certificate first, then any intermediates; `key_pem` its private key
    /// (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`, unencrypted).
    /// Needed for EXTERNAL authentication (`?auth_mechanism=external` in the
    /// URI), where the broker takes the user name from the certificate.
    ///
    /// Fails with [`ConfigError::Tls`] when either holds nothing usable. That the
    /// key belongs to the certificate is checked when the first connection is
    /// made.
    pub fn client_cert_pem(
        mut self,
        chain_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Result<Self, ConfigError> {
        let chain = certificates(chain_pem.as_ref(), "the client certificate PEM")?;
        // pki-types' errors can quote a line of the input, which here is the key:
        // they are replaced, never passed on
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_ref()).map_err(|_| {
            ConfigError::Tls(
                "the client key PEM holds no unencrypted private key (PRIVATE KEY, \
                 RSA PRIVATE KEY or EC PRIVATE KEY)"
                    .into(),
            )
        })?;
        self.client_identity = Some(ClientIdentity {
            chain,
            key: Arc::new(key),
        });
        Ok(self)
    }

    /// Trusts the public webpki roots (Mozilla's set, compiled in) or not. By
    /// default they are trusted only while no CA and no native roots are given.
    pub fn webpki_roots(mut self, on: bool) -> Self {
        self.webpki_roots = Some(on);
        self
    }

    /// Trusts the system's root certificates (read at every dial from the
    /// platform's store: on Linux the files `openssl version -d` names, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`). Off by default.
    pub fn native_roots(mut self, on: bool) -> Self {
        self.native_roots = on;
        self
    }

    /// Verifies the server's certificate for `name` (and sends it as SNI)
    /// instead of each URI's host: for brokers reached by an address their
    /// certificate does not name (an IP, a tunnel, a load balancer). Applies to
    /// every `amqps://` host of the client.
    ///
    /// Fails with [`ConfigError::Tls`] when `name` is neither a DNS name nor an
    /// IP address.
    pub fn server_name(mut self, name: impl Into<String>) -> Result<Self, ConfigError> {
        let name = name.into();
        if ServerName::try_from(name.as_str()).is_err() {
            return Err(ConfigError::Tls(format!(
                "server name {name:?} is neither a DNS name nor an IP address"
            )));
        }
        self.server_name = Some(name);
        Ok(self)
    }

    /// **For development only.** Accepts any server certificate: unknown issuer,
    /// wrong name, expired. The connection is encrypted but not authenticated,
    /// so anyone on the path can read and change it. Logged as a warning at
    /// every client build and every TLS configuration a transport makes from it.
    pub fn danger_accept_invalid_certs(mut self, on: bool) -> Self {
        self.accept_invalid_certs = on;
        self
    }

    /// The CA certificates given with [`ca_pem`](Self::ca_pem), in order.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.ca_certificates
    }

    /// The client certificate chain and its key, if one was given.
    pub fn client_certificate(
        &self,
    ) -> Option<(&[CertificateDer<'static>], &PrivateKeyDer<'static>)> {
        self.client_identity
            .as_ref()
            .map(|identity| (identity.chain.as_slice(), identity.key.as_ref()))
    }

    /// Whether the public webpki roots are trusted (see the [module docs](self)).
    pub fn uses_webpki_roots(&self) -> bool {
        self.webpki_roots
            .unwrap_or(self.ca_certificates.is_empty() && !self.native_roots)
    }

    /// Whether the system's roots are trusted.
    pub fn uses_native_roots(&self) -> bool {
        self.native_roots
    }

    /// The name to verify the server's certificate for, given the endpoint's
    /// host: the [override](Self::server_name) if there is one.
    pub fn server_name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }

    /// Whether every server certificate is accepted
    /// ([`danger_accept_invalid_certs`](Self::danger_accept_invalid_certs)).
    pub fn accepts_invalid_certs(&self) -> bool {
        self.accept_invalid_certs
    }

    /// Checks the configuration against the hosts it will serve, before any I/O.
    pub(crate) fn check(tls: Option<&TlsConfig>, hosts: &[Endpoint]) -> Result<(), ConfigError> {
        use amq_protocol_uri::SASLMechanism;
        for (index, host) in hosts.iter().enumerate() {
            if host.amqp_uri().query.auth_mechanism != Some(SASLMechanism::External) {
                continue;
            }
            let has_certificate = tls.is_some_and(|tls| tls.client_identity.is_some());
            if !host.is_tls() || !has_certificate {
                return Err(ConfigError::Tls(format!(
                    "host #{index} ({host}) asks for EXTERNAL authentication, which needs \
                     amqps:// and a client certificate (TlsConfig::client_cert_pem)"
                )));
            }
        }
        if tls.is_some_and(TlsConfig::accepts_invalid_certs) {
            tracing::warn!(
                "TLS certificate verification is off (TlsConfig::danger_accept_invalid_certs): \
                 connections are encrypted but not authenticated; never use this in production"
            );
        }
        Ok(())
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ConfigError::Tls(format!("{what} has a malformed section")))?;
    if certificates.is_empty() {
        return Err(ConfigError::Tls(format!(
            "{what} holds no CERTIFICATE section"
        )));
    }
    Ok(certificates)
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.ca_certificates.len())
            .field(
                "client_certificate",
                &self.client_identity.as_ref().map(|identity| {
                    format!(
                        "{} certificate(s), private key hidden",
                        identity.chain.len()
                    )
                }),
            )
            .field("webpki_roots", &self.uses_webpki_roots())
            .field("native_roots", &self.native_roots)
            .field("server_name", &self.server_name)
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .finish()
    }
}

/// Why a TLS handshake failed, in [`TransportError::Tls`](crate::TransportError::Tls).
///
/// Every kind is a matter of configuration (certificates, names, ports), so the
/// core classifies them all as [`ErrorClass::Refused`](crate::ErrorClass::Refused):
/// a first-contact connect fails fast with it, and a client that was Ready
/// reports it at every dial and retries at the backoff cap, never in a hot loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// The server's certificate does not chain to a trusted root (a private CA
    /// that was not given, or the wrong one).
    UnknownIssuer,
    /// The server's certificate is not valid for the name verified (the URI's
    /// host, or the [server name override](TlsConfig::server_name)).
    NameMismatch,
    /// The server's certificate has expired (or is not valid yet).
    Expired,
    /// Another problem with the server's certificate (revoked, badly encoded,
    /// unsupported algorithm, wrong purpose).
    InvalidCertificate,
    /// The server refused the client's certificate, or required one and got
    /// none (a certificate alert from the server).
    ClientCertificateRefused,
    /// TLS to a port that does not speak TLS (e.g. `amqps://` to 5672): the
    /// server answered with something that is not TLS.
    NotTlsPort,
    /// Plain AMQP to a port that expects TLS (e.g. `amqp://` to 5671): the
    /// server answered the AMQP header with a TLS record.
    TlsPort,
    /// The local TLS configuration cannot be used (a key that does not match
    /// its certificate, a CA that is not a valid trust anchor, no native roots
    /// found).
    Config,
    /// Any other handshake failure the TLS library reported.
    Handshake,
}

impl fmt::Display for TlsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsErrorKind::UnknownIssuer => "unknown certificate issuer",
            TlsErrorKind::NameMismatch => "certificate not valid for the server name",
            TlsErrorKind::Expired => "certificate expired or not yet valid",
            TlsErrorKind::InvalidCertificate => "invalid server certificate",
            TlsErrorKind::ClientCertificateRefused => "client certificate refused",
            TlsErrorKind::NotTlsPort => "the server does not speak TLS on this port",
            TlsErrorKind::TlsPort => "the server expects TLS on this port",
            TlsErrorKind::Config => "unusable TLS configuration",
            TlsErrorKind::Handshake => "handshake failed",
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    // A throwaway P-256 key and a self-signed certificate for it (CN test),
    // generated for these tests only.
    pub(crate) const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBczCCARmgAwIBAgIUa952N3QzvUp5oNjEasADmXQIllYwCgYIKoZIzj0EAwIw
DzENMAsGA1UEAwwEdGVzdDAeFw0yNjEyMDYxOTEzMjRaFw0zNjEyMDMxOTEzMjRa
MA8xDTALBgNVBAMMBHRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAR7Ng5x
tg7SJR8YSaAq/1mJMNMo7dd5+a+KmCAN86ts2yJnHvE93MaQkxMTmW+hTPTyf/6/
anyHOCp/x2Z1n2ZPo1MwUTAdBgNVHQ4EFgQUaazJ5zqsN244JbnBhkwsapIOyrMw
HwYDVR0jBBgwFoAUaazJ5zqsN244JbnBhkwsapIOyrMwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiBiBNXvvAHJaBx5SahxJMfij6Zw+KBfrzne6X3p
3uOPGAIhAPGxIuT5W8i1nd3zi6+FU3AVy//W1+fnsmOHCfmfsDo5
-----END CERTIFICATE-----
";
    pub(crate) const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKaTRj17BxsX4SNR2
rt/pVPUXgfym6bKf42KHxvoNbSWhRANCAAR7Ng5xtg7SJR8YSaAq/1mJMNMo7dd5
+a+KmCAN86ts2yJnHvE93MaQkxMTmW+hTPTyf/6/anyHOCp/x2Z1n2ZP
-----END PRIVATE KEY-----
";

    #[test]
    fn roots_default_to_webpki_until_something_else_is_given() {
        assert!(TlsConfig::new().uses_webpki_roots());
        let with_ca = TlsConfig::new().ca_pem(CERT).unwrap();
        assert!(!with_ca.uses_webpki_roots());
        assert_eq!(with_ca.ca_certificates().len(), 1);
        assert!(with_ca.clone().webpki_roots(true).uses_webpki_roots());
        assert!(!TlsConfig::new().native_roots(true).uses_webpki_roots());
        assert!(!TlsConfig::new().webpki_roots(false).uses_webpki_roots());
    }

    #[test]
    fn bad_pem_is_a_config_error_that_quotes_nothing() {
        let garbage = "-----BEGIN CERTIFICATE-----\nnot base64 at all s3cr3t\n";
        for err in [
            TlsConfig::new().ca_pem("").unwrap_err(),
            TlsConfig::new().ca_pem(garbage).unwrap_err(),
            TlsConfig::new().ca_pem(KEY).unwrap_err(),
            TlsConfig::new().client_cert_pem(CERT, "").unwrap_err(),
            TlsConfig::new().client_cert_pem(CERT, CERT).unwrap_err(),
            TlsConfig::new()
                .client_cert_pem(CERT, garbage.replace("CERTIFICATE", "PRIVATE KEY"))
                .unwrap_err(),
            TlsConfig::new().client_cert_pem(KEY, KEY).unwrap_err(),
            TlsConfig::new().server_name("not a name!").unwrap_err(),
        ] {
            assert!(matches!(err, ConfigError::Tls(_)), "{err:?}");
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("MIGH"),
                "{shown}"
            );
        }
    }

    #[test]
    fn the_key_never_shows() {
        let tls = TlsConfig::new()
            .ca_pem(CERT)
            .unwrap()
            .client_cert_pem(CERT, KEY)
            .unwrap()
            .server_name("rabbit.internal")
            .unwrap();
        let (chain, key) = tls.client_certificate().expect("a client certificate");
        assert_eq!(chain.len(), 1);
        assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
        let shown = format!("{tls:?}");
        assert!(
            !shown.contains("MIGH") && !shown.contains("Pkcs8"),
            "{shown}"
        );
        assert!(shown.contains("private key hidden"), "{shown}");
        let builder = crate::Client::builder().tls(tls.clone());
        let options = crate::transport::ConnectOptions::default().with_tls(tls.clone());
        let shown = format!("{builder:?} {options:?}");
        assert!(
            !shown.contains("MIGH") && shown.contains("private key hidden"),
            "{shown}"
        );
        assert_eq!(tls.server_name_for("10.0.0.1"), "rabbit.internal");
        assert_eq!(TlsConfig::new().server_name_for("10.0.0.1"), "10.0.0.1");
        assert_eq!(tls.clone(), tls);
    }

    #[test]
    fn external_needs_amqps_and_a_client_certificate() {
        let hosts = |uri: &str| vec![Endpoint::parse(uri).unwrap()];
        let with_cert = TlsConfig::new().client_cert_pem(CERT, KEY).unwrap();
        let external = "amqps://localhost/%2f?auth_mechanism=external";
        assert!(TlsConfig::check(Some(&with_cert), &hosts(external)).is_ok());
        for (tls, uri) in [
            (None, external),
            (Some(&TlsConfig::new()), external),
            (
                Some(&with_cert),
                "amqp://localhost/%2f?auth_mechanism=external",
            ),
        ] {
            let err = TlsConfig::check(tls, &hosts(uri)).unwrap_err();
            assert!(err.to_string().contains("EXTERNAL"), "{err}");
        }
        assert!(TlsConfig::check(None, &hosts("amqps://localhost")).is_ok());
    }
}
