//! `amqp-rebound-lapin`: the transport adapter that binds
//! [`amqp-rebound-core`](amqp_rebound_core) to [lapin] 4 on tokio.
//!
//! It translates, and nothing more: core's transport calls into lapin calls,
//! lapin's errors into core's classified [`TransportError`], and lapin's
//! notifications (connection events, confirms, returns, deliveries) into core's
//! event streams. It holds no policy and never retries: recovery is the core's job,
//! so lapin's own auto-recovery stays off (and lapin's dial backoff stays at its
//! default of zero retries).
//!
//! ```no_run
//! use amqp_rebound_core::transport::{Channel, ConnectOptions, Connection, Transport};
//! use amqp_rebound_core::{Endpoint, Message, QueueDecl};
//! use amqp_rebound_lapin::LapinTransport;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let endpoint = Endpoint::parse("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! let connection = LapinTransport::new()
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
//! lapin runs each connection's socket on a thread of its own and everything else
//! (heartbeats, its internal calls) on an async runtime; this crate makes that
//! runtime tokio, from [`LapinTransport::with_handle`] or else the runtime that
//! calls [`connect`](Transport::connect) (outside of one, `connect` fails instead of
//! panicking). A connection's event stream is fed by one tokio task; a channel's
//! event stream does its own bookkeeping as it is polled (no task per channel, none
//! per message). A multi-threaded runtime is the safe choice:
//! lapin's socket thread drives the runtime through `Handle::block_on`, which on a
//! current-thread runtime only works while that runtime's own thread is inside
//! `block_on` (as in `#[tokio::test]`).
//!
//! # Mapping
//!
//! | core                           | lapin                                                   |
//! |--------------------------------|---------------------------------------------------------|
//! | [`Transport::connect`]         | the socket opened with `AMQPUriTcpExt::connect_async`, then handed to `Connection::connector`; `connection_name` client property |
//! | [`ConnectionEvent::Blocked`] / `Unblocked` | `events_listener()`: `ConnectionBlocked` / `ConnectionUnblocked` |
//! | [`ConnectionEvent::Closed`]    | `events_listener()`: `Error` while the connection is no longer connected; our own `close` |
//! | [`ChannelEvent::Ack`] / `Nack` | the `PublisherConfirm` of each publish, numbered 1, 2, 3 ... per channel; a run of in-order acks as one `multiple` ack |
//! | [`ChannelEvent::Return`]       | the returned message lapin attaches to a confirm         |
//! | [`ChannelEvent::Delivery`]     | the `Consumer` stream of each `consume`                  |
//! | [`ChannelEvent::ConsumerCancelled`] | a `Consumer` stream that ends while its channel is open and we did not cancel it |
//! | [`ChannelEvent::Closed`]       | a failed confirm or consumer, a channel error on `events_listener()`, its connection's end, our own `close` |
//!
//! Errors ([`TransportError`]):
//!
//! | lapin `ErrorKind`                   | core                                                  |
//! |-------------------------------------|-------------------------------------------------------|
//! | `IOError`, `RuntimeShutdownError`   | `Io` (refused, reset); `Tls` when it holds a rustls error |
//! | the socket's TCP connect or TLS handshake (before lapin) | `Io`; `Tls { kind, .. }` for a rustls error, or for what the port answers when asked again |
//! | `MissingHeartbeatError`             | `HeartbeatTimeout`                                    |
//! | `ProtocolError` (reply code)        | `Reply { code, text }`; during `connect`, 403 is `Auth` |
//! | `AuthProviderError`                 | `Auth`                                                |
//! | other (invalid state, parsing, limits) | `Protocol`; a call on a channel or connection that already closed returns the error it closed with |
//!
//! Error texts never contain the endpoint's password (lapin's do not; this crate
//! also scrubs them).
//!
//! # What lapin does, and the limits that follow
//!
//! Measured against lapin 4.12.3 and RabbitMQ 3.10:
//!
//! - **Channel closure has no event of its own.** When the broker closes a channel
//!   (404 on publishing to a missing exchange, 406 on an unknown delivery tag),
//!   lapin fails that channel's pending confirms and consumers with the error, fails
//!   a pending call with it, and sends the error on the *connection's*
//!   `events_listener()` — without the channel number. This crate reports the first
//!   of these it sees; for the last it matches the error to the channels that lapin
//!   no longer calls open. Two channels closed by the broker at the same instant,
//!   with neither a pending confirm nor a consumer, may swap their reply codes.
//! - **A channel the broker closes can take its connection with it.** On the
//!   broker's `channel.close` lapin queues `close-ok` on its normal-priority frame
//!   queue, which it always empties before the low-priority queue where
//!   `basic_publish` puts its frames, and it does not drop that channel's frames
//!   still queued. A publish queued before the close arrived can therefore reach
//!   the wire after `close-ok`; RabbitMQ then closes the whole connection with 504
//!   CHANNEL_ERROR. The client recovers the connection and republishes what was
//!   unconfirmed (nothing is lost), but every channel of that connection reopens.
//!   Seen in 3–5 of 15 runs of the conformance case that publishes to a missing
//!   exchange. lapin offers no hook between the broker's close and its `close-ok`
//!   (the amqprs adapter uses the one amqprs has), so this crate cannot prevent it;
//!   waiting for each publish to be written first would only narrow the window, at
//!   the cost of the pipelining that makes this adapter faster than lapin used as
//!   documented. The fix belongs in lapin (`Channel::on_channel_close_received`:
//!   drop the channel's queued frames, or queue `close-ok` behind them).
//! - **A deleted queue ends the consumer stream without an error.** lapin handles
//!   the broker's `basic.cancel` by ending the `Consumer` stream; this crate reports
//!   [`ChannelEvent::ConsumerCancelled`] for a stream that ends while the channel is
//!   open and [`Channel::cancel`] was not called for its tag.
//! - **Returns ride on confirms.** lapin queues a `basic.return` and hands it to the
//!   next confirm it resolves. With a `multiple` ack that may be any of the
//!   messages the ack covers, so the `Return` is emitted before every ack resolved
//!   with it, but which publish it belongs to can only be told by its content
//!   (its properties or headers), not by sequence number. Returns are reported in
//!   confirm mode only (lapin keeps the others for `wait_for_confirms`).
//! - **Acks are reported one by one** (`multiple: false`): lapin resolves each
//!   publish's confirm separately even when the broker acks many at once, and
//!   not always in publish order (each number is still confirmed once).
//! - **Missed heartbeats** are detected by lapin after about twice the negotiated
//!   interval (the `heartbeat` query option of the URI) and reported as
//!   [`TransportError::HeartbeatTimeout`].
//! - **connection.blocked** is reported when the broker sends it (lapin advertises
//!   the capability). A block that arrives while `connect` hands the connection over
//!   is reported with a generic reason.
//! - **A dial whose socket lapin fails to open leaves two tasks alive for
//!   good,** so this crate opens the socket itself. In lapin 4.12.3 the socket
//!   thread (`IoLoop::start`, `io_loop.rs`) returns from a failed TCP connect
//!   or TLS handshake through `?`, before the `internal_rpc.stop()` of its
//!   normal exit. The internal RPC task (`InternalRPC::run`, spawned by
//!   `InternalRPC::start`, `internal_rpc.rs`) holds a sender of its own command
//!   queue, so it waits for commands forever; and the failed `Connection`,
//!   dropped while still `Connecting` (`Frames::clear_connection_steps`), asks
//!   that task to close it (`ConnectionCloser::drop`), which spawns a
//!   `connection.close` waiting for a `close-ok` that no socket will bring.
//!   Measured with lapin alone: two tasks per refused dial or failed TLS
//!   handshake; none per refused login or per socket the peer closes, which end
//!   the thread through its normal exit. This crate opens the socket as lapin
//!   would (`AMQPUriTcpExt::connect_async`), and hands it to
//!   `Connection::connector`: a dial that fails there never reaches lapin
//!   (`tests/task_leak.rs`: no task left after 50 refused dials, 50 failed TLS
//!   handshakes or 50 refused logins). The fix belongs in lapin: in
//!   `IoLoop::start`, call `internal_rpc.stop()` before
//!   `clear_connection_steps` on that error path (measured: with that line,
//!   lapin alone leaks nothing).
//! - **Dial timeout.** [`LapinTransport::with_connect_timeout`], or else the URI's
//!   `connection_timeout`, bounds the whole dial (TCP, TLS, handshake) and fails
//!   it with [`TransportError::Timeout`] (lapin's own socket opening does not
//!   read `connection_timeout` on its async path, so the adapter applies it).
//! - **An `auth_mechanism` the broker does not offer** (RabbitMQ offers PLAIN and
//!   AMQPLAIN, and EXTERNAL with its TLS plugin) is not told apart: RabbitMQ
//!   closes the socket during the handshake, and the dial fails as an I/O loss.
//! - **Short strings.** lapin panics on names, routing keys and properties longer
//!   than 255 bytes; this crate refuses them with [`TransportError::Protocol`]
//!   before they reach lapin.
//! - `ConsumeOptions::prefetch` is applied with `basic.qos` (`global = false`) right
//!   before `basic.consume`.
//! - **Logging.** lapin's `io_loop` logs the frames it sends at TRACE level,
//!   `connection.start-ok` included, whose SASL PLAIN response holds the password
//!   (as bytes): keep lapin's TRACE level off in production.
//! - **TLS** (`amqps://`): the socket's TLS is rustls with the client
//!   configuration the core builds from [`ConnectOptions::tls`]
//!   (`amqp_rebound_core::tls::rustls`: private CA, client certificate, native
//!   roots, server name; the public webpki roots without one) and the
//!   process-wide default provider if the application installed one, else
//!   *ring*. lapin's own TLS configuration (`OwnedTLSConfig`, PEM strings and
//!   PKCS#12 only, no control of the roots) is not used. EXTERNAL
//!   authentication (`?auth_mechanism=external` and a client certificate)
//!   works. A dial that dies under the handshake without a word within 2 s is
//!   explained by asking the port again (see [`explain_dead_handshake`]):
//!   RabbitMQ's reset can hide a refused client certificate's alert, or that a
//!   plain dial reached a TLS port.
//!
//! [`explain_dead_handshake`]: amqp_rebound_core::tls::rustls::explain_dead_handshake
//!
//! [lapin]: https://docs.rs/lapin
//! [`ConnectionEvent::Blocked`]: amqp_rebound_core::ConnectionEvent::Blocked
//! [`ConnectionEvent::Closed`]: amqp_rebound_core::ConnectionEvent::Closed
//! [`ChannelEvent::Ack`]: amqp_rebound_core::ChannelEvent::Ack
//! [`ChannelEvent::Return`]: amqp_rebound_core::ChannelEvent::Return
//! [`ChannelEvent::Delivery`]: amqp_rebound_core::ChannelEvent::Delivery
//! [`ChannelEvent::ConsumerCancelled`]: amqp_rebound_core::ChannelEvent::ConsumerCancelled
//! [`ChannelEvent::Closed`]: amqp_rebound_core::ChannelEvent::Closed
//! [`Channel::cancel`]: amqp_rebound_core::Channel::cancel

