//! [`AmqprsConnection`]: one amqprs connection, its [`ConnectionCallback`], and the
//! task that turns what amqprs reports into [`ConnectionEvent`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::transport::{Connection, ConnectionEvent};
use amqprs::callbacks::ConnectionCallback;
use amqprs::connection::Connection as AmqprsConn;
use amqprs::error::Error as AmqprsError;
use async_trait::async_trait;
use futures::channel::{mpsc, oneshot};
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::channel::AmqprsChannel;
use crate::convert::{map_error, scrub};

/// One AMQP connection over amqprs; implements core's [`Connection`].
///
/// Made by [`AmqprsTransport`](crate::AmqprsTransport). Dropping it without
/// [`close`](Connection::close) ends its event stream and lets amqprs close the
/// connection. A second call to `events` gets an empty stream.
///
/// `close` waits for the broker's `close-ok` with no deadline of its own (on a
/// silent broker, until amqprs's heartbeat check gives up): bound it from outside.
pub struct AmqprsConnection {
    connection: InRuntime<AmqprsConn>,
    shared: Arc<ConnectionShared>,
    handle: Handle,
    events: Mutex<Option<mpsc::UnboundedReceiver<ConnectionEvent>>>,
    // Dropped with the connection: tells the event task to stop.
    _owner: oneshot::Sender<()>,
}

impl std::fmt::Debug for AmqprsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqprsConnection")
            .field("name", &self.connection.get().connection_name())
            .field("open", &self.connection.get().is_open())
            .finish()
    }
}

/// What the connection, its callback, its event task and its channels share.
pub(crate) struct ConnectionShared {
    /// `close()` was called: the end of the connection is ours.
    client_closing: AtomicBool,
    /// The broker's `connection.close`, recorded by the callback.
    broker_close: Mutex<Option<TransportError>>,
    /// amqprs's reader task has ended (set when it drops our callback, before it
    /// drops the channels' dispatchers).
    reader_ended: AtomicBool,
    /// Why the connection closed, once the event task has decided.
    closed: watch::Sender<Option<TransportError>>,
    /// Kept only to scrub it out of error texts.
    password: Secret,
}

/// A password that never prints.
struct Secret(String);

impl ConnectionShared {
    /// Why the connection closed, if that is settled.
    pub(crate) fn closed(&self) -> Option<TransportError> {
        self.closed.borrow().clone()
    }

    /// Whether amqprs's reader task (the connection itself) has ended.
    pub(crate) fn reader_ended(&self) -> bool {
        self.reader_ended.load(Ordering::SeqCst)
    }

    /// Waits until the event task has decided why the connection closed. Only
    /// called once the reader has ended or a close is under way, so the wait is
    /// short.
    pub(crate) async fn wait_closed(&self) -> TransportError {
        let mut closed = self.closed.subscribe();
        match closed.wait_for(Option::is_some).await {
            Ok(error) => error.clone().unwrap_or_else(task_stopped),
            Err(_) => task_stopped(),
        }
    }

    fn decide(&self, error: TransportError) {
        self.closed.send_if_modified(|closed| {
            if closed.is_some() {
                return false;
            }
            *closed = Some(error);
            true
        });
    }

    /// The reason for the end, in order of precedence: the broker's
    /// `connection.close`, our own `close()`, then what amqprs's failure signal
    /// said (`Some(true)`: network failure or missed heartbeats, which amqprs
    /// does not tell apart).
    fn reason(&self, io_failure: Option<bool>) -> TransportError {
        if let Some(error) = lock(&self.broker_close).clone() {
            return error;
        }
        if self.client_closing.load(Ordering::SeqCst) {
            return TransportError::ClosedByClient;
        }
        match io_failure {
            Some(true) => TransportError::Io(
                "connection lost: socket error or missed heartbeats (amqprs reports both alike)"
                    .into(),
            ),
            Some(false) => TransportError::Protocol(
                "the broker closed the connection before amqprs reported why".into(),
            ),
            None => {
                TransportError::Protocol("amqprs's connection task stopped without a reason".into())
            }
        }
    }
}

fn task_stopped() -> TransportError {
    TransportError::Protocol("the connection's event task has stopped".into())
}

