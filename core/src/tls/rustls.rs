//! [`TlsConfig`] for rustls-based transports (feature `rustls`): the client
//! configuration, the server name, and rustls's errors as [`TlsErrorKind`]s.
//!
//! Both adapters of this workspace use it, so they trust, present and verify
//! the same things and report the same errors.
//!
//! # Crypto provider
//!
//! The process-wide default provider when the application installed one
//! (`CryptoProvider::install_default`, e.g. aws-lc-rs for FIPS or post-quantum
//! key exchange), else *ring*, which this feature compiles in. The fallback is
//! not installed as the default, so the application can still install its own
//! later. *ring* rather than aws-lc-rs because it is already what lapin's and
//! amqprs's TLS stacks build with (one provider in the graph, not two), builds
//! without CMake or a C++ toolchain, and needs no licence beyond ISC / MIT.

use std::io;
use std::sync::{Arc, Mutex};

use ::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use ::rustls::crypto::{self, CryptoProvider};
use ::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use ::rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, Error, InvalidMessage,
    RootCertStore, SignatureScheme,
};

use super::{TlsConfig, TlsErrorKind};
use crate::endpoint::Endpoint;
use crate::error::TransportError;

/// The rustls client configuration for `tls` (`None`: what an `amqps://` URI
/// gets without one, the public webpki roots).
///
/// Fails with [`TransportError::Tls`] of kind [`TlsErrorKind::Config`] when the
/// configuration cannot be used: a key that does not match its certificate, a
/// CA certificate that is not a valid trust anchor, native roots asked for and
/// none found. Builds from scratch (and reads the native roots) at every call:
/// keep the result, or use a [`ClientConfigCache`].
pub fn client_config(tls: Option<&TlsConfig>) -> Result<Arc<ClientConfig>, TransportError> {
    let default = TlsConfig::new();
    let tls = tls.unwrap_or(&default);
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("the crypto provider: {e}")))?;
    let builder = if tls.accepts_invalid_certs() {
        tracing::warn!(
            "TLS certificate verification is off (TlsConfig::danger_accept_invalid_certs): \
             connections are encrypted but not authenticated; never use this in production"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        builder.with_root_certificates(roots(tls)?)
    };
    let config = match tls.client_certificate() {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.to_vec(), key.clone_key())
            .map_err(|e| config_error(format!("the client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn roots(tls: &TlsConfig) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    if tls.uses_webpki_roots() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if tls.uses_native_roots() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _unusable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "the store is empty".to_owned(), ToString::to_string);
            return Err(config_error(format!(
                "native roots asked for, none could be loaded: {why}"
            )));
        }
    }
    for (i, ca) in tls.ca_certificates().iter().enumerate() {
        roots
            .add(ca.clone())
            .map_err(|e| config_error(format!("CA certificate #{i} is not a trust anchor: {e}")))?;
    }
    Ok(roots)
}

/// The name to verify and send as SNI for `host`: the configuration's override,
/// else the host itself (a DNS name or an IP address).
pub fn server_name(
    tls: Option<&TlsConfig>,
    host: &str,
) -> Result<ServerName<'static>, TransportError> {
    let name = tls.map_or(host, |tls| tls.server_name_for(host));
    ServerName::try_from(name.to_owned())
        .map_err(|_| config_error(format!("{name:?} is not a valid TLS server name")))
}

fn config_error(detail: String) -> TransportError {
    TransportError::Tls {
        kind: TlsErrorKind::Config,
        detail,
    }
}

/// The process-level default provider when the application installed one, else
/// *ring* (see the [module docs](self)).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Arc::clone(installed);
    }
    // rustls 0.23.48 deprecates this constructor because *ring* has no
    // post-quantum key exchange; it is the only way to build the *ring* provider,
    // and an application that wants post-quantum installs its own provider, which
    // the branch above takes.
    #[allow(deprecated)]
    let ring = crypto::ring::default_provider();
    Arc::new(ring)
}

