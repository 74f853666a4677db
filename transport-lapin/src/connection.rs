//! [`LapinConnection`]: one lapin connection, and the task that turns lapin's
//! connection events into [`ConnectionEvent`]s and channel closures.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::transport::{Connection, ConnectionEvent};
use async_trait::async_trait;
use futures::channel::{mpsc, oneshot};
use futures::stream::{self, BoxStream};
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use tokio::runtime::Handle;

use crate::channel::{ChannelShared, LapinChannel, lock};
use crate::convert::{is_channel_level, is_state_error, map_error, scrub};

/// One AMQP connection over lapin; implements core's [`Connection`].
///
/// Made by [`LapinTransport`](crate::LapinTransport). Dropping it without
/// [`close`](Connection::close) ends its event stream; lapin closes the connection
/// once its channels are dropped too. A second call to `events` gets an empty
/// stream.
///
/// `close` waits for the broker's `close-ok` with no deadline of its own (on a
/// silent broker, until lapin's heartbeat check gives up): bound it from outside.
pub struct LapinConnection {
    connection: lapin::Connection,
    shared: Arc<ConnectionShared>,
    events: Mutex<Option<mpsc::UnboundedReceiver<ConnectionEvent>>>,
    // Dropped with the connection: tells the event task to stop.
    _owner: oneshot::Sender<()>,
}

impl std::fmt::Debug for LapinConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapinConnection")
            .field("connected", &self.connection.status().connected())
            .finish()
    }
}

/// What the connection's owner shares with its event task.
struct ConnectionShared {
    status: lapin::ConnectionStatus,
    channels: Mutex<Vec<Weak<ChannelShared>>>,
    /// Set by our own `close()`: the connection's end is reported as ours.
    client_closing: AtomicBool,
    close_request: Mutex<Option<TransportError>>,
    closed: Mutex<Option<TransportError>>,
    /// Kept only to scrub it out of error texts.
    password: Secret,
    waker: AtomicWaker,
}

/// A password that never prints.
struct Secret(String);

impl ConnectionShared {
    fn live_channels(&self) -> Vec<Arc<ChannelShared>> {
        let mut channels = lock(&self.channels);
        channels.retain(|c| c.strong_count() > 0);
        channels.iter().filter_map(Weak::upgrade).collect()
    }

    fn request_close(&self, error: TransportError) {
        lock(&self.close_request).get_or_insert(error);
        self.waker.wake();
    }
}

impl LapinConnection {
    /// Wraps a connected lapin connection and starts its event task on `handle`.
    pub(crate) fn start(
        connection: lapin::Connection,
        handle: Handle,
        password: &str,
    ) -> LapinConnection {
        let shared = Arc::new(ConnectionShared {
            status: connection.status().clone(),
            channels: Mutex::new(Vec::new()),
            client_closing: AtomicBool::new(false),
            close_request: Mutex::new(None),
            closed: Mutex::new(None),
            password: Secret(password.to_owned()),
            waker: AtomicWaker::new(),
        });
        let (event_tx, event_rx) = mpsc::unbounded();
        let (owner_tx, owner_rx) = oneshot::channel();
        // Subscribe before looking at the status, so that a block that lands in
        // between is seen at least once (a repeated Blocked is harmless).
        let lapin_events = connection.events_listener().boxed();
        if connection.status().blocked() {
            let _ = event_tx.unbounded_send(ConnectionEvent::Blocked(
                "blocked before the connection was handed over".into(),
            ));
        }
        let mut pump = Pump {
            shared: shared.clone(),
            lapin_events,
            owner: owner_rx,
            events: event_tx,
            pending: None,
        };
        handle.spawn(async move { poll_fn(|cx| pump.poll(cx)).await });
        LapinConnection {
            connection,
            shared,
            events: Mutex::new(Some(event_rx)),
            _owner: owner_tx,
        }
    }

    /// The lapin connection, for what this adapter does not cover (status, the
    /// negotiated heartbeat and frame size, ...).
    pub fn lapin(&self) -> &lapin::Connection {
        &self.connection
    }

    fn error(&self, error: lapin::Error) -> TransportError {
        if is_state_error(&error)
            && let Some(closed) = lock(&self.shared.closed).clone()
        {
            return closed;
        }
        scrub(map_error(&error), &self.shared.password.0)
    }
}

#[async_trait]
impl Connection for LapinConnection {
    type Channel = LapinChannel;

