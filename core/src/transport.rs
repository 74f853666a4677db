//! The plug-in point for AMQP clients: [`Transport`], [`Connection`], [`Channel`],
//! and the [`Timer`] that keeps the driver runtime-agnostic.
//!
//! A transport translates, and nothing more: calls into its client's calls, its
//! client's errors into [`TransportError`] (whose [`class`](TransportError::class)
//! decides what happens next), and its client's notifications into the
//! [`ConnectionEvent`] and [`ChannelEvent`] streams. It never retries and holds no
//! policy: the core decides every reconnect, reopen and re-publish.
//!
//! # Contract
//!
//! - [`Connection::events`] and [`Channel::events`] are called once, right after the
//!   connection or channel is made, and the driver polls the stream for as long as
//!   the object lives, so a transport may do its bookkeeping as the stream is
//!   polled instead of in a task of its own (the lapin adapter does). The stream
//!   ends after a `Closed` event (or when the object is dropped).
//! - A connection that dies reports [`ConnectionEvent::Closed`] (I/O error, missed
//!   heartbeats, `connection.close` from the broker). A channel that the broker
//!   closes reports [`ChannelEvent::Closed`] with the reply code.
//! - The driver calls [`Channel::publish`] for one channel one message at a time, in
//!   order, after [`Channel::confirm_select`]. The call (and the first poll of its
//!   future) may happen on an application thread, inside `Client::publish`, outside
//!   any runtime the transport knows; a future that does not complete at once is
//!   polled on by the driver. The same holds for acks, for
//!   [`Channel::try_publish`] (tried first, before `publish`), and for dropping a
//!   channel or a pending write: any of them may happen on an application thread. In confirm mode the broker numbers
//!   the messages of a channel 1, 2, 3, ...; [`ChannelEvent::Ack`] and
//!   [`ChannelEvent::Nack`] carry those numbers (`multiple` = every number up to
//!   and including it). Awaiting `publish` means "handed to the client", not
//!   "confirmed".
//! - Topology calls ([`Channel::run`], `qos`, `consume`, `cancel`) are awaited one
//!   at a time per channel. An error that closes the channel (404, 406, ...) is
//!   returned from the call; the channel's `Closed` event with the same reply may
//!   come first (the core takes either as the call's answer).
//! - Nothing a broker sends may panic the transport.
//! - A transport whose client cannot hear of `connection.blocked` (it does not
//!   advertise the capability, so the broker never sends it) says so with
//!   [`Transport::reports_blocked`] returning `false`. Such a transport never
//!   reports [`ConnectionEvent::Blocked`] for a resource alarm: the broker stops
//!   reading the socket instead, so publishes wait (in the transport, then in the
//!   core), resolve `TimedOut` at their deadline, and complete once the alarm
//!   clears; the connection stays Ready and unblocked throughout.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::message::{Delivery, FieldTable, Message, Returned};
use crate::tls::TlsConfig;
use crate::topology::{ConsumeOptions, ExchangeDecl, QueueDecl, TopologyOp};

pub mod support;

/// A future that completes at a deadline; what [`Timer::sleep_until`] returns.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A clock and a way to wait for it, so that the driver needs no runtime.
///
/// The `tokio` feature of this crate provides `TokioTimer`; the simulator provides a
/// virtual clock.
pub trait Timer: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Instant;
    /// A future that completes at `deadline` (at once if it has passed).
    fn sleep_until(&self, deadline: Instant) -> Sleep;
}

/// Options for a dial that do not belong to the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Shown in the broker's management UI and `rabbitmqctl list_connections`.
    pub connection_name: Option<String>,
    /// How to make TLS connections to `amqps://` endpoints (`None`: the public
    /// webpki roots, no client certificate). Plain endpoints ignore it.
    pub tls: Option<TlsConfig>,
}

impl ConnectOptions {
    /// Options with a connection name.
    pub fn named(name: impl Into<String>) -> Self {
        ConnectOptions {
            connection_name: Some(name.into()),
            tls: None,
        }
    }

    /// These options with a TLS configuration.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Makes connections.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The connection type.
    type Connection: Connection;