/// Client configurations by [`TlsConfig`], built once each: a transport keeps
/// one and asks it at every dial, so that the roots are not parsed (nor the
/// native store read) again for every connection.
#[derive(Debug, Default, Clone)]
pub struct ClientConfigCache {
    // A client has one TLS configuration, so one entry is enough.
    last: Arc<Mutex<Option<Built>>>,
}

/// A configuration and what was built from it.
type Built = (Option<TlsConfig>, Arc<ClientConfig>);

impl ClientConfigCache {
    /// An empty cache.
    pub fn new() -> Self {
        ClientConfigCache::default()
    }

    /// The configuration for `tls`, from the cache when it was built before.
    /// Errors are not cached: a configuration that failed is built again (and
    /// fails again) at the next dial.
    pub fn get(&self, tls: Option<&TlsConfig>) -> Result<Arc<ClientConfig>, TransportError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, config)) = last.as_ref()
            && key.as_ref() == tls
        {
            return Ok(Arc::clone(config));
        }
        let config = client_config(tls)?;
        *last = Some((tls.cloned(), Arc::clone(&config)));
        Ok(config)
    }
}

/// The kind of a rustls error.
pub fn error_kind(error: &Error) -> TlsErrorKind {
    match error {
        Error::InvalidCertificate(error) => certificate_error_kind(error),
        Error::AlertReceived(alert) => alert_kind(*alert),
        Error::InvalidMessage(InvalidMessage::InvalidContentType)
        | Error::InvalidMessage(InvalidMessage::UnknownProtocolVersion) => TlsErrorKind::NotTlsPort,
        Error::InconsistentKeys(_) => TlsErrorKind::Config,
        _ => TlsErrorKind::Handshake,
    }
}

fn certificate_error_kind(error: &CertificateError) -> TlsErrorKind {
    match error {
        CertificateError::UnknownIssuer => TlsErrorKind::UnknownIssuer,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            TlsErrorKind::NameMismatch
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => TlsErrorKind::Expired,
        _ => TlsErrorKind::InvalidCertificate,
    }
}

/// A certificate alert from the server is about our certificate: the client
/// checks the server's certificate itself and never asks the server's opinion.
fn alert_kind(alert: AlertDescription) -> TlsErrorKind {
    match alert {
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateRevoked
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied
        | AlertDescription::CertificateRequired => TlsErrorKind::ClientCertificateRefused,
        _ => TlsErrorKind::Handshake,
    }
}

/// The TLS error inside an I/O error, if there is one (rustls's stream adapters
/// wrap its errors in `io::Error`), as a [`TransportError::Tls`]. The detail is
/// rustls's text, which never holds key material or a password.
pub fn from_io_error(error: &io::Error) -> Option<TransportError> {
    let inner = error.get_ref()?;
    let tls = inner.downcast_ref::<Error>()?;
    Some(TransportError::Tls {
        kind: error_kind(tls),
        detail: tls.to_string(),
    })
}

/// The kind of a rustls error known only by its text (`Display`), for clients
/// that pass rustls's errors on as strings (amqprs). `None` when the text shows
/// no rustls error. Agrees with [`error_kind`] for every error this module
/// classifies (tested).
pub fn error_kind_from_text(text: &str) -> Option<TlsErrorKind> {
    if let Some(rest) = after(text, "invalid peer certificate: ") {
        let kind = if rest.starts_with("UnknownIssuer") {
            TlsErrorKind::UnknownIssuer
        } else if rest.starts_with("NotValidForName")
            || rest.starts_with("certificate not valid for name")
        {
            TlsErrorKind::NameMismatch
        } else if [
            "Expired",
            "NotValidYet",
            "certificate expired",
            "certificate not valid yet",
        ]
        .iter()
        .any(|sign| rest.starts_with(sign))
        {
            TlsErrorKind::Expired
        } else {
            TlsErrorKind::InvalidCertificate
        };
        return Some(kind);
    }
    if let Some(rest) = after(text, "received fatal alert: ") {
        let alert = rest
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default();
        let refused = [
            "BadCertificate",
            "UnsupportedCertificate",
            "CertificateRevoked",
            "CertificateExpired",
            "CertificateUnknown",
            "UnknownCA",
            "AccessDenied",
            "CertificateRequired",
        ];
        return Some(if refused.contains(&alert) {
            TlsErrorKind::ClientCertificateRefused
        } else {
            TlsErrorKind::Handshake
        });
    }
    if let Some(rest) = after(text, "received corrupt message of type ") {
        return Some(
            if rest.starts_with("InvalidContentType") || rest.starts_with("UnknownProtocolVersion")
            {
                TlsErrorKind::NotTlsPort
            } else {
                TlsErrorKind::Handshake
            },
        );
    }
    if after(text, "keys may not be consistent").is_some() {
        return Some(TlsErrorKind::Config);
    }
    [
        "received unexpected message: ",
        "received unexpected handshake message: ",
        "peer is incompatible: ",
        "peer misbehaved: ",
        "peer sent no certificates",
        "cannot decrypt peer's message",
        "peer sent excess record size",
    ]
    .iter()
    .any(|sign| text.contains(sign))
    .then_some(TlsErrorKind::Handshake)
}

