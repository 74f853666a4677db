//! # amqp-rebound-core
//!
//! The runtime-agnostic heart of amqp-rebound: sans-IO state machines that keep
//! RabbitMQ (AMQP 0-9-1) connections and channels alive, and decide every retry,
//! reopen and failover. No I/O, no clock, no threads: time comes in as an argument,
//! work goes out as commands (the quinn-proto / str0m style).
//!
//! ## Driving the [`Supervisor`]
//!
//! The supervisor has four kinds of methods:
//!
//! - **getters** ([`Supervisor::connection_state`], [`Supervisor::channel_state`], ...);
//! - **input**: [`Supervisor::handle`]`(now, input)` for every transport result,
//!   transport notification, application request and timer expiry;
//! - **application commands**: [`Supervisor::publish`], the topology requests
//!   ([`Supervisor::declare_queue`], ...), [`Supervisor::ack`],
//!   [`Supervisor::flush`], and [`Input::Close`];
//! - **outputs**: [`Supervisor::poll_command`], [`Supervisor::poll_event`],
//!   [`Supervisor::poll_timeout`].
//!
//! **The drain rule.** After every call to `handle` (and after [`Supervisor::new`]),
//! drain `poll_command` until it returns `None` and execute each command, drain
//! `poll_event` until `None`, then re-arm one timer at `poll_timeout()`. When that
//! timer fires, call `handle(now, Input::Timeout)` and drain again. Commands carry an
//! *epoch* (connections) or *generation* (channels): echo it in the answer, so that
//! answers that arrive late are recognised as stale.
//!
//! Time never goes backwards: a `now` older than one already seen is treated as the
//! latest one, and a `Timeout` with nothing due does nothing.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use amqp_rebound_core::{ChannelInput, Command, Config, Input, Supervisor, endpoint::parse_hosts};
//!
//! let hosts = parse_hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"]).unwrap();
//! let clock: fn() -> Instant = Instant::now; // the caller owns the clock
//! let start = clock();
//! let mut sup = Supervisor::new(Config::new(hosts), start).unwrap();
//!
//! // The driver executes the dial and reports the result.
//! let Some(Command::Dial { connection, epoch, .. }) = sup.poll_command() else { panic!() };
//! sup.handle(start + Duration::from_millis(3), Input::Connected { connection, epoch });
//! while let Some(command) = sup.poll_command() {
//!     if let Command::OpenChannel { channel, generation, .. } = command {
//!         sup.handle(start + Duration::from_millis(4), Input::Channel { channel, generation, event: ChannelInput::Opened });
//!     }
//! }
//! assert!(sup.is_all_ready());
//! assert_eq!(sup.ready_channels(), 4); // one connection of four channels
//! ```
//!
//! ## Lifecycles
//!
//! - Connection: `Connecting -> Ready -> Reconnecting -> Connecting ... -> Closing ->
//!   Closed`; blocked/unblocked is a flag on Ready.
//! - Channel: `Opening -> Ready -> Reopening -> Opening ... -> Closed`, with a
//!   generation that grows on every open. A channel-level error (404, 405, 406)
//!   reopens only that channel; a connection loss reopens all of its channels once
//!   the connection is back.
//! - `Closed` is terminal: no dial after it.
//!
//! Errors are classified once, in [`TransportError::class`].
//!
//! What each publish outcome, ack and close guarantees (at-least-once,
//! duplicates, deduplication, what the broker itself may drop) is in
//! [`guarantees`].
//!
//! ## When a connection is dialled again
//!
//! The rule serves the user's stall first, and never loops hot:
//!
//! - **A connection that did useful work is redialled at once** when it is lost
//!   (on the next host of the list), however many losses came before, and its
//!   backoff starts over. *Useful* means it stayed Ready for at least
//!   [`BackoffConfig::reset_after`] (default 150 ms).
//! - **A failed dial, or a connection lost sooner than that, is a failure**: the
//!   slot moves to the next host at once, and once every host has failed since it
//!   was last stable it waits its backoff delay, which grows on every failure
//!   (default: 50 ms doubling to a 2 s cap, full jitter below the cap and
//!   `[cap / 2, cap]` at it). A broker that accepts every connection and drops it
//!   within 100 ms therefore meets dials at most every 1-2 s, never one per
//!   handshake.
//! - **A refusal** (bad credentials, 403, 530) that ends a round over every host
//!   waits at the cap (`[cap / 2, cap]`), and is reported every time.
//! - **A channel that reports a connection error** (a hard reply code such as 320,
//!   which lapin reports on each channel before the connection itself) is handled
//!   as its connection's loss, so its unconfirmed messages are re-sent once, on the
//!   new connection, not on siblings that die with it.
//! - **A dial that goes unanswered** (a paused node, a black-holed route: TCP
//!   accepted, then silence) gets a second dial, to the next host, after
//!   [`Config::parallel_dial_after`] (default 1 s) when there is more than one
//!   host. The first of the two to connect is kept; the other is closed if it
//!   connects later. Each still ends at the connect timeout (default 5 s).
//!
//! With the defaults, an outage ends for the user at most about 2 s after the
//! broker accepts again (the longest delay), while each connection dials at most
//! once per 1-2 s during it.
//!
//! ## Observability
//!
//! - [`Client::stats`] (or [`Supervisor::stats`]): counters, the outbox's
//!   depths, confirm latency p50 / p99 and the last recovery's stall;
//!   serializable with the `serde` feature.
//! - [`Client::watch`]: a bounded stream of [`Event`]s (a watcher that falls
//!   behind loses the oldest and gets [`Event::Lagged`]).
//! - The `metrics` feature: counters, gauges and histograms through the
//!   `metrics` crate's facade; names, types and labels in [`telemetry`].
//! - Tracing, below.
//!
//! ## Tracing
//!
//! The client logs and opens spans through `tracing` under five stable targets
//! (constants in [`telemetry::targets`]); filter on them, not on module paths:
//! `RUST_LOG=amqp_rebound=info` shows every warning and recovery,
//! `amqp_rebound::connection=debug` adds every dial. Spans carry their
//! `outcome` and their duration (`duration_ms`, `stall_ms`, `latency_ms`, in
//! milliseconds as `f64`) as fields recorded when they close (with
//! `tracing-subscriber`'s fmt layer, `with_span_events(FmtSpan::CLOSE)` prints
//! them). Durations come from the clock the driver is given.
//!
//! | target | level | kind and name | fields |
//! |---|---|---|---|
//! | `amqp_rebound::client` | DEBUG | span `client`: the driver, parent of the spans below | `client` |
//! | | DEBUG | event "driver finished" | |
//! | | WARN | event "driver dropped before it ended ...": its runtime shut down with accepted messages unconfirmed (they resolve `Closed`; those not sent are lost) | `client`, `unresolved` |
//! | `amqp_rebound::connection` | DEBUG | span `dial`: one dial, to its result | `connection`, `epoch`, `endpoint`, `outcome` (`ok`, `error`), `duration_ms` |
//! | | INFO | event "connected" | `client`, `connection`, `epoch`, `channel_max` |
//! | | WARN | event "dial failed", "connection lost" | `client`, `connection`, `epoch`, `error` |
//! | | INFO | span `recovery`: from the loss of a Ready connection to a channel of it Ready again | `client`, `connection`, `endpoint`, `cause` (error class), `error`, `outcome` (`recovered`, `closed`), `stall_ms`, `dials` |
//! | | INFO | event "connection recovered" (in the `recovery` span) | `client`, `connection`, `stall_ms` |
//! | | WARN / INFO | event "connection blocked by the broker" / "connection unblocked" | `client`, `connection`, `reason` |
//! | | DEBUG | event "state changed" | `object`, `from`, `to`, `reason` |
//! | `amqp_rebound::channel` | DEBUG | span `channel_open`: channel.open and confirm.select | `channel`, `generation`, `outcome` (`ok`, `error`), `duration_ms` |
//! | | DEBUG | event "state changed" | `object`, `from`, `to`, `reason` |
//! | `amqp_rebound::topology` | DEBUG | span `replay`: a channel's topology replay, to Ready | `channel`, `generation`, `steps`, `outcome` (`ok`, `failed`, `interrupted`), `duration_ms` |
//! | | DEBUG | span `topology_op`: one declare, bind, qos, consume, ... | `channel`, `generation` |
//! | | INFO | event "server-named queue re-created under a new name" | `client`, `old`, `new` |
//! | | WARN | event "topology replay step failed" | `client`, `channel`, `step`, `error` |
//! | | WARN | event "consumer refused by the broker: ended" | `client`, `consumer`, `error`, `started` |
//! | | DEBUG | event "delivery for an unknown consumer dropped" | `consumer_tag` |
//! | `amqp_rebound::publish` | TRACE | span `publish`: one message, from acceptance to resolution (only created at TRACE) | `exchange`, `routing_key`, `bytes`, `outcome` (`confirmed`, `returned`, `nacked`, `timed_out`, `rejected`, `closed`), `sends`, `latency_ms` |
//!
//! `client` is the [connection name](ClientBuilder::connection_name) (empty
//! when none is set). Nothing secret is in any field: `endpoint` is the
//! broker's URI with its password redacted, errors are the broker's or the
//! socket's text, and no payload, header or property is ever logged.