    /// Opens a connection (TCP, TLS for `amqps://` with `options.tls`, AMQP
    /// handshake) to `endpoint`. Fails with [`TransportError::Auth`] for bad
    /// credentials and [`TransportError::Tls`] for a TLS handshake that fails on
    /// certificates, names or ports, so the core can classify them as refused.
    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<Self::Connection, TransportError>;

    /// Whether this transport's connections report the broker's
    /// `connection.blocked` / `connection.unblocked` as [`ConnectionEvent::Blocked`]
    /// and [`ConnectionEvent::Unblocked`]: its client advertises the
    /// `connection.blocked` capability and passes the frames on.
    ///
    /// `true` by default. A transport returns `false` when its client cannot
    /// advertise the capability; during a resource alarm its publishes then wait
    /// unannounced (see the [contract](self#contract)). Constant for a transport
    /// value: the core reads it once, when the client is built.
    fn reports_blocked(&self) -> bool {
        true
    }

    /// Whether this transport can encode `message`, beyond what
    /// [`Properties::validate`](crate::Properties::validate) already checked
    /// (the core calls that first): the reason if not. Called for every publish,
    /// on the caller's thread, before the message is accepted (once more on the
    /// driver's when the driver takes the publish); a refusal fails
    /// that message alone with [`PublishError::Invalid`](crate::PublishError::Invalid).
    /// A transport that would refuse a message later, in `publish`, costs the
    /// channel instead. `Ok` by default.
    fn check_message(&self, message: &crate::Message) -> Result<(), String> {
        let _ = message;
        Ok(())
    }

    /// What this transport's client does where clients differ, beyond
    /// [`reports_blocked`](Self::reports_blocked): see [`Capabilities`]. The
    /// full set by default; a transport turns off what its client cannot do, and
    /// its crate docs say why. Constant for a transport value.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// What a transport's client does where AMQP clients differ, and the core copes
/// either way: what [`Transport::capabilities`] returns.
///
/// Every flag is `true` by default, for a client that does all of it; a
/// transport sets `false` where its client falls short. The core's behaviour does
/// not depend on them; they say which of two documented outcomes to expect (the
/// conformance suite and the adapter suite in `amqp-rebound-tests` branch on
/// them, never on a transport's name). Non-exhaustive: start from `default()`.
///
/// ```
/// use amqp_rebound_core::transport::Capabilities;
///
/// let mut caps = Capabilities::default();
/// caps.reports_heartbeat_timeout = false;
/// assert!(caps.authentication_failure_close);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Missed heartbeats end the connection with
    /// [`TransportError::HeartbeatTimeout`]. `false`: with
    /// [`TransportError::Io`], as a socket error (both are transient).
    pub reports_heartbeat_timeout: bool,
    /// The client advertises the `authentication_failure_close` capability, so
    /// RabbitMQ refuses a bad login at once with `connection.close` 403. `false`:
    /// RabbitMQ closes the socket without a word, and only after a delay (3 s,
    /// against password guessing); the transport still reports
    /// [`TransportError::Auth`].
    pub authentication_failure_close: bool,
    /// Nothing is written on a channel after the client's `channel.close-ok`, so a
    /// publish racing the broker's `channel.close` costs only that channel.
    /// `false`: a publish queued before the broker's close can reach the wire
    /// after `close-ok`, and RabbitMQ then closes the whole connection (504
    /// CHANNEL_ERROR); the core recovers it like any connection loss.
    pub fences_channel_close: bool,
    /// Publisher confirms come in publish order: each [`ChannelEvent::Ack`] or
    /// [`ChannelEvent::Nack`] settles the lowest numbers still open. `false`: a
    /// confirm can come before those of earlier messages (each number is still
    /// confirmed once).
    pub confirms_in_order: bool,
    /// Header long strings that are not UTF-8 can be sent. `false`: the
    /// transport refuses such a message in [`Transport::check_message`].
    pub non_utf8_long_strings: bool,
    /// The client never logs the credentials. `false`: one of its log levels
    /// (named in the transport's crate docs, TRACE so far) shows the login
    /// frame, password included.
    pub keeps_credentials_out_of_logs: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            reports_heartbeat_timeout: true,
            authentication_failure_close: true,
            fences_channel_close: true,
            confirms_in_order: true,
            non_utf8_long_strings: true,
            keeps_credentials_out_of_logs: true,
        }
    }
}

