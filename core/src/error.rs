//! Errors, one enum per boundary, and the single place where failures are classified.
//!
//! - [`ConfigError`]: bad configuration, reported by the builder before any I/O.
//! - [`TransportError`]: why a connection or channel failed, as a transport reports it.
//! - [`ErrorClass`]: what the machines do about a [`TransportError`], decided once, here.

use std::fmt;
use std::time::Duration;

/// A configuration the client refuses to start with.
///
/// Returned by validation before any I/O. Messages never contain a password: URIs
/// are shown redacted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The host list holds no URI.
    #[error("the host list is empty: give at least one amqp:// or amqps:// URI")]
    EmptyHostList,
    /// A URI in the host list could not be parsed.
    #[error("host #{index} ({uri}) is not a valid AMQP URI: {reason}")]
    InvalidUri {
        /// Position in the host list, from 0.
        index: usize,
        /// The URI with its password replaced by `***`.
        uri: String,
        /// Why it was refused.
        reason: String,
    },
    /// The pool was asked for zero connections.
    #[error("the pool needs at least one connection (got 0)")]
    ZeroConnections,
    /// The pool was asked for zero channels per connection.
    #[error("the pool needs at least one channel per connection (got 0)")]
    ZeroChannels,
    /// More connections than the pool can address.
    #[error("{0} connections is more than the pool supports (65535)")]
    TooManyConnections(usize),
    /// More channels per connection than AMQP allows.
    #[error("{0} channels per connection is more than AMQP allows (65535)")]
    TooManyChannels(usize),
    /// More channels in the whole pool (connections x channels per
    /// connection) than [`MAX_POOL_CHANNELS`](crate::config::MAX_POOL_CHANNELS):
    /// the pool keeps every channel's state from the start.
    #[error(
        "a pool of {connections} x {channels} channels is more than the client supports ({max} in all)",
        max = crate::config::MAX_POOL_CHANNELS
    )]
    PoolTooLarge {
        /// The connections asked for.
        connections: usize,
        /// The channels per connection asked for.
        channels: usize,
    },
    /// The backoff cap is below its initial delay.
    #[error("backoff cap {cap:?} is below the initial delay {initial:?}")]
    BackoffCapBelowInitial {
        /// The configured initial delay.
        initial: Duration,
        /// The configured cap.
        cap: Duration,
    },
    /// The backoff initial delay is zero, which would make a hot retry loop.
    #[error("backoff initial delay must be above zero")]
    ZeroBackoff,
    /// The backoff multiplier is below 1 or not finite.
    #[error("backoff multiplier must be a finite number >= 1 (got {0})")]
    InvalidMultiplier(f64),
    /// The connection name is longer than
    /// [`MAX_CONNECTION_NAME`](crate::config::MAX_CONNECTION_NAME) bytes.
    #[error(
        "the connection name is {0} bytes long; the client allows {max} (the broker reads it in a frame of 4,096 bytes before the connection is tuned)",
        max = crate::config::MAX_CONNECTION_NAME
    )]
    ConnectionNameTooLong(usize),
    /// A size that must be positive is zero.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// The TLS configuration cannot be used (PEM without a certificate or a
    /// key, a bad server name, EXTERNAL authentication without TLS or a client
    /// certificate). Never quotes key material.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Why a first connection could not be made ([`Client::connected`] and the
/// facade's `connect_ready`).
///
/// [`Client::connected`]: crate::Client::connected
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The configuration was refused before any I/O.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A full round of dials over every host failed; this is the last one's
    /// error (its class says whether retrying can help: bad credentials and an
    /// unknown vhost are [`ErrorClass::Refused`]). The client keeps dialling.
    #[error("could not connect: {0}")]
    Transport(TransportError),
    /// The client closed first.
    #[error("the client is closed")]
    Closed,
}

/// AMQP reply codes the classification knows by name.
pub mod reply_code {
    /// 320: the broker closed the connection (admin action, shutdown).
    pub const CONNECTION_FORCED: u16 = 320;
    /// 403: access refused (permissions, or authentication).
    pub const ACCESS_REFUSED: u16 = 403;
    /// 404: the entity does not exist.
    pub const NOT_FOUND: u16 = 404;
    /// 405: resource locked (exclusive queue owned by another connection).
    pub const RESOURCE_LOCKED: u16 = 405;
    /// 406: precondition failed (unknown delivery tag, incompatible redeclare).
    pub const PRECONDITION_FAILED: u16 = 406;
    /// 530: not allowed (vhost access, for example).
    pub const NOT_ALLOWED: u16 = 530;
    /// 541: internal error in the broker.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Why a connection or channel failed, as a transport reports it.
///
/// Transports build these; the machines only read [`TransportError::class`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket-level failure: refused, reset, unreachable, TLS.
    #[error("I/O error: {0}")]
    Io(String),
    /// No heartbeat from the broker within the negotiated interval.
    #[error("missed heartbeats")]
    HeartbeatTimeout,
    /// The dial or handshake did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The broker rejected the credentials.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The broker closed the connection or channel with an AMQP reply code.
    #[error("broker closed with {code} {text}")]
    Reply {
        /// The AMQP reply code (320, 404, 406, ...).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The transport broke a protocol rule or failed in a way it cannot classify.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The TLS handshake failed (or a plain dial reached a TLS port): a matter of
    /// certificates, names or ports, so [`ErrorClass::Refused`].
    #[error("TLS: {kind}: {detail}")]
    Tls {
        /// What went wrong.
        kind: crate::tls::TlsErrorKind,
        /// The TLS library's own words (never key material or a password).
        detail: String,
    },
    /// The connection or channel was closed on our own request.
    #[error("closed by the client")]
    ClosedByClient,
    /// The broker allows fewer channels per connection (its negotiated
    /// `channel_max`) than the pool asks for: a configuration error, refused.
    #[error(
        "the pool asks for {wanted} channels per connection; the broker allows {max} \
         (its channel_max): lower the pool's channels or raise channel_max"
    )]
    ChannelLimit {
        /// Channels per connection in the pool.
        wanted: usize,
        /// The broker's limit.
        max: u16,
    },
}