mod channel;
mod connection;
mod convert;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::tls::rustls::{self, ClientConfigCache};
use amqp_rebound_core::transport::{Capabilities, ConnectOptions, Transport, support};
use async_rs::TokioRuntime;
use async_rs::traits::Reactor;
use async_trait::async_trait;
use lapin::ConnectionProperties;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use tokio::runtime::Handle;

pub use amqp_rebound_core as core;
pub use channel::LapinChannel;
pub use connection::LapinConnection;

/// Makes [`LapinConnection`]s; core's [`Transport`] over lapin.
///
/// Cheap to clone. Holds no connection itself.
#[derive(Debug, Clone, Default)]
pub struct LapinTransport {
    handle: Option<Handle>,
    connect_timeout: Option<Duration>,
    tls: ClientConfigCache,
}

impl LapinTransport {
    /// A transport on the tokio runtime that calls `connect`, with no dial timeout
    /// beyond the URI's `connection_timeout` (which bounds the whole dial).
    pub fn new() -> Self {
        LapinTransport::default()
    }

    /// Runs lapin and the event tasks on this runtime, whichever executor calls
    /// `connect`.
    pub fn with_handle(mut self, handle: Handle) -> Self {
        self.handle = Some(handle);
        self
    }

    /// Fails a dial (TCP, TLS and AMQP handshake) that takes longer than `timeout`
    /// with [`TransportError::Timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    fn handle(&self) -> Result<Handle, TransportError> {
        support::runtime_handle(
            self.handle.as_ref(),
            "amqp-rebound-lapin",
            "LapinTransport::with_handle",
        )
    }
}

