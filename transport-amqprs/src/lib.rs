//! `amqp-rebound-amqprs`: the transport adapter that binds
//! [`amqp-rebound-core`](amqp_rebound_core) to [amqprs] 2 on tokio.
//!
//! It translates, and nothing more: core's transport calls into amqprs calls,
//! amqprs's errors into core's classified [`TransportError`], and amqprs's
//! notifications (its `ConnectionCallback` and `ChannelCallback`,
//! `listen_network_io_failure`, consumer queues) into core's event streams. It
//! holds no policy and never retries: recovery is the core's job.
//!
//! ```no_run
//! use amqp_rebound_core::transport::{Channel, ConnectOptions, Connection, Transport};
//! use amqp_rebound_core::{Endpoint, Message, QueueDecl};
//! use amqp_rebound_amqprs::AmqprsTransport;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let endpoint = Endpoint::parse("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! let connection = AmqprsTransport::new()
//!     .connect(&endpoint, &ConnectOptions::named("billing"))
//!     .await?;
//! let channel = connection.open_channel().await?;
//! let events = channel.events(); // acks, returns, deliveries, closure
//! channel.confirm_select().await?;
//! let queue = channel.declare_queue(&QueueDecl::server_named()).await?;
//! channel.publish(&Message::new("", queue.name, "hello")).await?;
//! # drop(events);
//! # Ok(())
//! # }
//! ```
//!
//! # Runtime
//!
//! amqprs runs on tokio only: each connection has a reader and a writer task, each
//! channel a dispatcher task. This crate runs them, and its own event tasks (one
//! per connection, one per channel, not one per message), on the runtime from
//! [`AmqprsTransport::with_handle`], or else the runtime that calls
//! [`connect`](Transport::connect) (outside of one, `connect` fails instead of
//! panicking). Calls that make amqprs spawn (opening a connection or channel) and
//! the drops of amqprs objects are moved onto that runtime, so the core's driver
//! may run on any executor.
//!
//! # Mapping
//!
//! | core                           | amqprs                                                  |
//! |--------------------------------|---------------------------------------------------------|
//! | [`Transport::connect`]         | `Connection::open` (on the runtime, so that a panic in amqprs's handshake code becomes an error), `register_callback` |
//! | [`ConnectionEvent::Blocked`] / `Unblocked` | `ConnectionCallback::blocked` / `unblocked` (see the limits: RabbitMQ does not send them to amqprs, and [`Transport::reports_blocked`] is `false`) |
//! | [`ConnectionEvent::Closed`]    | `ConnectionCallback::close` (the broker's reply code), `listen_network_io_failure`, the end of amqprs's reader task; our own `close` |
//! | [`ChannelEvent::Ack`] / `Nack` | `ChannelCallback::publish_ack` / `publish_nack`: the broker's delivery tag and `multiple` flag, unchanged |
//! | [`ChannelEvent::Return`]       | `ChannelCallback::publish_return`                        |
//! | [`ChannelEvent::Delivery`]     | `basic_consume_rx`: one queue per consumer, read by the channel's event task |
//! | [`ChannelEvent::ConsumerCancelled`] | `ChannelCallback::cancel` (the broker's `basic.cancel`) |
//! | [`ChannelEvent::Closed`]       | `ChannelCallback::close` (the broker's reply code), the end of amqprs's dispatcher task, its connection's end, our own `close` |
//!
//! Errors ([`TransportError`]):
//!
//! | amqprs                                  | core                                                  |
//! |-----------------------------------------|-------------------------------------------------------|
//! | `NetworkError` (refused, reset)         | `Io`                                                  |
//! | `NetworkError` with a rustls error's text | `Tls { kind, .. }`                                  |
//! | a plain dial reset under the handshake, to a port that answers TLS | `Tls { kind: TlsPort, .. }` |
//! | network failure or missed heartbeats on an open connection | `Io` (amqprs reports both as one flag) |
//! | `connection.close` / `channel.close` from the broker | `Reply { code, text }`; during `connect`, 403 is `Auth` |
//! | the socket closed or reset by the broker during the handshake | `Auth` (see the limits)          |
//! | a dial slower than the timeout          | `Timeout`                                             |
//! | other (internal channels, unexpected frames, usage) | `Protocol`; a call on a channel or connection that has closed returns the error it closed with |
//!
//! Error texts never contain the endpoint's password (amqprs's do not; this crate
//! also scrubs them).
//!
//! # What amqprs does, and the limits that follow
//!
//! Read in the amqprs 2.1.5 sources and measured against RabbitMQ 3.10:
//!
//! - **Blocking: unsupported.** amqprs hard-codes the client capabilities it sends
//!   in `connection.start-ok` (only `consumer_cancel_notify`);
//!   `OpenConnectionArguments` has no way to add `connection.blocked`. RabbitMQ
//!   therefore never sends `connection.blocked` to an amqprs client, and this
//!   adapter never reports [`ConnectionEvent::Blocked`] for a real alarm (the
//!   callback is wired, and a broker that sent the frames anyway would be reported).
//!   It says so: [`Transport::reports_blocked`] is `false` (and so is
//!   `Client::reports_blocked` of a client over it). While an alarm blocks
//!   publishing, the broker stops reading the socket (`rabbitmqctl
//!   list_connections` shows the connection `blocked`): publishes queue up in
//!   amqprs and then wait in [`Channel::publish`], their confirms do not arrive,
//!   the client's connection stays Ready with no `Event::Blocked`, a publish whose
//!   deadline passes resolves `PublishError::TimedOut` at its deadline, and the
//!   others are confirmed once the alarm clears (with no `Event::Unblocked`). The
//!   conformance suite checks exactly this. (`amqprs::Connection::blocked()`
//!   *sends* a `connection.blocked`; it reports nothing.)
//! - **Confirms arrive only as callbacks**, with the broker's delivery tag and its
//!   `multiple` flag, which this adapter passes on unchanged (RabbitMQ numbers a
//!   channel's publishes 1, 2, 3 ... after `confirm.select`, as the core expects).
//!   There is no per-publish future.
//! - **Returns come before their ack.** amqprs's per-channel dispatcher handles the
//!   broker's frames in order and awaits each callback; RabbitMQ sends
//!   `basic.return` before the `basic.ack` of the same message, and both go through
//!   one queue to the event stream.
//! - **Missed heartbeats and socket errors look alike.** amqprs's reader gives up
//!   after two heartbeat intervals without a frame and signals the same "network
//!   failure" as for a socket error, so both become [`TransportError::Io`] (its
//!   text says "socket error or missed heartbeats"), never
//!   [`TransportError::HeartbeatTimeout`] (both are transient to the core). With
//!   `heartbeat=2`, a silent link is declared lost 4 s after its last frame.
//! - **Heartbeats cannot be turned off.** amqprs's reader and writer need a
//!   heartbeat of at least 2 s (with 0 its reader gives up at once, with 1 its
//!   writer sends heartbeats in a busy loop): `heartbeat=0` in the URI asks for
//!   amqprs's default of 60 s (the broker's value wins if lower) and `heartbeat=1`
//!   asks for 2 s. A broker that itself insists on 1 s is not supported.
//! - **Bad credentials drop the socket.** amqprs does not advertise
//!   `authentication_failure_close`, so RabbitMQ answers a wrong user or password
//!   by closing the socket without a `connection.close` (seen on Linux as a
//!   connection reset), and only after a 3 s delay (RabbitMQ's
//!   `SILENT_CLOSE_DELAY`, against password guessing): a wrong password is reported
//!   3 s after the dial, and a client with bad credentials dials every 3 s plus its
//!   backoff delay instead of every backoff delay. A socket closed or reset by the
//!   peer during the handshake is therefore reported as [`TransportError::Auth`]
//!   (amqprs does not say at which handshake step it failed); a proxy or load
//!   balancer in front of the broker that accepts and then drops connections is
//!   misreported the same way. The core still tries the next host of its list at
//!   once after a refusal, and waits at its backoff cap (5-10 s with the default
//!   cap and full jitter) only once every host refused; with a single host, such a
//!   proxy costs that delay per drop. A refused
//!   dial (nothing listening) stays `Io`, and a refused virtual host is the
//!   broker's `Reply` 530.
//! - **Channel closure** is reported by amqprs through `ChannelCallback::close`
//!   before it fails the calls waiting on the channel, so a failing call returns
//!   the broker's reply code. A call on a closed channel is refused here, not sent:
//!   amqprs would write it, and a frame on a closed channel is a connection error
//!   (504 CHANNEL_ERROR, "expected 'channel.open'"). Publishes, acks, nacks and
//!   rejects are also ordered with the close: one that has passed its check is
//!   queued before amqprs's `close-ok`, never after it, so a burst of publishes
//!   on a channel the broker closes (a 404 on one of them) costs that channel
//!   only. Topology calls and `consume` / `cancel` (request and reply in one
//!   amqprs call) are only checked, so one that races the broker's close by a
//!   few microseconds can still cost the connection.
//! - **Channel ids of broker-closed channels are not reused.** amqprs frees a
//!   channel id only after a close it started; after `channel_max` (2047 on
//!   RabbitMQ) broker-side channel closures on one connection, amqprs's reader
//!   panics on the next `open_channel` and the connection is reported closed.
//! - **A panic inside amqprs** (it unwraps in places on what the broker sends) ends
//!   the task it happens in: in the handshake it becomes a `Protocol` error of
//!   `connect`; in the reader or a dispatcher, the connection or channel is
//!   reported `Closed` with a `Protocol` error.
//! - **Field tables.** amqprs has no short-string field value (RabbitMQ reads `s`
//!   as a short integer), so a `ShortString` header goes out, and comes back, as a
//!   long string; a `LongString` that is not UTF-8 is refused (amqprs holds long
//!   strings as Rust `String`s). Nor can amqprs read one: a delivery whose
//!   headers hold such a string (another client may publish one) fails amqprs's
//!   frame decoder, whose reader then drops the connection (reported as an
//!   `Io` loss); the broker hands the message to the consumer again after the
//!   reconnect, so a consumer of a queue holding one never gets past it.
//!   Consume such queues over lapin, which reads them.
//! - **Short strings.** amqprs panics on names, routing keys, properties and a
//!   virtual host longer than 255 bytes; this crate refuses them with
//!   [`TransportError::Protocol`] before they reach amqprs. AMQPLAIN credentials of
//!   128 bytes or more are refused for the same reason; RABBIT-CR-DEMO and
//!   ANONYMOUS are not supported by amqprs.
//! - **Tuning.** amqprs accepts the broker's `channel_max` and `frame_max`; the
//!   URI's values for them are ignored.
//! - **Dial timeout.** [`AmqprsTransport::with_connect_timeout`], or else the URI's
//!   `connection_timeout`, bounds the whole dial (TCP, TLS, handshake) and fails
//!   with [`TransportError::Timeout`]; amqprs has none of its own.
//! - `ConsumeOptions::prefetch` is applied with `basic.qos` (`global = false`) right
//!   before `basic.consume`.
//! - **Logging.** This crate does not enable amqprs's `traces` feature, and amqprs
//!   logs nothing without it. With it (Cargo features are unified, so any crate in
//!   the build can turn it on), amqprs logs every frame it sends at TRACE level,
//!   `connection.start-ok` included, whose SASL response holds the password: keep
//!   it off, or amqprs's TRACE level off, in production.
//! - **TLS** (`amqps://`): amqprs's `TlsAdaptor` gets the rustls client
//!   configuration the core builds from [`ConnectOptions::tls`]
//!   (`amqp_rebound_core::tls::rustls`: private CA, client certificate, native
//!   roots, server name; the public webpki roots without one) and the
//!   process-wide default provider if the application installed one, else
//!   *ring*, without installing it. EXTERNAL authentication
//!   (`?auth_mechanism=external` and a client certificate) works. amqprs passes
//!   rustls's errors on as text: they are recognised by it
//!   ([`error_kind_from_text`], tested against rustls's own wording). A dial
//!   that dies under the handshake without a word within 2 s is explained by
//!   asking the port again ([`explain_dead_handshake`]): this tells a plain
//!   dial to a TLS port, and a refused client certificate whose alert
//!   RabbitMQ's reset hid, from a refused login (which RabbitMQ closes only
//!   after 3 s, and is not asked about).
//!
//! [`error_kind_from_text`]: amqp_rebound_core::tls::rustls::error_kind_from_text
//! [`explain_dead_handshake`]: amqp_rebound_core::tls::rustls::explain_dead_handshake
//!
//! [amqprs]: https://docs.rs/amqprs
//! [`ConnectionEvent::Blocked`]: amqp_rebound_core::ConnectionEvent::Blocked
//! [`ConnectionEvent::Closed`]: amqp_rebound_core::ConnectionEvent::Closed
//! [`ChannelEvent::Ack`]: amqp_rebound_core::ChannelEvent::Ack
//! [`ChannelEvent::Return`]: amqp_rebound_core::ChannelEvent::Return
//! [`ChannelEvent::Delivery`]: amqp_rebound_core::ChannelEvent::Delivery
//! [`ChannelEvent::ConsumerCancelled`]: amqp_rebound_core::ChannelEvent::ConsumerCancelled
//! [`ChannelEvent::Closed`]: amqp_rebound_core::ChannelEvent::Closed
//! [`Channel::publish`]: amqp_rebound_core::Channel::publish