impl AmqprsConnection {
    /// Wraps an open amqprs connection: registers the callback and starts the event
    /// task on `handle`. Runs on the runtime (the caller spawns it there).
    pub(crate) async fn start(
        connection: AmqprsConn,
        handle: Handle,
        password: String,
    ) -> Result<AmqprsConnection, TransportError> {
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(ConnectionShared {
            client_closing: AtomicBool::new(false),
            broker_close: Mutex::new(None),
            reader_ended: AtomicBool::new(false),
            closed,
            password: Secret(password),
        });
        let connection = InRuntime::new(connection, handle.clone());
        let (raw_tx, raw_rx) = mpsc::unbounded();
        let callback = Callback {
            shared: shared.clone(),
            raw: raw_tx,
        };
        connection
            .get()
            .register_callback(callback)
            .await
            .map_err(|e| scrub(map_error(&e), &shared.password.0))?;
        // Subscribe to amqprs's failure signal now (the first poll does): amqprs
        // broadcasts it once, to the listeners it has at that moment.
        let listener = connection.get().clone();
        let mut io_failure = async move { listener.listen_network_io_failure().await }.boxed();
        let _ = futures::poll!(io_failure.as_mut());
        let (event_tx, event_rx) = mpsc::unbounded();
        let (owner_tx, owner_rx) = oneshot::channel();
        let pump = Pump {
            shared: shared.clone(),
            raw: raw_rx,
            io_failure,
            owner: owner_rx,
            events: event_tx,
        };
        handle.spawn(pump.run());
        Ok(AmqprsConnection {
            connection,
            shared,
            handle,
            events: Mutex::new(Some(event_rx)),
            _owner: owner_tx,
        })
    }

    /// The amqprs connection, for what this adapter does not cover (the negotiated
    /// heartbeat, frame size, server properties, ...).
    ///
    /// Closing it or registering another callback on it bypasses this adapter:
    /// use it for reads.
    pub fn amqprs(&self) -> &AmqprsConn {
        self.connection.get()
    }

    /// Maps an error from a call on this connection. A call on a connection that
    /// has ended reports why it ended.
    async fn error(&self, error: AmqprsError) -> TransportError {
        if let Some(closed) = self.shared.closed() {
            return closed;
        }
        if self.shared.client_closing.load(Ordering::SeqCst) {
            return TransportError::ClosedByClient;
        }
        if self.shared.reader_ended() || !self.connection.get().is_open() {
            return self.shared.wait_closed().await;
        }
        scrub(map_error(&error), &self.shared.password.0)
    }
}

#[async_trait]
impl Connection for AmqprsConnection {
    type Channel = AmqprsChannel;

    fn channel_max(&self) -> u16 {
        match self.connection.get().channel_max() {
            0 => u16::MAX,
            max => max,
        }
    }

    async fn open_channel(&self) -> Result<AmqprsChannel, TransportError> {
        if let Some(closed) = self.shared.closed() {
            return Err(closed);
        }
        if self.shared.client_closing.load(Ordering::SeqCst) {
            return Err(TransportError::ClosedByClient);
        }
        // amqprs spawns the channel's dispatcher with `tokio::spawn`: run the call
        // on the runtime, whichever executor polls this future.
        let connection = self.connection.get().clone();
        let opened = self
            .handle
            .spawn(async move { connection.open_channel(None).await })
            .await;
        let channel = match opened {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => return Err(self.error(error).await),
            Err(join) => {
                return Err(TransportError::Protocol(format!(
                    "amqprs failed while opening a channel: {join}"
                )));
            }
        };
        AmqprsChannel::start(channel, self.handle.clone(), self.shared.clone()).await
    }

    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        match lock(&self.events).take() {
            Some(events) => events.boxed(),
            None => stream::empty().boxed(),
        }
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.shared.client_closing.store(true, Ordering::SeqCst);
        // amqprs's `close` takes the connection by value; a clone shares its state.
        let connection = self.connection.get().clone();
        match run_to_end(&self.handle, "closing the connection", connection.close()).await? {
            Ok(()) => Ok(()),
            // The connection ended on the way: nothing is left to close.
            Err(_) if self.shared.reader_ended() => Ok(()),
            Err(AmqprsError::InternalChannelError(_)) => Ok(()),
            Err(e) => Err(scrub(map_error(&e), &self.shared.password.0)),
        }
    }
}

/// The connection's callback: runs on amqprs's reader task.
struct Callback {
    shared: Arc<ConnectionShared>,
    raw: mpsc::UnboundedSender<Raw>,
}

/// What the callback passes to the event task, in the order amqprs reported it.
enum Raw {
    Blocked(String),
    Unblocked,
}