fn after<'a>(text: &'a str, sign: &str) -> Option<&'a str> {
    text.find(sign).map(|at| &text[at + sign.len()..])
}

/// Whether the first bytes read from a port look like a TLS record (an alert or
/// a handshake, TLS 1.0-1.3).
pub fn looks_like_tls_record(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

/// How long each step of [`explain_dead_handshake`]'s question to the port may
/// take.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A dial that died without a word is worth [explaining](explain_dead_handshake)
/// only if it died sooner than this after it started: a port that speaks the
/// other protocol, and a broker refusing a client certificate, close at once,
/// while RabbitMQ closes a refused login (for a client that does not advertise
/// `authentication_failure_close`) only after its 3 s delay against password
/// guessing. Each explanation costs one more short connection to the port.
pub const EXPLAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A dial that died without a word (a reset or a close under the TLS or AMQP
/// handshake, or bytes that are neither, once the socket was open) may hide a
/// TLS error: RabbitMQ closes a connection that speaks the wrong protocol to its
/// port, and a TLS connection whose client certificate it refuses, with a reset
/// that often discards its last words (a TLS alert, its AMQP protocol header)
/// before the client reads them. This asks the port again and returns the TLS
/// error it finds, else `error` as it was:
///
/// - a plain endpoint whose port [`answers_tls`]: [`TlsErrorKind::TlsPort`];
/// - a plain endpoint whose close was read as a refused login
///   ([`TransportError::Auth`]) and whose port does not [`answers_amqp`]:
///   [`TransportError::Protocol`] (not an AMQP broker);
/// - a TLS endpoint whose port [`answers_amqp`]: [`TlsErrorKind::NotTlsPort`];
/// - a TLS endpoint with a client certificate: the [`handshake_verdict`].
///
/// **Blocking** (at most a few times [`PROBE_TIMEOUT`]): call it from a
/// blocking thread. `config` is the client configuration the dial used (for a
/// TLS endpoint).
pub fn explain_dead_handshake(
    endpoint: &Endpoint,
    tls: Option<&TlsConfig>,
    config: Option<Arc<ClientConfig>>,
    error: TransportError,
) -> TransportError {
    let (host, port) = (endpoint.host(), endpoint.port());
    if !endpoint.is_tls() {
        if answers_tls(host, port, PROBE_TIMEOUT) {
            return TransportError::Tls {
                kind: TlsErrorKind::TlsPort,
                detail: format!(
                    "the port answers a TLS ClientHello: use amqps:// (the plain handshake \
                     ended with: {error})"
                ),
            };
        }
        // A close read as a refused login (a client that cannot tell the
        // handshake's steps apart) from a port that does not speak AMQP at all.
        if matches!(error, TransportError::Auth(_)) && !answers_amqp(host, port, PROBE_TIMEOUT) {
            return TransportError::Protocol(format!(
                "{host}:{port} closed the connection during the handshake and does not answer \
                 the AMQP protocol header with AMQP: not an AMQP 0-9-1 broker, or a proxy with \
                 none behind it"
            ));
        }
        return error;
    }
    if answers_amqp(host, port, PROBE_TIMEOUT) {
        return TransportError::Tls {
            kind: TlsErrorKind::NotTlsPort,
            detail: format!(
                "the port answers plain AMQP: use amqp:// (the TLS handshake ended with: {error})"
            ),
        };
    }
    let with_certificate = tls.is_some_and(|tls| tls.client_certificate().is_some());
    match (config, server_name(tls, host)) {
        (Some(config), Ok(name)) if with_certificate => {
            handshake_verdict(config, name, host, port, PROBE_TIMEOUT).unwrap_or(error)
        }
        _ => error,
    }
}

/// Whether `host:port` answers the AMQP 0-9-1 protocol header with AMQP (its
/// `connection.start`, or its own protocol header). **Blocking**, like
/// [`answers_tls`].
pub fn answers_amqp(host: &str, port: u16, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};

    let probe = || -> io::Result<bool> {
        let mut stream = connect(host, port, timeout)?;
        stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer)?;
        // a method frame on channel 0, or "AMQP" and the version it speaks
        Ok(answer[..3] == [1, 0, 0] || &answer == b"AMQP")
    };
    probe().unwrap_or(false)
}