mod channel;
mod connection;
mod convert;

use std::time::Duration;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::tls::rustls::{self, ClientConfigCache};
use amqp_rebound_core::transport::{Capabilities, ConnectOptions, Transport, support};
use async_trait::async_trait;
use tokio::runtime::Handle;

pub use amqp_rebound_core as core;
pub use channel::AmqprsChannel;
pub use connection::AmqprsConnection;

/// Makes [`AmqprsConnection`]s; core's [`Transport`] over amqprs.
///
/// Cheap to clone. Holds no connection itself.
#[derive(Debug, Clone, Default)]
pub struct AmqprsTransport {
    handle: Option<Handle>,
    connect_timeout: Option<Duration>,
    tls: ClientConfigCache,
}

impl AmqprsTransport {
    /// A transport on the tokio runtime that calls `connect`, with no dial timeout
    /// beyond the URI's `connection_timeout`.
    pub fn new() -> Self {
        AmqprsTransport::default()
    }

    /// Runs amqprs and the event tasks on this runtime, whichever executor calls
    /// `connect`.
    pub fn with_handle(mut self, handle: Handle) -> Self {
        self.handle = Some(handle);
        self
    }

    /// Fails a dial (TCP, TLS and AMQP handshake) that takes longer than `timeout`
    /// with [`TransportError::Timeout`]. Takes precedence over the URI's
    /// `connection_timeout`.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    fn handle(&self) -> Result<Handle, TransportError> {
        support::runtime_handle(
            self.handle.as_ref(),
            "amqp-rebound-amqprs",
            "AmqprsTransport::with_handle",
        )
    }
}