/// What happens to a connection, as a stream (see [`Connection::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The connection is gone. Last event.
    Closed(TransportError),
    /// The broker sent `connection.blocked` with its reason.
    Blocked(String),
    /// The broker sent `connection.unblocked`.
    Unblocked,
}

/// One AMQP connection.
#[async_trait]
pub trait Connection: Send + Sync + 'static {
    /// The channel type.
    type Channel: Channel;

    /// Opens a channel.
    async fn open_channel(&self) -> Result<Self::Channel, TransportError>;
    /// The connection's events; called once.
    fn events(&self) -> BoxStream<'static, ConnectionEvent>;
    /// Closes the connection (200 reply), waiting for the broker's close-ok.
    async fn close(&self) -> Result<(), TransportError>;
    /// How many channels this connection may open: the `channel_max` negotiated
    /// with the broker (`u16::MAX` when it sets no limit, its 0). The core never
    /// asks for more: a pool with more channels per connection fails the dial
    /// with [`TransportError::ChannelLimit`]. `u16::MAX` by default.
    fn channel_max(&self) -> u16 {
        u16::MAX
    }
}

/// What happens on a channel, as a stream (see [`Channel::events`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChannelEvent {
    /// The channel is gone (broker `channel.close` with a reply code, or its
    /// connection died). Last event.
    Closed(TransportError),
    /// Publisher confirm: the broker took message `delivery_tag` (and all before it
    /// if `multiple`).
    Ack {
        /// Publish sequence number (1 for the first publish of the channel).
        delivery_tag: u64,
        /// Covers every earlier number too.
        multiple: bool,
    },
    /// Publisher confirm: the broker could not take the message(s).
    Nack {
        /// Publish sequence number.
        delivery_tag: u64,
        /// Covers every earlier number too.
        multiple: bool,
    },
    /// A delivery to one of the channel's consumers (boxed, like [`Self::Return`]:
    /// they are ten times the size of the other events, which stay small on the
    /// hot path of publisher confirms).
    Delivery(Box<Delivery>),
    /// A mandatory message came back unroutable (sent before its ack).
    Return(Box<Returned>),
    /// The broker cancelled a consumer (its queue was deleted, for example).
    ConsumerCancelled {
        /// The consumer's tag.
        consumer_tag: String,
    },
}

/// The real name and counts of a declared queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The name; for a server-named queue, the one the broker chose.
    pub name: String,
    /// Messages ready in it.
    pub message_count: u32,
    /// Consumers on it.
    pub consumer_count: u32,
}

/// What the broker answered to a [`TopologyOp`] (see [`Channel::run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopologyOutcome {
    /// `declare-ok`, `delete-ok` of an exchange, `bind-ok`, `unbind-ok`: nothing
    /// to read in it.
    Done,
    /// `queue.declare-ok`: the queue's real name and counts.
    Queue(QueueInfo),
    /// `queue.delete-ok`.
    QueueDeleted {
        /// Messages deleted with the queue.
        message_count: u32,
    },
}

impl TopologyOutcome {
    /// A transport answered `method` with the wrong kind of outcome.
    pub(crate) fn unexpected(&self, method: &str) -> TransportError {
        TransportError::Protocol(format!("{method} answered with {self:?}"))
    }
}

