//! Configuration of the machines, validated before anything starts.

use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::endpoint::Endpoint;
use crate::error::ConfigError;

/// The most channels a pool may have in all (connections x channels per
/// connection): the client keeps each channel's state (a few hundred bytes)
/// from the start, so a pool above this is refused with
/// [`ConfigError::PoolTooLarge`] rather than allocated. RabbitMQ's default
/// `channel_max` is 2047 per connection.
pub const MAX_POOL_CHANNELS: usize = 1 << 20;

/// The longest connection name, in bytes
/// ([`ClientBuilder::connection_name`](crate::ClientBuilder::connection_name)).
/// The name travels in `connection.start-ok`, which RabbitMQ reads before the
/// connection is tuned, in frames of at most 4,096 bytes, beside the client's
/// other properties and its credentials; past that frame it drops the socket
/// without a word, and every dial fails alike.
pub const MAX_CONNECTION_NAME: usize = 2048;

/// Everything the [`Supervisor`](crate::Supervisor) needs to know up front.
///
/// Build it with [`Config::new`] and adjust the public fields; the supervisor calls
/// [`Config::validate`] and refuses a bad one with a [`ConfigError`].
///
/// ```
/// use amqp_rebound_core::{Config, endpoint::parse_hosts};
///
/// let hosts = parse_hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"]).unwrap();
/// let mut config = Config::new(hosts);
/// config.connections = 2;
/// config.channels_per_connection = 8;
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Brokers to connect to. Shuffled once with [`Config::seed`]; each connection
    /// slot starts on its own host and moves to the next one when a dial fails.
    pub hosts: Vec<Endpoint>,
    /// Connections in the pool (N). Default 1.
    pub connections: usize,
    /// Channels per connection (M). Default 4.
    pub channels_per_connection: usize,
    /// Delay between reconnect attempts (and channel reopens).
    pub backoff: BackoffConfig,
    /// How long a dial (TCP + TLS + AMQP handshake) may take before it counts as
    /// failed. Default 5 s.
    pub connect_timeout: Duration,
    /// With more than one host: how long a dial may go unanswered before the next
    /// host is dialled beside it (a broker that accepts TCP and then says
    /// nothing, a paused node, a black-holed route). The first of the two to
    /// connect is kept, the other closed. `Duration::MAX` never dials in
    /// parallel. Default 1 s.
    pub parallel_dial_after: Duration,
    /// How long `close` waits for the transport before calling a connection closed.
    /// Default 5 s.
    pub close_timeout: Duration,
    /// Seeds every random choice (host shuffle, jitter). Same seed, same behaviour.
    pub seed: u64,
    /// Deadline of a publish that does not set its own. Default 30 s.
    pub publish_timeout: Duration,
    /// Messages the outbox holds before publishes wait (or fail with
    /// backpressure). Default 10,000.
    pub outbox_capacity: usize,
    /// Unconfirmed messages allowed per channel. Default 1024.
    pub confirm_window: usize,
    /// Re-publish a message the broker nacked (instead of resolving it as
    /// Nacked), after a pause that grows as the backoff does (see
    /// [`ClientBuilder::retry_nacked`](crate::ClientBuilder::retry_nacked)).
    /// Default false.
    pub retry_nacked: bool,
    /// The client's name: the connection name the broker shows
    /// ([`ClientBuilder::connection_name`](crate::ClientBuilder::connection_name)
    /// sets it), the `client` field of tracing and the `client` label of
    /// metrics. Default none (`unnamed` in metrics).
    pub name: Option<String>,
}

impl Config {
    /// A configuration with the defaults and the given hosts.
    pub fn new(hosts: Vec<Endpoint>) -> Self {
        Config {
            hosts,
            connections: 1,
            channels_per_connection: 4,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(5),
            parallel_dial_after: Duration::from_secs(1),
            close_timeout: Duration::from_secs(5),
            seed: 0,
            publish_timeout: Duration::from_secs(30),
            outbox_capacity: 10_000,
            confirm_window: 1024,
            retry_nacked: false,
            name: None,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hosts.is_empty() {
            return Err(ConfigError::EmptyHostList);
        }
        if self.connections == 0 {
            return Err(ConfigError::ZeroConnections);
        }
        if self.connections > usize::from(u16::MAX) {
            return Err(ConfigError::TooManyConnections(self.connections));
        }
        if self.channels_per_connection == 0 {
            return Err(ConfigError::ZeroChannels);
        }
        if self.channels_per_connection > usize::from(u16::MAX) {
            return Err(ConfigError::TooManyChannels(self.channels_per_connection));
        }
        if self
            .connections
            .saturating_mul(self.channels_per_connection)
            > MAX_POOL_CHANNELS
        {
            return Err(ConfigError::PoolTooLarge {
                connections: self.connections,
                channels: self.channels_per_connection,
            });
        }
        if let Some(name) = &self.name
            && name.len() > MAX_CONNECTION_NAME
        {
            return Err(ConfigError::ConnectionNameTooLong(name.len()));
        }
        self.backoff.validate()?;
        for (name, value) in [
            ("connect timeout", self.connect_timeout),
            ("close timeout", self.close_timeout),
            ("publish timeout", self.publish_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.outbox_capacity == 0 {
            return Err(ConfigError::Zero("outbox capacity"));
        }
        if self.confirm_window == 0 {
            return Err(ConfigError::Zero("confirm window"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::parse_hosts;

    fn config() -> Config {
        Config::new(parse_hosts(["amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f"]).unwrap())
    }

    #[test]
    fn defaults_are_valid() {
        let c = config();
        assert_eq!((c.connections, c.channels_per_connection), (1, 4));
        assert_eq!(c.confirm_window, 1024);
        assert_eq!(c.outbox_capacity, 10_000);
        assert_eq!(c.publish_timeout, Duration::from_secs(30));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn every_bad_field_is_a_typed_error() {
        type Edit = fn(&mut Config);
        let cases: Vec<(Edit, ConfigError)> = vec![
            (|c| c.hosts.clear(), ConfigError::EmptyHostList),
            (|c| c.connections = 0, ConfigError::ZeroConnections),
            (|c| c.channels_per_connection = 0, ConfigError::ZeroChannels),
            (
                |c| c.connections = 70_000,
                ConfigError::TooManyConnections(70_000),
            ),
            (
                |c| c.channels_per_connection = 70_000,
                ConfigError::TooManyChannels(70_000),
            ),
            (
                |c| {
                    c.connections = 65_535;
                    c.channels_per_connection = 65_535;
                },
                ConfigError::PoolTooLarge {
                    connections: 65_535,
                    channels: 65_535,
                },
            ),
            (
                |c| c.backoff.cap = Duration::from_millis(10),
                ConfigError::BackoffCapBelowInitial {
                    initial: Duration::from_millis(50),
                    cap: Duration::from_millis(10),
                },
            ),
            (
                |c| c.confirm_window = 0,
                ConfigError::Zero("confirm window"),
            ),
            (
                |c| c.outbox_capacity = 0,
                ConfigError::Zero("outbox capacity"),
            ),
            (
                |c| c.publish_timeout = Duration::ZERO,
                ConfigError::Zero("publish timeout"),
            ),
            (
                |c| c.connect_timeout = Duration::ZERO,
                ConfigError::Zero("connect timeout"),
            ),
        ];
        for (edit, expected) in cases {
            let mut c = config();
            edit(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err, expected);
            let shown = format!("{err} {err:?} {c:?}");
            assert!(!shown.contains("s3cr3t-pw"), "password leaked: {shown}");
        }
    }
}
