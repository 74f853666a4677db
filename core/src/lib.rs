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
//! - **application commands**: [`Supervisor::checkout`] (a Ready channel) and
//!   [`Input::Close`];
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
//! use amqp_rebound_core::{Command, Config, Input, Supervisor, endpoint::parse_hosts};
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
//!         sup.handle(start + Duration::from_millis(4), Input::ChannelOpened { channel, generation });
//!     }
//! }
//! assert!(sup.is_all_ready());
//! assert!(sup.checkout().is_ok());
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
//!
//! With the defaults, an outage ends for the user at most about 2 s after the
//! broker accepts again (the longest delay), while each connection dials at most
//! once per 1-2 s during it.

pub mod backoff;
pub mod client;
pub mod config;
pub mod driver;
pub mod endpoint;
pub mod error;
pub mod event;
pub mod ids;
pub mod message;
pub mod outbox;
pub mod state;
mod stream_set;
pub mod supervisor;
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio_timer;
pub mod topology;
pub mod transport;

pub use backoff::{Backoff, BackoffConfig, Jitter};
pub use client::{
    Client, ClientBuilder, ClientState, Consumer, DEFAULT_URL, Flushed, PublishFuture,
    PublishOptions, Queue, Received,
};
pub use config::Config;
pub use driver::Driver;
pub use endpoint::Endpoint;
pub use error::{ConfigError, ConnectError, ErrorClass, TransportError};
pub use event::{Event, Reason};
pub use ids::{ChannelId, ConnectionId, Object};
pub use message::{Delivery, FieldTable, Message, Properties, Returned};
pub use outbox::{Confirmation, FlushId, PublishError, PublishId};
pub use state::{ChannelState, ConnectionState, Phase};
pub use supervisor::{Checkout, Command, Input, NotReady, Stats, Supervisor};
pub use tls::{TlsConfig, TlsErrorKind};
#[cfg(feature = "tokio")]
pub use tokio_timer::TokioTimer;
pub use topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerId, ExchangeDecl, ExchangeKind, OpId,
    QueueDecl, QueueHandle, QueueRef, TopologyError, TopologyOp,
};
pub use transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, QueueInfo, Sleep, Timer,
    Transport,
};