/// One AMQP channel.
///
/// A transport implements [`run`](Channel::run) for every topology change; the
/// named declare, delete, bind and unbind methods are written once, here, on top
/// of it.
#[async_trait]
pub trait Channel: Send + Sync + 'static {
    /// The channel's events; called once.
    fn events(&self) -> BoxStream<'static, ChannelEvent>;
    /// `confirm.select`: from now on publishes are numbered and confirmed.
    async fn confirm_select(&self) -> Result<(), TransportError>;
    /// `basic.qos` with `global = false` (applies to consumers started after it).
    async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError>;
    /// Runs one declare, delete, bind or unbind (`exchange.*`, `queue.*`): every
    /// topology change goes through here, so a transport implements it once. The
    /// answer says what the broker sent back ([`TopologyOutcome`]). `basic.qos`,
    /// `basic.consume` and `basic.cancel` have methods of their own
    /// ([`qos`](Channel::qos), [`consume`](Channel::consume),
    /// [`cancel`](Channel::cancel)) and never come here; a transport answers such an
    /// op, or one it does not know, with [`TopologyOp::unsupported`].
    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError>;
    /// `exchange.declare`, through [`run`](Channel::run).
    async fn declare_exchange(&self, decl: &ExchangeDecl) -> Result<(), TransportError> {
        self.run(&TopologyOp::DeclareExchange(decl.clone()))
            .await
            .map(drop)
    }
    /// `exchange.delete`, through [`run`](Channel::run).
    async fn delete_exchange(&self, name: &str) -> Result<(), TransportError> {
        let name = name.to_owned();
        self.run(&TopologyOp::DeleteExchange { name })
            .await
            .map(drop)
    }
    /// `queue.declare`, through [`run`](Channel::run): returns the queue's real
    /// name.
    async fn declare_queue(&self, decl: &QueueDecl) -> Result<QueueInfo, TransportError> {
        match self.run(&TopologyOp::DeclareQueue(decl.clone())).await? {
            TopologyOutcome::Queue(info) => Ok(info),
            other => Err(other.unexpected("queue.declare")),
        }
    }
    /// `queue.delete`, through [`run`](Channel::run): returns how many messages
    /// were deleted with it.
    async fn delete_queue(&self, name: &str) -> Result<u32, TransportError> {
        let name = name.to_owned();
        match self.run(&TopologyOp::DeleteQueue { name }).await? {
            TopologyOutcome::QueueDeleted { message_count } => Ok(message_count),
            other => Err(other.unexpected("queue.delete")),
        }
    }
    /// `queue.bind`, through [`run`](Channel::run).
    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), TransportError> {
        let op = TopologyOp::BindQueue {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        self.run(&op).await.map(drop)
    }
    /// `queue.unbind`, through [`run`](Channel::run).
    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), TransportError> {
        let op = TopologyOp::UnbindQueue {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        self.run(&op).await.map(drop)
    }
    /// `exchange.bind`, through [`run`](Channel::run).
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), TransportError> {
        let op = TopologyOp::BindExchange {
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        self.run(&op).await.map(drop)
    }
    /// `exchange.unbind`, through [`run`](Channel::run).
    async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), TransportError> {
        let op = TopologyOp::UnbindExchange {
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        self.run(&op).await.map(drop)
    }
    /// `basic.publish`. Returns once the client took the message; the confirm
    /// arrives later as an event.
    async fn publish(&self, message: &Message) -> Result<(), TransportError>;
    /// `basic.publish` if the client takes the message without waiting:
    /// `Some(Ok(()))` when it did, `None` when it would have to wait or cannot
    /// tell, and then **nothing was sent**: the driver calls
    /// [`publish`](Channel::publish) instead. It spares the boxed future of
    /// `publish` on the common path. The default always answers `None`.
    fn try_publish(&self, message: &Message) -> Option<Result<(), TransportError>> {
        let _ = message;
        None
    }
    /// `basic.consume` with the given tag; deliveries arrive as events. The core
    /// sends the consumer's prefetch with [`Channel::qos`] just before, and passes
    /// `options.prefetch` as `None`.
    ///
    /// No delivery of this consumer may come out of the events stream before
    /// this call has returned `Ok` (the broker's consume-ok): a tag the
    /// application gives again after a cancel names the new consumer only from
    /// then on, and deliveries with it before that are the cancelled one's.
    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: &ConsumeOptions,
    ) -> Result<(), TransportError>;
    /// `basic.cancel`.
    async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError>;
    /// `basic.ack`.
    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError>;
    /// `basic.nack`.
    async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TransportError>;
    /// `basic.reject`.
    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError>;
    /// `channel.close` (200 reply).
    async fn close(&self) -> Result<(), TransportError>;
}