#[async_trait]
impl Transport for LapinTransport {
    type Connection = LapinConnection;

    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<LapinConnection, TransportError> {
        let handle = self.handle()?;
        let mut properties = ConnectionProperties::default();
        if let Some(name) = &options.connection_name {
            properties = properties.with_connection_name(name.as_str().into());
        }
        let uri = endpoint.amqp_uri().clone();
        let config = match endpoint.is_tls() {
            true => Some(self.tls.get(options.tls.as_ref())?),
            false => None,
        };
        let tls = match &config {
            Some(config) => {
                let name = rustls::server_name(options.tls.as_ref(), endpoint.host())?;
                Some((
                    RustlsConnector::from(Arc::clone(config)),
                    name.to_str().into_owned(),
                ))
            }
            None => None,
        };
        let runtime = async_rs::Runtime::tokio_with_handle(handle.clone());
        let timeout = self
            .connect_timeout
            .or_else(|| support::uri_connect_timeout(endpoint));
        let started = std::time::Instant::now();
        // Run the dial on the runtime itself, so that the timeout's timer works
        // whichever executor polls this future.
        let dial = handle.spawn(async move {
            let dial = dial(uri, tls, properties, runtime);
            match timeout {
                Some(limit) => tokio::time::timeout(limit, dial).await.ok(),
                None => Some(dial.await),
            }
        });
        let password = endpoint.password();
        let error = match dial.await {
            Ok(Some(Ok(connection))) => {
                return Ok(LapinConnection::start(connection, handle, password));
            }
            Ok(Some(Err(error))) => error,
            Ok(None) => return Err(TransportError::Timeout),
            Err(join) => {
                return Err(TransportError::Protocol(format!(
                    "the dial task failed: {join}"
                )));
            }
        };
        let (error, died) = match error {
            DialError::Socket(error) => match rustls::from_io_error(&error) {
                Some(tls) => (tls, false),
                None => (
                    TransportError::Io(error.to_string()),
                    died_without_a_word(&error),
                ),
            },
            DialError::Lapin(error) => {
                let error = convert::map_connect_error(&error, password);
                // the socket was open: an I/O or parsing error is the handshake dying
                let died = matches!(error, TransportError::Io(_) | TransportError::Protocol(_));
                (error, died)
            }
        };
        if !died || started.elapsed() >= rustls::EXPLAIN_WITHIN {
            return Err(convert::scrub(error, password));
        }
        // maybe a TLS error that RabbitMQ's reset hid
        let (endpoint, tls) = (endpoint.clone(), options.tls.clone());
        let explain = handle.spawn_blocking(move || {
            rustls::explain_dead_handshake(&endpoint, tls.as_ref(), config, error)
        });
        match explain.await {
            Ok(error) => Err(convert::scrub(error, password)),
            Err(join) => Err(TransportError::Protocol(format!(
                "the dial task failed: {join}"
            ))),
        }
    }

