//! How a broker is set up, and the confirm fault knob.

use std::fmt;
use std::time::Duration;

/// How the simulated broker is set up. Build it with struct update syntax or the
/// `with_*` methods:
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_sim::BrokerConfig;
///
/// let config = BrokerConfig::default()
///     .with_seed(7)
///     .with_latency(Duration::from_millis(2))
///     .with_credentials("app", "s3cr3t");
/// assert_eq!(config.username, "app");
/// assert!(!format!("{config:?}").contains("s3cr3t"), "the password is redacted");
/// ```
#[derive(Clone)]
pub struct BrokerConfig {
    /// Seeds the broker's one random generator (server-named queue and consumer
    /// tag suffixes). Same seed, same names.
    pub seed: u64,
    /// The only user the broker accepts (default `guest`).
    pub username: String,
    /// That user's password (default `guest`). Never printed.
    pub password: String,
    /// One-way latency of new connections, each direction (default 1 ms): a call
    /// takes two latencies, a confirm arrives one latency after its publish is
    /// routed, which is one latency after it was sent.
    pub latency: Duration,
    /// The heartbeat interval used when the endpoint asks for none (default 10 s).
    /// A partitioned connection is declared dead after twice its interval. An
    /// endpoint `?heartbeat=0`, or zero here, disables heartbeats: a partitioned
    /// connection then hangs until the partition heals.
    pub default_heartbeat: Duration,
    /// Channels per connection (default 2047, RabbitMQ's). Opening one more closes
    /// the connection with 530 NOT_ALLOWED.
    pub channel_max: u16,
    /// Whether a restart keeps transient (delivery mode 1) messages in durable
    /// queues (default true: "durable queues keep their messages"). False models
    /// classic queues, which keep only persistent messages.
    pub restart_keeps_transient_messages: bool,
    /// Record a human-readable trace of broker activity, stamped with virtual time
    /// (see [`SimBroker::trace`](crate::SimBroker::trace)). Off by default. Independently of this, the same
    /// lines go to `tracing` at DEBUG level.
    pub trace: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            seed: 0,
            username: "guest".to_owned(),
            password: "guest".to_owned(),
            latency: Duration::from_millis(1),
            default_heartbeat: Duration::from_secs(10),
            channel_max: 2047,
            restart_keeps_transient_messages: true,
            trace: false,
        }
    }
}

impl BrokerConfig {
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the accepted user and password.
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.username = username.into();
        self.password = password.into();
        self
    }

    /// Sets the one-way latency of new connections.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the default heartbeat interval.
    pub fn with_default_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.default_heartbeat = heartbeat;
        self
    }

    /// Turns the trace on or off.
    pub fn with_trace(mut self, trace: bool) -> Self {
        self.trace = trace;
        self
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("seed", &self.seed)
            .field("username", &self.username)
            .field("password", &"***")
            .field("latency", &self.latency)
            .field("default_heartbeat", &self.default_heartbeat)
            .field("channel_max", &self.channel_max)
            .field(
                "restart_keeps_transient_messages",
                &self.restart_keeps_transient_messages,
            )
            .field("trace", &self.trace)
            .finish()
    }
}

/// What the broker does with publisher confirms (a fault knob; see
/// [`SimBroker::set_confirm_mode`](crate::SimBroker::set_confirm_mode)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ConfirmMode {
    /// Ack every routed (or unroutable) message at once.
    #[default]
    Normal,
    /// Route at once, but send the ack this much later (a slow disk). Acks of
    /// messages published after switching back to `Normal` may overtake delayed
    /// ones, as RabbitMQ's out-of-order confirms can.
    Delay(Duration),
    /// Route, but never send the ack (a lost confirm: the client must time out or
    /// recover, and re-publish).
    Drop,
    /// Refuse the message: not routed, nacked (like an overflow `reject-publish`).
    Nack,
}