/// The server's verdict on our TLS handshake, asked again, for a TLS dial that
/// died under the AMQP handshake: `Some` TLS error if the server refuses it.
/// **Blocking** (a TCP connection, the handshake, one read; each step bounded by
/// `timeout`): call it from a blocking thread.
///
/// In TLS 1.3 the server checks the client's certificate after the client has
/// finished its handshake, so a refused certificate comes back as an alert
/// when the client first reads; by then the client has sent the AMQP header,
/// and the server's close often arrives as a reset that discards the alert.
/// Here nothing is sent after the handshake, so the alert is read. `None` when
/// the server says nothing within `timeout` (it took the handshake) or the
/// question fails for another reason.
pub fn handshake_verdict(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> Option<TransportError> {
    use std::io::Read;

    let mut stream = connect(host, port, timeout).ok()?;
    let mut connection = ::rustls::ClientConnection::new(config, server_name).ok()?;
    let mut tls = ::rustls::Stream::new(&mut connection, &mut stream);
    let mut byte = [0u8; 1];
    // the handshake, then the server's first word, if any
    let verdict = loop {
        if tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(tls.sock) {
                break e;
            }
        } else {
            // any byte, or the end of the stream, is not a refusal
            match tls.read(&mut byte) {
                Err(e) => break e,
                Ok(_read) => return None,
            }
        }
    };
    from_io_error(&verdict)
}

