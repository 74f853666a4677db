//! # amqp-rebound
//!
//! RabbitMQ (AMQP 0-9-1) publishers and consumers that survive failures:
//! reconnect with backoff and jitter, fail over across hosts, reopen channels,
//! replay topology, re-subscribe consumers and re-publish every message the broker
//! had not confirmed.
//!
//! The top level holds what an application uses: [`Client`] and its builder,
//! messages and properties, topology declarations, consumers, events, stats and
//! errors, and the transports by Cargo feature: `lapin` (default) and `amqprs`.
//! The sans-IO engine under it (the supervisor, its inputs and commands, the
//! transport contract for writing an adapter) is in [`engine`]. The
//! guarantees of each outcome are in [`guarantees`]. The
//! `metrics` feature records counters, gauges and histograms through the
//! `metrics` crate's facade (names and labels in [`telemetry`]; the example
//! `prometheus` serves them), and `serde` makes [`Stats`] serializable.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use amqp_rebound::{Client, Properties, QueueDecl};
//!
//! let client = amqp_rebound::connect(Client::builder().from_env())?;
//! client.declare_queue(QueueDecl::durable("jobs")).await?;
//! client.publish("", "jobs", "hello", Properties::default().persistent()).await?;
//! client.close().await;
//! # Ok(()) }
//! ```

#[cfg(any(feature = "lapin", feature = "amqprs"))]
pub use amqp_rebound_core::TokioTimer;
pub use amqp_rebound_core::{
    AMQPValue, AckError, AckKind, BackoffConfig, ChannelId, Client, ClientBuilder, ClientState,
    CloseSummary, ConfigError, Confirmation, ConnectError, ConnectionId, ConsumeError,
    ConsumeOptions, Consumer, ConsumerId, DEFAULT_URL, DEFAULT_WATCH_CAPACITY, Delivery, Driver,
    ErrorClass, Event, ExchangeDecl, ExchangeKind, FieldTable, Flushed, Jitter, Message,
    MessageProperties, Object, Phase, Properties, PublishError, PublishFuture, PublishId,
    PublishOptions, Queue, QueueDecl, QueueHandle, QueueRef, Reason, Received, Returned, Stats,
    TlsConfig, TlsErrorKind, TopologyError, TransportError,
};
pub use amqp_rebound_core::{guarantees, telemetry};

/// The sans-IO engine under [`Client`], for embedding it in another runtime or
/// writing a transport adapter: the [`Supervisor`](engine::Supervisor) state
/// machine with its [`Input`](engine::Input)s and [`Command`](engine::Command)s,
/// the lifecycle states, the backoff, host parsing, and the transport contract
/// ([`Transport`](engine::Transport), [`Connection`](engine::Connection),
/// [`Channel`](engine::Channel), [`Timer`](engine::Timer)).
pub mod engine {
    pub use amqp_rebound_core::endpoint::{parse_host_list, parse_hosts};
    pub use amqp_rebound_core::{
        Backoff, ChannelEvent, ChannelInput, ChannelState, Command, Config, ConnectOptions,
        ConnectionEvent, ConnectionState, Endpoint, FlushId, Input, OpId, QueueInfo, Sleep,
        Supervisor, TopologyOp, TopologyOutcome,
    };
    pub use amqp_rebound_core::{Channel, Connection, Timer, Transport};
}

// The README's Rust snippets compile as doc tests, so the quick start stays true.
#[cfg(all(doctest, feature = "lapin"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The lapin transport adapter (feature `lapin`, on by default).
#[cfg(feature = "lapin")]
pub use amqp_rebound_lapin as lapin;

/// The amqprs transport adapter (feature `amqprs`).
#[cfg(feature = "amqprs")]
pub use amqp_rebound_amqprs as amqprs;

/// Builds the client over lapin (or amqprs when only that feature is on) and
/// tokio's clock, and spawns its driver on the current tokio runtime. Must be
/// called from within a tokio runtime.
///
/// The client runs while that runtime does. When the runtime shuts down (`main`
/// returns from `#[tokio::main]`, a `#[tokio::test]` ends) its driver goes
/// with it: nothing accepted and not yet sent is published after that, so
/// await [`Client::close`] first. On a current-thread runtime the client
/// makes progress only while that runtime's `block_on` runs: a client made
/// there and used from another runtime waits.
#[cfg(feature = "lapin")]
pub fn connect(builder: ClientBuilder) -> Result<Client, ConfigError> {
    let (client, driver) = builder.build(lapin::LapinTransport::new(), TokioTimer)?;
    tokio::spawn(driver);
    Ok(client)
}

/// [`connect`], then waits for the first contact with the brokers
/// ([`Client::connected`]): the client once a channel is Ready, or the cause
/// (bad credentials with the broker's text, unknown vhost, refused,
/// unreachable, TLS) once a round of dials over every host failed. What
/// aio-pika, the Java client and lapin do on a first connect; after it, the
/// client reconnects by itself.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// use amqp_rebound::Client;
/// match amqp_rebound::connect_ready(Client::builder().from_env()).await {
///     Ok(client) => drop(client.close().await),
///     Err(e) => eprintln!("cannot reach RabbitMQ: {e}"),
/// }
/// # }
/// ```
#[cfg(any(feature = "lapin", feature = "amqprs"))]
pub async fn connect_ready(builder: ClientBuilder) -> Result<Client, ConnectError> {
    let client = connect(builder)?;
    client.connected().await?;
    Ok(client)
}

/// Builds the client over amqprs and tokio's clock, and spawns its driver on the
/// current tokio runtime. Must be called from within a tokio runtime.
#[cfg(all(feature = "amqprs", not(feature = "lapin")))]
pub fn connect(builder: ClientBuilder) -> Result<Client, ConfigError> {
    connect_amqprs(builder)
}

/// Builds the client over amqprs and tokio's clock, and spawns its driver on the
/// current tokio runtime (feature `amqprs`). Must be called from within a tokio
/// runtime.
#[cfg(feature = "amqprs")]
pub fn connect_amqprs(builder: ClientBuilder) -> Result<Client, ConfigError> {
    let (client, driver) = builder.build(amqprs::AmqprsTransport::new(), TokioTimer)?;
    tokio::spawn(driver);
    Ok(client)
}