impl Drop for Callback {
    fn drop(&mut self) {
        // amqprs drops the callback when its reader task ends (normally or by a
        // panic), before it drops the channels' dispatchers.
        self.shared.reader_ended.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl ConnectionCallback for Callback {
    async fn close(
        &mut self,
        _connection: &AmqprsConn,
        close: amqprs::Close,
    ) -> Result<(), AmqprsError> {
        let error = scrub(
            TransportError::Reply {
                code: close.reply_code(),
                text: close.reply_text().clone(),
            },
            &self.shared.password.0,
        );
        lock(&self.shared.broker_close).get_or_insert(error);
        // Ok: amqprs answers with close-ok.
        Ok(())
    }

    async fn blocked(&mut self, _connection: &AmqprsConn, reason: String) {
        let _ = self.raw.unbounded_send(Raw::Blocked(reason));
    }

    async fn unblocked(&mut self, _connection: &AmqprsConn) {
        let _ = self.raw.unbounded_send(Raw::Unblocked);
    }

    async fn secret_updated(&mut self, _connection: &AmqprsConn) {}
}

/// The connection's event task.
struct Pump {
    shared: Arc<ConnectionShared>,
    raw: mpsc::UnboundedReceiver<Raw>,
    /// amqprs's `listen_network_io_failure`, already subscribed.
    io_failure: BoxFuture<'static, bool>,
    owner: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<ConnectionEvent>,
}

impl Pump {
    async fn run(mut self) {
        // Whatever way this task ends, waiters learn that the connection is gone.
        let _guard = DecideOnDrop(self.shared.clone());
        loop {
            tokio::select! {
                biased;
                raw = self.raw.next() => match raw {
                    Some(Raw::Blocked(reason)) => self.emit(ConnectionEvent::Blocked(reason)),
                    Some(Raw::Unblocked) => self.emit(ConnectionEvent::Unblocked),
                    // amqprs dropped the callback: its reader task has ended.
                    None => break,
                },
                _ = &mut self.owner => {
                    // The AmqprsConnection was dropped; dropping the listener's
                    // clone lets amqprs close the connection.
                    self.shared.decide(TransportError::ClosedByClient);
                    return;
                }
            }
        }
        // amqprs broadcasts its failure signal before it drops the callback, so a
        // subscribed listener has it by now.
        let io_failure = (&mut self.io_failure).now_or_never();
        let error = scrub(self.shared.reason(io_failure), &self.shared.password.0);
        self.shared.decide(error.clone());
        self.emit(ConnectionEvent::Closed(error));
        self.events.close_channel();
    }

    fn emit(&self, event: ConnectionEvent) {
        // The receiver may be gone (nobody listens); the events are then moot.
        let _ = self.events.unbounded_send(event);
    }
}

/// Settles the connection's end if its event task stops without doing so (the
/// runtime shutting down), so that nobody waits for it forever.
struct DecideOnDrop(Arc<ConnectionShared>);

impl Drop for DecideOnDrop {
    fn drop(&mut self) {
        self.0.decide(task_stopped());
    }
}

/// Runs an amqprs request or close as a task of its own on `handle`, so that it
/// runs to its end even if the caller's future is dropped: amqprs's tasks panic
/// (an `unwrap` or `expect` on a reply channel) when such a future is dropped
/// while it registers for its reply, which is what a close of the client does to
/// the requests it cuts short. A panic of the task is reported as `Protocol`,
/// naming `what` it was doing.
pub(crate) async fn run_to_end<T, F>(
    handle: &Handle,
    what: &str,
    request: F,
) -> Result<Result<T, AmqprsError>, TransportError>
where
    F: std::future::Future<Output = Result<T, AmqprsError>> + Send + 'static,
    T: Send + 'static,
{
    handle
        .spawn(request)
        .await
        .map_err(|join| TransportError::Protocol(format!("amqprs failed while {what}: {join}")))
}

/// An amqprs object that must be dropped on the tokio runtime: amqprs's drop
/// guards close the connection or channel with `tokio::spawn`, which panics
/// elsewhere.
pub(crate) struct InRuntime<T> {
    value: Option<T>,
    handle: Handle,
}

impl<T> InRuntime<T> {
    pub(crate) fn new(value: T, handle: Handle) -> Self {
        InRuntime {
            value: Some(value),
            handle,
        }
    }

    /// The runtime the value lives on.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    pub(crate) fn get(&self) -> &T {
        match &self.value {
            Some(value) => value,
            // `value` is only taken in `drop`.
            None => unreachable!("InRuntime used after drop"),
        }
    }
}

impl<T> Drop for InRuntime<T> {
    fn drop(&mut self) {
        let _runtime = self.handle.enter();
        drop(self.value.take());
    }
}

/// Locks a mutex, ignoring poisoning: every value guarded here stays valid even if
/// a holder panicked.
pub(crate) use amqp_rebound_core::transport::support::lock;