/// What the machines do about a failure. Decided once, in [`TransportError::class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Worth retrying with backoff: I/O, heartbeat, 320, 541, timeouts.
    Transient,
    /// Only the channel is affected (404, 405, 406): reopen that channel alone.
    ChannelLevel,
    /// The broker refuses us (403, 530, bad credentials, a TLS handshake that
    /// fails on certificates, names or ports). Retrying will likely fail
    /// again: the next host of the list is still tried at once, but when a round
    /// over every host ends in a refusal, the next round waits at the backoff cap
    /// (a round ending in another error waits the ordinary backoff delay); the
    /// error is reported.
    Refused,
}

impl TransportError {
    /// Classifies this failure: the one place where reply codes and I/O kinds map
    /// to behaviour.
    pub fn class(&self) -> ErrorClass {
        use reply_code::*;
        match self {
            TransportError::Io(_)
            | TransportError::HeartbeatTimeout
            | TransportError::Timeout
            | TransportError::Protocol(_)
            | TransportError::ClosedByClient => ErrorClass::Transient,
            TransportError::Auth(_)
            | TransportError::ChannelLimit { .. }
            | TransportError::Tls { .. } => ErrorClass::Refused,
            TransportError::Reply { code, .. } => match *code {
                NOT_FOUND | RESOURCE_LOCKED | PRECONDITION_FAILED => ErrorClass::ChannelLevel,
                ACCESS_REFUSED | NOT_ALLOWED => ErrorClass::Refused,
                // 320, 541 and every code we do not know: try again.
                _ => ErrorClass::Transient,
            },
        }
    }

    /// Whether the broker's reply code is a connection (hard) error in AMQP 0-9-1
    /// (320, 402, 501-506, 530, 540, 541): the broker closes the whole connection
    /// with it, so a channel that reports one is going down with its connection.
    pub fn is_connection_level(&self) -> bool {
        matches!(
            self.reply_code(),
            Some(320 | 402 | 501..=506 | 530 | 540 | 541)
        )
    }

    /// The AMQP reply code, if the broker gave one.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            TransportError::Reply { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Transient => "transient",
            ErrorClass::ChannelLevel => "channel-level",
            ErrorClass::Refused => "refused",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> TransportError {
        TransportError::Reply {
            code,
            text: String::new(),
        }
    }

    #[test]
    fn classification_by_reply_code() {
        assert_eq!(reply(320).class(), ErrorClass::Transient);
        assert_eq!(reply(541).class(), ErrorClass::Transient);
        assert_eq!(reply(404).class(), ErrorClass::ChannelLevel);
        assert_eq!(reply(405).class(), ErrorClass::ChannelLevel);
        assert_eq!(reply(406).class(), ErrorClass::ChannelLevel);
        assert_eq!(reply(403).class(), ErrorClass::Refused);
        assert_eq!(reply(530).class(), ErrorClass::Refused);
        assert_eq!(reply(999).class(), ErrorClass::Transient);
    }

    #[test]
    fn hard_reply_codes_are_connection_level() {
        for code in [320, 402, 501, 504, 506, 530, 540, 541] {
            assert!(reply(code).is_connection_level(), "{code}");
        }
        for code in [311, 312, 313, 403, 404, 405, 406, 200] {
            assert!(!reply(code).is_connection_level(), "{code}");
        }
        assert!(!TransportError::Io("reset".into()).is_connection_level());
    }

    #[test]
    fn classification_by_kind() {
        assert_eq!(
            TransportError::Io("reset".into()).class(),
            ErrorClass::Transient
        );
        assert_eq!(
            TransportError::HeartbeatTimeout.class(),
            ErrorClass::Transient
        );
        assert_eq!(
            TransportError::Auth("bad".into()).class(),
            ErrorClass::Refused
        );
        assert_eq!(
            TransportError::Tls {
                kind: crate::tls::TlsErrorKind::UnknownIssuer,
                detail: String::new(),
            }
            .class(),
            ErrorClass::Refused
        );
        assert_eq!(reply(404).reply_code(), Some(404));
        assert_eq!(TransportError::Timeout.reply_code(), None);
    }
}
