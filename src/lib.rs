//! # amqp-rebound
//!
//! RabbitMQ (AMQP 0-9-1) publishers and consumers that survive failures:
//! reconnect with backoff and jitter, fail over across hosts, reopen channels,
//! replay topology, re-subscribe consumers and re-publish every message the broker
//! had not confirmed.
//!
//! This facade re-exports the runtime-agnostic core ([`amqp_rebound_core`]) and,
//! by Cargo feature, the transports: `lapin` (default) and `amqprs`. The
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

pub use amqp_rebound_core::*;

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