    /// A publish racing the broker's `channel.close` can cost the connection,
    /// confirms can come out of publish order, and lapin's TRACE log shows the
    /// login frame (see the limits in the crate docs).
    fn capabilities(&self) -> Capabilities {
        let mut capabilities = Capabilities::default();
        capabilities.fences_channel_close = false;
        capabilities.confirms_in_order = false;
        capabilities.keeps_credentials_out_of_logs = false;
        capabilities
    }
}

/// Whether a socket error is the peer closing or resetting the connection (under
/// the TLS handshake), rather than a refused or unreachable port.
fn died_without_a_word(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
    )
}

enum DialError {
    /// The TCP connect or the TLS handshake failed; lapin never saw this dial.
    Socket(std::io::Error),
    /// lapin failed the AMQP handshake.
    Lapin(lapin::Error),
}

/// Opens the socket (TCP, and TLS for `amqps`) before lapin is involved, then hands
/// it to lapin for the AMQP handshake.
///
/// lapin 4.12 leaks two tasks on the runtime for every dial whose socket it fails
/// to open (the crate docs say where); a socket that is already open when lapin
/// starts cannot fail that way. Opening it here also lets the dial's
/// timeout cancel a TCP connect or TLS handshake outright, instead of leaving lapin's
/// socket thread blocked in it.
async fn dial(
    uri: AMQPUri,
    tls: Option<(RustlsConnector, String)>,
    properties: ConnectionProperties,
    runtime: TokioRuntime,
) -> Result<lapin::Connection, DialError> {
    let tls = Arc::new(tls);
    let stream = open_socket(&uri, tls.as_ref().as_ref(), &runtime)
        .await
        .map_err(DialError::Socket)?;
    let opened = Mutex::new(Some(stream));
    // lapin calls this once per dial with recovery off and no retries (this crate's
    // setting); should it call again, it dials a fresh socket as lapin itself would.
    let connect = async move |uri: AMQPUri, runtime: TokioRuntime| {
        let stream = opened.lock().unwrap_or_else(|e| e.into_inner()).take();
        match stream {
            Some(stream) => Ok(stream),
            None => open_socket(&uri, tls.as_ref().as_ref(), &runtime)
                .await
                .map_err(lapin::Error::from),
        }
    };
    lapin::Connection::connector(uri, runtime, connect, properties)
        .await
        .map_err(DialError::Lapin)
}

/// TCP as lapin would open it (the URI's host and port), then TLS with this
/// crate's rustls configuration (the core's [`TlsConfig`] rather than lapin's
/// own, which knows no private CA or client certificate) and server name.
///
/// [`TlsConfig`]: amqp_rebound_core::TlsConfig
async fn open_socket(
    uri: &AMQPUri,
    tls: Option<&(RustlsConnector, String)>,
    runtime: &TokioRuntime,
) -> std::io::Result<AsyncTcpStream<<async_rs::Tokio as Reactor>::TcpStream>> {
    let mut tcp = uri.clone();
    tcp.scheme = AMQPScheme::AMQP;
    let stream = tcp.connect_async(runtime).await?;
    match tls {
        Some((connector, name)) => stream.into_rustls(connector, name).await,
        None => Ok(stream),
    }
}