#[async_trait]
impl Transport for AmqprsTransport {
    type Connection = AmqprsConnection;

    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<AmqprsConnection, TransportError> {
        let handle = self.handle()?;
        let config = match endpoint.is_tls() {
            true => Some(self.tls.get(options.tls.as_ref())?),
            false => None,
        };
        let arguments = convert::open_arguments(endpoint, options, config.clone())?;
        let timeout = self
            .connect_timeout
            .or_else(|| convert::uri_connect_timeout(endpoint));
        let password = endpoint.password().to_owned();
        let (endpoint, tls) = (endpoint.clone(), options.tls.clone());
        // On the runtime: amqprs spawns its tasks with `tokio::spawn`, the timeout
        // needs tokio's timer, and a panic in amqprs's handshake code (it unwraps
        // what the broker sends) ends this task instead of the caller.
        let dial = handle.spawn({
            let handle = handle.clone();
            let password = password.clone();
            async move {
                let started = std::time::Instant::now();
                let open = amqprs::connection::Connection::open(&arguments);
                let opened = match timeout {
                    Some(limit) => match tokio::time::timeout(limit, open).await {
                        Ok(opened) => opened,
                        Err(_) => return Err(TransportError::Timeout),
                    },
                    None => open.await,
                };
                match opened {
                    Ok(connection) => AmqprsConnection::start(connection, handle, password).await,
                    Err(error)
                        if convert::died_without_a_word(&error)
                            && started.elapsed() < rustls::EXPLAIN_WITHIN =>
                    {
                        // maybe a TLS error that RabbitMQ's reset hid
                        let mapped = convert::map_open_error(&error, &password);
                        let explained = tokio::task::spawn_blocking(move || {
                            rustls::explain_dead_handshake(&endpoint, tls.as_ref(), config, mapped)
                        })
                        .await;
                        match explained {
                            Ok(error) => Err(convert::scrub(error, &password)),
                            Err(join) => Err(TransportError::Protocol(format!(
                                "amqprs failed while connecting: {join}"
                            ))),
                        }
                    }
                    Err(error) => Err(convert::map_open_error(&error, &password)),
                }
            }
        });
        match dial.await {
            Ok(result) => result,
            Err(join) => Err(convert::scrub(
                TransportError::Protocol(format!("amqprs failed while connecting: {join}")),
                &password,
            )),
        }
    }

    /// `false`: amqprs cannot advertise the `connection.blocked` capability, so
    /// RabbitMQ never sends it `connection.blocked` (see the limits in the crate
    /// docs).
    fn reports_blocked(&self) -> bool {
        false
    }

    /// amqprs reports missed heartbeats as a socket error, does not advertise
    /// `authentication_failure_close`, and cannot send header long strings that
    /// are not UTF-8 (see the limits in the crate docs).
    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.reports_heartbeat_timeout = false;
        capabilities.authentication_failure_close = false;
        capabilities.non_utf8_long_strings = false;
        capabilities
    }

    /// amqprs keeps header long strings as Rust `String`s: a long string that is
    /// not UTF-8 cannot be sent (a byte array can).
    fn check_message(&self, message: &amqp_rebound_core::Message) -> Result<(), String> {
        match &message.properties.headers {
            Some(headers) => convert::check_utf8_table("headers", headers),
            None => Ok(()),
        }
    }
}