pub mod backoff;
pub mod client;
pub mod config;
mod contract;
pub mod driver;
pub mod endpoint;
pub mod error;
pub mod event;
pub mod guarantees;
pub mod ids;
pub mod message;
pub mod outbox;
pub mod state;
mod stream_set;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio_timer;
pub mod topology;
pub mod transport;
mod watch;

pub use backoff::{Backoff, BackoffConfig, Jitter};
pub use client::{
    Client, ClientBuilder, ClientState, CloseSummary, Consumer, DEFAULT_URL,
    DEFAULT_WATCH_CAPACITY, Flushed, PublishFuture, PublishOptions, Queue, Received,
};
pub use config::Config;
pub use driver::Driver;
pub use endpoint::Endpoint;
pub use error::{ConfigError, ConnectError, ErrorClass, TransportError};
pub use event::{Event, Reason};
pub use ids::{ChannelId, ConnectionId, Object};
pub use message::{
    AMQPValue, Delivery, FieldTable, Message, MessageProperties, Properties, Returned,
};
pub use outbox::{Confirmation, FlushId, PublishError, PublishId};
pub use state::{ChannelState, ConnectionState, Phase};
pub use supervisor::{ChannelInput, Command, Input, Stats, Supervisor};
pub use tls::{TlsConfig, TlsErrorKind};
#[cfg(feature = "tokio")]
pub use tokio_timer::TokioTimer;
pub use topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerId, ExchangeDecl, ExchangeKind, OpId,
    QueueDecl, QueueHandle, QueueRef, TopologyError, TopologyOp,
};
pub use transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, QueueInfo, Sleep, Timer,
    TopologyOutcome, Transport,
};