    fn channel_max(&self) -> u16 {
        match self.connection.configuration().channel_max() {
            0 => u16::MAX,
            max => max,
        }
    }

    async fn open_channel(&self) -> Result<LapinChannel, TransportError> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.error(e))?;
        let channel = LapinChannel::start(channel);
        lock(&self.shared.channels).push(Arc::downgrade(channel.shared()));
        // The connection may have died between lapin's answer and the line above,
        // in which case its task has already told every channel it knew of.
        if let Some(error) = lock(&self.shared.closed).clone() {
            channel.shared().request_close(error);
        }
        Ok(channel)
    }

    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        match lock(&self.events).take() {
            Some(events) => events.boxed(),
            None => stream::empty().boxed(),
        }
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.shared.client_closing.store(true, Ordering::SeqCst);
        for channel in self.shared.live_channels() {
            channel.client_closing();
        }
        let result = self.connection.close(200, "OK".into()).await;
        self.shared.request_close(TransportError::ClosedByClient);
        match result {
            Ok(()) => Ok(()),
            // Already closed or dead: nothing left to close.
            Err(e) if is_state_error(&e) => Ok(()),
            Err(e) => Err(scrub(map_error(&e), &self.shared.password.0)),
        }
    }
}

/// The connection's event task.
struct Pump {
    shared: Arc<ConnectionShared>,
    lapin_events: BoxStream<'static, lapin::Event>,
    owner: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<ConnectionEvent>,
    /// A connection-ending error waiting for a better one (see `handle`).
    pending: Option<TransportError>,
}

impl Pump {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.waker.register(cx.waker());
        if self.owner.poll_unpin(cx).is_ready() {
            // The LapinConnection was dropped.
            return Poll::Ready(());
        }
        loop {
            match self.lapin_events.poll_next_unpin(cx) {
                Poll::Ready(Some(event)) => {
                    if let Some(error) = self.handle(event) {
                        return self.closed(error);
                    }
                }
                // lapin dropped its side: the connection is gone.
                Poll::Ready(None) => {
                    let error = TransportError::Protocol("lapin stopped reporting events".into());
                    return self.closed(error);
                }
                Poll::Pending => break,
            }
        }
        match self
            .pending
            .take()
            .or_else(|| lock(&self.shared.close_request).take())
        {
            Some(error) => self.closed(error),
            None => Poll::Pending,
        }
    }

    /// Handles one lapin event; returns the error if it ended the connection.
    fn handle(&mut self, event: lapin::Event) -> Option<TransportError> {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                self.emit(ConnectionEvent::Blocked(reason));
                None
            }
            lapin::Event::ConnectionUnblocked => {
                self.emit(ConnectionEvent::Unblocked);
                None
            }
            lapin::Event::Error(error) => {
                let mapped = map_error(&error);
                if self.shared.status.connected() {
                    // lapin marks the connection failed before it reports a
                    // connection error, so this one is a channel's: lapin reports a
                    // channel that the broker closed here too, with the channel's
                    // error and no channel number. The channels it may belong to
                    // are the ones lapin no longer considers open.
                    for channel in self.shared.live_channels() {
                        if !channel.is_open() {
                            channel.request_close(mapped.clone());
                        }
                    }
                    None
                } else if is_channel_level(&error) {
                    // A soft error while the connection is down: most likely a
                    // channel's, overtaken by the connection's own error, which
                    // follows. Use it only if nothing better arrives.
                    self.pending.get_or_insert(mapped);
                    None
                } else {
                    Some(mapped)
                }
            }
            // Connected (before we subscribed), SendFlow (channel.flow, which
            // RabbitMQ does not send) and anything lapin adds later.
            _ => None,
        }
    }

    /// Reports the end of the connection to its channels and its listener.
    fn closed(&mut self, error: TransportError) -> Poll<()> {
        let error = if self.shared.client_closing.load(Ordering::SeqCst) {
            TransportError::ClosedByClient
        } else {
            scrub(error, &self.shared.password.0)
        };
        *lock(&self.shared.closed) = Some(error.clone());
        for channel in self.shared.live_channels() {
            channel.request_close(error.clone());
        }
        self.emit(ConnectionEvent::Closed(error));
        self.events.close_channel();
        Poll::Ready(())
    }

    fn emit(&self, event: ConnectionEvent) {
        let _ = self.events.unbounded_send(event);
    }
}