fn connect(host: &str, port: u16, timeout: std::time::Duration) -> io::Result<std::net::TcpStream> {
    use std::net::{TcpStream, ToSocketAddrs};
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Whether `host:port` answers a TLS ClientHello with TLS. **Blocking** (a TCP
/// connection, one write, one read; each step bounded by `timeout`): call it
/// from a blocking thread.
///
/// For a plain dial whose AMQP handshake died without a word: a TLS port answers
/// the AMQP protocol header with an alert and closes, and the close often
/// arrives as a reset that discards the alert before the client reads it, so
/// the client sees only a reset. Asking the port itself, with a real
/// ClientHello (which a TLS server answers without closing), tells a TLS port
/// from a broker that dropped the connection for another reason. `false` on
/// any failure.
pub fn answers_tls(host: &str, port: u16, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};

    let probe = || -> io::Result<bool> {
        let mut stream = connect(host, port, timeout)?;
        let provider = crypto_provider();
        let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth();
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid DNS name"));
        let mut connection =
            ::rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
        let mut hello = Vec::new();
        connection.write_tls(&mut hello)?;
        stream.write_all(&hello)?;
        let mut answer = [0u8; 3];
        stream.read_exact(&mut answer)?;
        Ok(looks_like_tls_record(&answer))
    };
    probe().unwrap_or(false)
}

/// The verifier of [`TlsConfig::danger_accept_invalid_certs`]: any certificate,
/// but the handshake's signatures are still checked, so the session is at least
/// bound to the key of the certificate presented.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::rustls::pki_types::UnixTime;
    use std::time::Duration;

    fn errors() -> Vec<(Error, TlsErrorKind)> {
        let time = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000));
        let then = UnixTime::since_unix_epoch(Duration::from_secs(1_580_000_000));
        let name = ServerName::try_from("rabbit.internal").unwrap();
        let mut cases = vec![
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsErrorKind::UnknownIssuer,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsErrorKind::NameMismatch,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected: name,
                    presented: vec!["DnsName(\"localhost\")".into()],
                }),
                TlsErrorKind::NameMismatch,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                TlsErrorKind::Expired,
            ),
            (
                Error::InvalidCertificate(CertificateError::ExpiredContext {
                    time,
                    not_after: then,
                }),
                TlsErrorKind::Expired,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidYetContext {
                    time: then,
                    not_before: time,
                }),
                TlsErrorKind::Expired,
            ),
            (
                Error::InvalidCertificate(CertificateError::Revoked),
                TlsErrorKind::InvalidCertificate,
            ),
            (
                Error::InvalidCertificate(CertificateError::BadSignature),
                TlsErrorKind::InvalidCertificate,
            ),
            (
                Error::InvalidMessage(InvalidMessage::InvalidContentType),
                TlsErrorKind::NotTlsPort,
            ),
            (
                Error::InvalidMessage(InvalidMessage::UnknownProtocolVersion),
                TlsErrorKind::NotTlsPort,
            ),
            (
                Error::InvalidMessage(InvalidMessage::MessageTooShort),
                TlsErrorKind::Handshake,
            ),
            (
                Error::InconsistentKeys(::rustls::InconsistentKeys::KeyMismatch),
                TlsErrorKind::Config,
            ),
            (Error::NoCertificatesPresented, TlsErrorKind::Handshake),
            (Error::DecryptError, TlsErrorKind::Handshake),
        ];
        for alert in [
            AlertDescription::BadCertificate,
            AlertDescription::UnknownCA,
            AlertDescription::CertificateExpired,
            AlertDescription::CertificateRequired,
            AlertDescription::CertificateUnknown,
            AlertDescription::AccessDenied,
        ] {
            cases.push((
                Error::AlertReceived(alert),
                TlsErrorKind::ClientCertificateRefused,
            ));
        }
        for alert in [
            AlertDescription::HandshakeFailure,
            AlertDescription::ProtocolVersion,
            AlertDescription::DecodeError,
        ] {
            cases.push((Error::AlertReceived(alert), TlsErrorKind::Handshake));
        }
        cases
    }

    #[test]
    fn rustls_errors_have_kinds() {
        for (error, kind) in errors() {
            assert_eq!(error_kind(&error), kind, "{error:?}");
        }
    }

    /// amqprs passes rustls's errors on as text, inside its own: the text gives
    /// the same kind as the error.
    #[test]
    fn text_and_error_agree() {
        for (error, kind) in errors() {
            let text = format!("AMQP network error: {error}");
            assert_eq!(error_kind_from_text(&text), Some(kind), "{text}");
        }
        assert_eq!(
            error_kind_from_text("Connection refused (os error 111)"),
            None
        );
        assert_eq!(error_kind_from_text("connection reset by peer"), None);
    }

    #[test]
    fn io_errors_unwrap_to_tls_errors() {
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let Some(TransportError::Tls { kind, detail }) = from_io_error(&wrapped) else {
            panic!("not a TLS error");
        };
        assert_eq!(kind, TlsErrorKind::UnknownIssuer);
        assert!(detail.contains("UnknownIssuer"), "{detail}");
        assert_eq!(
            from_io_error(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            None
        );
    }

    #[test]
    fn tls_records_are_recognised() {
        // RabbitMQ's answer to an AMQP header on its TLS port: a fatal
        // unexpected_message alert
        assert!(looks_like_tls_record(&[
            0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x0a
        ]));
        assert!(looks_like_tls_record(&[0x16, 0x03, 0x03, 0x00, 0x40]));
        assert!(!looks_like_tls_record(b"AMQP\x00\x00\x09\x01"));
        assert!(!looks_like_tls_record(&[0x01, 0x00, 0x00]));
        assert!(!looks_like_tls_record(&[0x15]));
    }

    /// A second throwaway P-256 key, not the certificate's.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgznA4sZGaSCTWrbTK
FT90kkFnT7UMIIoE3GSCVmgm+0ihRANCAARxPrIYjxNa5ro6QnFG9cdBbXeo7BM4
UVjAr1PoYBWD/cQPppCKvw0wtDyyZ/OoTRFBWPqKWLgt9ALG9li0TYZk
-----END PRIVATE KEY-----
";

    #[test]
    fn a_key_that_is_not_the_certificates_is_a_config_error() {
        use crate::tls::tests::{CERT, KEY};
        let good = TlsConfig::new().client_cert_pem(CERT, KEY).unwrap();
        assert!(client_config(Some(&good)).is_ok());
        let bad = TlsConfig::new().client_cert_pem(CERT, OTHER_KEY).unwrap();
        match client_config(Some(&bad)) {
            Err(TransportError::Tls { kind, detail }) => {
                assert_eq!(kind, TlsErrorKind::Config, "{detail}");
                assert!(!detail.contains("MIGH"), "{detail}");
            }
            other => panic!("expected a TLS configuration error, got {other:?}"),
        }
        // the self-signed certificate is its own trust anchor
        let ca = TlsConfig::new().ca_pem(CERT).unwrap();
        assert!(client_config(Some(&ca)).is_ok());
    }

    #[test]
    fn configurations_build_and_are_cached() {
        let cache = ClientConfigCache::new();
        let a = cache.get(None).expect("the default configuration");
        let b = cache.get(None).expect("the default configuration");
        assert!(Arc::ptr_eq(&a, &b));
        let insecure = TlsConfig::new().danger_accept_invalid_certs(true);
        let c = cache
            .get(Some(&insecure))
            .expect("an insecure configuration");
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(server_name(None, "127.0.0.1").is_ok());
        let over = TlsConfig::new().server_name("rabbit.internal").unwrap();
        assert_eq!(
            server_name(Some(&over), "10.0.0.1").unwrap(),
            ServerName::try_from("rabbit.internal").unwrap()
        );
    }

    /// A port that accepts and answers each connection with `answer`, then
    /// closes it, on a thread; its address.
    fn answering(answer: &'static [u8]) -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut header = [0u8; 8];
                let _ = stream.read_exact(&mut header);
                let _ = stream.write_all(answer);
            }
        });
        addr
    }

    #[test]
    fn a_close_read_as_a_refused_login_is_protocol_when_the_port_is_not_amqp() {
        let refused = || TransportError::Auth("the broker closed the connection".into());
        let http = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let endpoint = Endpoint::parse(&format!("amqp://u:p@{http}/%2f")).unwrap();
        let explained = explain_dead_handshake(&endpoint, None, None, refused());
        assert!(
            matches!(&explained, TransportError::Protocol(text) if text.contains("not an AMQP")),
            "{explained:?}"
        );
        // a port that speaks AMQP: the refusal stands
        let amqp = answering(b"\x01\x00\x00\x00\x00\x00\x00");
        let endpoint = Endpoint::parse(&format!("amqp://u:p@{amqp}/%2f")).unwrap();
        assert_eq!(
            explain_dead_handshake(&endpoint, None, None, refused()),
            refused()
        );
        // other errors are left as they are
        let io = TransportError::Io("reset".into());
        let endpoint = Endpoint::parse(&format!("amqp://u:p@{http}/%2f")).unwrap();
        assert_eq!(
            explain_dead_handshake(&endpoint, None, None, io.clone()),
            io
        );
    }
}
