//! The [`Driver`]: one future per client that runs the [`Supervisor`] against a
//! [`Transport`] and a [`Timer`], on any executor.
//!
//! It feeds transport results, transport notifications, application requests and
//! timer expiry into the supervisor, and executes the supervisor's commands:
//! dials, channel opens and topology calls concurrently (a `FuturesUnordered`, no
//! spawning), publishes and acks through each channel's writer. It makes no
//! protocol decision of its own: every retry, reopen and re-publish is the
//! supervisor's.
//!
//! The state lives behind a mutex shared by the driver and every [`Client`]
//! handle (as quinn's connection state does). [`Client::publish`] takes the lock
//! when it is free and runs the publish to the transport's hand-over on the
//! caller's own thread: the message is read where it was just written, and the
//! driver is woken only for what needs it (I/O that did not complete at once, a
//! new command, an earlier deadline). When the lock is busy the publish goes to
//! the driver as a request, as every other operation does; requests already
//! queued are taken first, so messages keep their call order either way.
//!
//! The confirms come back the same way: the channels' event streams are polled
//! with a relay's waker (`contract.rs`), which wakes a publisher waiting for
//! its confirm rather than the driver; that publisher's next poll takes the
//! channels' events on its own task and reads its confirm there (nothing else
//! of the driver's runs there: no timer, dial or request). The driver's task
//! runs when no publisher waits, for everything else, and every 10 ms while
//! confirms are handed to publishers, should a woken publisher not be polled.
//!
//! What it drains or retains (pending replies at the end, channels of a lost
//! connection) goes in one order every run, so the same inputs give the same
//! wake-up order, and the simulator's same-seed-same-trace holds: its maps are
//! ordered by id (`BTreeMap`). A publish's reply is a slot of the replies the
//! client handles share with it, keyed in its outbox entry (no map of the
//! driver's); at the end the outbox's keys are resolved in slot order.
//!
//! Per channel, publishes and acks go through one sequential writer, so the
//! broker sees them in the order the supervisor emitted them (confirm sequence
//! numbers depend on it); topology operations run one at a time per channel, as
//! the supervisor issues them.
//!
//! [`Client`]: crate::Client
//! [`Client::publish`]: crate::Client::publish

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, TryLockError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use futures::channel::oneshot;
use futures::future::{BoxFuture, Fuse, FutureExt};
use futures::stream::{BoxStream, FuturesUnordered, Stream, StreamExt};
use tracing::Instrument;

use crate::contract::{
    ClientState, CloseSummary, ConsumerItem, ConsumerSender, Engine, Flushed, ReceiverGone,
    ReplyKey, Request, Shared, TopologyReply, lock,
};
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::event::Event;
use crate::ids::{ChannelId, ConnectionId};
use crate::message::Message;
use crate::outbox::{Confirmation, PublishError};
use crate::stream_set::StreamSet;
use crate::supervisor::{ChannelInput, Command, Input, Stats, Supervisor};
use crate::telemetry::targets;
use crate::topology::{AckKind, ConsumeError, ConsumerId, OpId, TopologyError, TopologyOp};
use crate::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, Sleep, Timer,
    TopologyOutcome, Transport,
};

/// Items one trip through the driver's loop takes before it flushes and looks at
/// its timers again.
const BATCH: usize = 256;

/// Trips one poll of the driver makes before it yields to the executor.
const TRIPS: usize = 32;

/// Runs a client: spawn it on any executor (or `.await` it); it completes after
/// [`Client::close`](crate::Client::close) or when every `Client` handle is
/// dropped. Dropping it drops every transport connection, resolves every pending
/// operation with a `Closed` error and ends every consumer and `watch` stream.
#[must_use = "the client does nothing unless its driver is spawned or awaited"]
pub struct Driver {
    engine: Arc<dyn Engine>,
}

impl Driver {
    pub(crate) fn new<T: Transport, K: Timer>(
        sup: Supervisor,
        transport: Arc<T>,
        timer: K,
        requests: async_channel::Receiver<Request>,
        shared: Arc<Shared>,
        options: ConnectOptions,
    ) -> (Driver, Arc<dyn Engine>) {
        let span = tracing::debug_span!(
            target: targets::CLIENT,
            "client",
            client = options.connection_name.as_deref().unwrap_or(""),
        );
        let relay = Arc::clone(&shared.relay);
        let state = State {
            sup,
            transport,
            timer,
            options,
            shared,
            requests: Box::pin(requests),
            requests_open: true,
            span,
            waker: None,
            wake_driver: false,
            relay: futures::task::waker(Arc::clone(&relay)),
            sleep: Fuse::terminated(),
            armed: None,
            done: false,
            conns: BTreeMap::new(),
            chans: BTreeMap::new(),
            ops: FuturesUnordered::new(),
            conn_events: StreamSet::default(),
            chan_events: StreamSet::default(),
            topology: BTreeMap::new(),
            consumers: BTreeMap::new(),
            watchers: Vec::new(),
            close_waiters: Vec::new(),
            closed_here: 0,
            contact_waiters: Vec::new(),
            consume_replies: BTreeMap::new(),
            flushes: BTreeMap::new(),
            batch_now: None,
            resolved: Vec::new(),
            relay_due: None,
        };
        let engine: Arc<dyn Engine> = Arc::new(Mutex::new(state));
        (
            Driver {
                engine: Arc::clone(&engine),
            },
            engine,
        )
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.engine.poll_drive(cx)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.engine.abandon();
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl<T: Transport, K: Timer> Engine for Mutex<State<T, K>> {
    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(self);
        state.shared.relay.set_driver(cx.waker());
        let span = state.span.clone();
        let _entered = span.enter();
        let poll = state.poll_drive(cx);
        // what the driver left itself is done or registered: a publish on a
        // caller's thread need not wake it for that
        state.wake_driver = false;
        send_resolved(state);
        poll
    }

    fn try_publish(&self, request: Request) -> Result<(), Request> {
        let mut state = match self.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(request),
        };
        if state.done {
            return Err(request);
        }
        let span = state.span.clone();
        let _entered = span.enter();
        let result = state.publish_here(request);
        send_resolved(state);
        match result {
            Ok(waker) => {
                if let Some(waker) = waker {
                    waker.wake();
                }
                Ok(())
            }
            // the driver was woken for the requests before it
            Err(request) => Err(request),
        }
    }

    fn poll_here(&self) -> bool {
        let mut state = match self.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        if state.done || state.waker.is_none() {
            return false;
        }
        let span = state.span.clone();
        let _entered = span.enter();
        let waker = state.channels_here();
        send_resolved(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    fn abandon(&self) {
        let mut state = lock(self);
        if !state.done {
            let lost = state.finish();
            // Dropped before it ended: its runtime shut down (`main` returned,
            // a test ended) or its executor dropped it. The drain that a close
            // or the last handle's drop promises needs the driver to run, so
            // what it owed is lost here: say so, rather than nothing.
            if lost > 0 {
                tracing::warn!(
                    target: targets::CLIENT,
                    client = state.options.connection_name.as_deref().unwrap_or(""),
                    unresolved = lost,
                    "driver dropped before it ended (its runtime shut down?): \
                     accepted messages it had not confirmed resolve Closed, \
                     those not yet sent are lost; await Client::close() \
                     before the runtime ends"
                );
            }
        }
        send_resolved(state);
    }

    fn stats(&self) -> Stats {
        lock(self).sup.stats()
    }
}

/// Whether `next` is a wake-up the timer armed at `armed` would miss.
fn earlier(next: Option<Instant>, armed: Option<Instant>) -> bool {
    match (next, armed) {
        (Some(at), Some(current)) => at < current,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Sends the publish results gathered under the lock, after releasing it.
fn send_resolved<T: Transport, K: Timer>(mut state: std::sync::MutexGuard<'_, State<T, K>>) {
    // a size limit a refusal told is known to callers before that refusal's
    // result reaches them
    if let Some(max) = state.sup.max_message_size()
        && state.shared.max_message_size.load(Ordering::Relaxed) != max
    {
        state.shared.max_message_size.store(max, Ordering::Relaxed);
    }
    if state.resolved.is_empty() {
        return;
    }
    // room for a batch at least this large now, not grown push by push (capped:
    // one mass time-out does not keep a large buffer)
    let capacity = (2 * state.resolved.len()).clamp(64, 4096);
    let resolved = std::mem::replace(&mut state.resolved, Vec::with_capacity(capacity));
    let shared = Arc::clone(&state.shared);
    drop(state);
    shared.replies.resolve_all(resolved);
}

/// What a channel's writer sends, in order.
enum Outbound {
    Publish(Arc<Message>),
    Ack(u64, AckKind),
}

/// Publishes and acks of one channel generation, one at a time, in order. A
/// write is started (and polled once) where it is queued, on whichever thread
/// holds the state; one that does not complete at once is polled by the driver.
struct Writer<C> {
    channel: Arc<C>,
    queue: VecDeque<Outbound>,
    current: Option<BoxFuture<'static, Result<(), TransportError>>>,
    /// A write failed: the channel is lost (the supervisor was told); later
    /// writes are dropped.
    failed: bool,
}

impl<C: Channel> Writer<C> {
    fn new(channel: Arc<C>) -> Self {
        Writer {
            channel,
            queue: VecDeque::new(),
            current: None,
            failed: false,
        }
    }

    fn is_busy(&self) -> bool {
        !self.failed && (self.current.is_some() || !self.queue.is_empty())
    }

    /// Runs queued writes until one is pending or none is left; `Ready(Err)`
    /// once, when a write fails.
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.failed {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(write) = self.current.as_mut() {
                let result = std::task::ready!(write.as_mut().poll(cx));
                self.current = None;
                if let Err(error) = result {
                    return self.fail(error);
                }
            }
            let Some(item) = self.queue.pop_front() else {
                return Poll::Ready(Ok(()));
            };
            if let Outbound::Publish(message) = &item {
                match self.channel.try_publish(message) {
                    Some(Ok(())) => continue,
                    Some(Err(error)) => return self.fail(error),
                    None => {} // it has to wait: the future below does
                }
            }
            let ch = Arc::clone(&self.channel);
            self.current = Some(Box::pin(async move {
                match item {
                    Outbound::Publish(message) => ch.publish(&message).await,
                    Outbound::Ack(tag, AckKind::Ack { multiple }) => ch.ack(tag, multiple).await,
                    Outbound::Ack(tag, AckKind::Nack { multiple, requeue }) => {
                        ch.nack(tag, multiple, requeue).await
                    }
                    Outbound::Ack(tag, AckKind::Reject { requeue }) => {
                        ch.reject(tag, requeue).await
                    }
                }
            }));
        }
    }

    /// A write failed: the channel is lost; what is queued is dropped.
    fn fail(&mut self, error: TransportError) -> Poll<Result<(), TransportError>> {
        self.failed = true;
        self.queue.clear();
        Poll::Ready(Err(error))
    }

    /// Completes what is queued (a connection or channel about to close sends
    /// its acks first); a failure ends it.
    async fn finish(mut self) {
        let _ = futures::future::poll_fn(|cx| self.pump(cx)).await;
    }
}

/// The result of one command's future.
enum Done<C, H> {
    Dialed {
        connection: ConnectionId,
        epoch: u64,
        result: Result<C, TransportError>,
        /// The `dial` span and when the dial started, to record its outcome.
        span: tracing::Span,
        started: Instant,
    },
    Opened {
        channel: ChannelId,
        generation: u64,
        result: Result<H, TransportError>,
        /// The `channel_open` span and when the open started.
        span: tracing::Span,
        started: Instant,
    },
    Topology {
        channel: ChannelId,
        generation: u64,
        result: Result<Option<String>, TransportError>,
    },
    ConnectionClosed {
        connection: ConnectionId,
        epoch: u64,
    },
    Nothing,
}

struct ChanSlot<H> {
    generation: u64,
    writer: Writer<H>,
    /// Publishes handed to this generation's writer: the supervisor numbers
    /// them 1, 2, ... and the transport's confirms use the same numbers, so a
    /// gap would pair confirms with the wrong messages.
    published: u64,
}

pub(crate) struct State<T: Transport, K: Timer> {
    sup: Supervisor,
    transport: Arc<T>,
    timer: K,
    options: ConnectOptions,
    shared: Arc<Shared>,
    /// Boxed: it is `!Unpin` and polled in place.
    requests: Pin<Box<async_channel::Receiver<Request>>>,
    requests_open: bool,
    span: tracing::Span,
    /// The driver's waker as of its last poll: writes started elsewhere are
    /// polled with it, and work left for the driver wakes it.
    waker: Option<Waker>,
    /// Work done on a caller's thread left something for the driver.
    wake_driver: bool,
    /// The channels' event streams are polled with this waker: a waiting
    /// publisher's, or the driver's ([`Relay`](crate::contract::Relay)).
    relay: Waker,
    sleep: Fuse<Sleep>,
    armed: Option<Instant>,
    /// The driver finished (or was dropped): nothing runs any more.
    done: bool,
    conns: BTreeMap<ConnectionId, (u64, Arc<T::Connection>)>,
    chans: BTreeMap<ChannelId, ChanSlot<ChannelOf<T>>>,
    ops: FuturesUnordered<BoxFuture<'static, Done<T::Connection, ChannelOf<T>>>>,
    conn_events: StreamSet<BoxStream<'static, (ConnectionId, u64, ConnectionEvent)>>,
    chan_events: StreamSet<BoxStream<'static, (ChannelId, u64, ChannelEvent)>>,
    topology: BTreeMap<OpId, TopologyReply>,
    consumers: BTreeMap<ConsumerId, ConsumerSender>,
    watchers: Vec<crate::watch::Sender>,
    /// Callers of `close`, each with the count of publishes resolved Closed
    /// before it asked.
    close_waiters: Vec<(oneshot::Sender<CloseSummary>, u64)>,
    /// Publishes resolved Closed by the driver itself (the supervisor counts
    /// its own).
    closed_here: u64,
    /// Callers of `Client::connected` waiting for the first contact.
    contact_waiters: Vec<oneshot::Sender<Result<(), TransportError>>>,
    /// Consumers whose caller waits for the broker's first answer.
    consume_replies: BTreeMap<ConsumerId, oneshot::Sender<Result<ConsumerId, ConsumeError>>>,
    flushes: BTreeMap<crate::outbox::FlushId, oneshot::Sender<Flushed>>,
    /// The time of the batch being taken, if one is.
    batch_now: Option<Instant>,
    /// Publish results to send once the lock is released: the publisher they
    /// wake can then take the lock for its next message at once.
    resolved: Vec<Resolved>,
    /// While wake-ups are handed to publishers, when the driver next looks at
    /// the channels itself, should one not be acted on
    /// ([`RELAY_GRACE`](crate::contract::RELAY_GRACE)).
    relay_due: Option<Instant>,
}

type Resolved = (ReplyKey, Result<Confirmation, PublishError>);

type ChannelOf<T> = <<T as Transport>::Connection as Connection>::Channel;

impl<T: Transport, K: Timer> State<T, K> {
    /// One poll of the driver: trips of (flush, re-arm the timer, take what is
    /// ready) until nothing is, every source then polled with `cx`; after
    /// [`TRIPS`] busy trips it yields to the executor.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        self.wake_driver = false;
        for _ in 0..TRIPS {
            // one reading of the clock per trip: it is a system call on some
            // machines, too dear for every input
            self.batch_now = Some(self.timer.now());
            self.flush();
            // Fully closed means every connection closed or its close timed out:
            // what is still running (orphaned dials, a hung close) is dropped.
            if self.sup.is_fully_closed() {
                self.batch_now = None;
                // a close that ran out of time counted what it gave up on
                let _ = self.finish();
                return Poll::Ready(());
            }
            self.guard_relay();
            self.rearm();
            let progressed = self.poll_sources(cx);
            self.batch_now = None;
            if !progressed {
                return Poll::Pending;
            }
        }
        // Yielding: what the last trip took is executed and routed first, so that
        // whenever the lock is free the supervisor holds no unrouted event (the
        // stats a client reads under it agree with what watchers have been sent).
        self.batch_now = Some(self.timer.now());
        self.flush();
        self.batch_now = None;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Re-arms the timer only for an earlier wake-up. The next wake-up is usually
    /// the oldest publish's deadline, which moves on with every confirm:
    /// re-arming each time would register a new timer per trip. A sleep armed too
    /// early wakes the supervisor for nothing once, and is then armed again.
    fn rearm(&mut self) {
        let next = self.next_wake();
        if earlier(next, self.armed) {
            self.armed = next;
            self.sleep = match next {
                Some(at) => self.timer.sleep_until(at).fuse(),
                None => Fuse::terminated(),
            };
        }
    }

    /// Takes what every source has ready, each in turn (a poll of an empty stream
    /// set costs as much as taking an item), up to [`BATCH`] items; whether it
    /// took any. A source left pending has `cx`'s waker.
    fn poll_sources(&mut self, cx: &mut Context<'_>) -> bool {
        let mut budget = BATCH;
        while budget > 0 {
            let start = budget;
            budget -= self.take_channel_events(budget);
            while budget > 0 && self.requests_open {
                match self.requests.as_mut().poll_next(cx) {
                    Poll::Ready(Some(request)) => self.on_request(request),
                    Poll::Ready(None) => {
                        // every Client handle is gone: nobody can use us; what
                        // they published is owed, so drain it
                        self.requests_open = false;
                        self.input(Input::Close);
                    }
                    Poll::Pending => break,
                }
                budget -= 1;
            }
            while budget > 0
                && let Poll::Ready(Some(done)) = self.ops.poll_next_unpin(cx)
            {
                self.on_done(done);
                budget -= 1;
            }
            while budget > 0
                && let Poll::Ready(Some((connection, epoch, event))) =
                    self.conn_events.poll_next(cx)
            {
                self.on_connection_event(connection, epoch, event);
                budget -= 1;
            }
            budget = budget.saturating_sub(self.pump_writers(cx));
            if budget > 0 && self.sleep.poll_unpin(cx).is_ready() {
                self.armed = None;
                self.input(Input::Timeout);
                budget -= 1;
            }
            if budget == start {
                break;
            }
        }
        budget < BATCH
    }

    /// Takes up to `budget` of the channels' events, their streams polled with
    /// the relay's waker (a run handed to a publisher is then moot); how many.
    fn take_channel_events(&mut self, budget: usize) -> usize {
        self.shared.relay.settled();
        let relay = self.relay.clone();
        let mut relayed = Context::from_waker(&relay);
        let mut taken = 0;
        while taken < budget
            && let Poll::Ready(Some((channel, generation, event))) =
                self.chan_events.poll_next(&mut relayed)
        {
            self.on_channel_event(channel, generation, event);
            taken += 1;
        }
        taken
    }

    /// Polls the writers that have work; how many failed (each is a lost
    /// channel, told to the supervisor).
    fn pump_writers(&mut self, cx: &mut Context<'_>) -> usize {
        let mut lost = Vec::new();
        for (id, slot) in &mut self.chans {
            if slot.writer.is_busy()
                && let Poll::Ready(Err(error)) = slot.writer.pump(cx)
            {
                lost.push((*id, slot.generation, error));
            }
        }
        let n = lost.len();
        for (channel, generation, error) in lost {
            self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::Lost(error),
            });
        }
        n
    }

    /// The channels' events on a publisher's task (see
    /// [`Engine::poll_here`]): what their streams have ready, up to a batch,
    /// and everything the supervisor has to do about it, as [`publish_here`]
    /// does for a publish. It polls no timer, dial, operation or request and
    /// makes no timer (the publisher's thread may be outside the runtime they
    /// belong to): returns the driver's waker if that left the driver
    /// something, to wake once the lock is released.
    ///
    /// [`publish_here`]: State::publish_here
    fn channels_here(&mut self) -> Option<Waker> {
        self.batch_now = Some(self.timer.now());
        let taken = self.take_channel_events(BATCH);
        self.flush();
        self.guard_relay();
        self.batch_now = None;
        // more ready than a batch, a deadline before the timer's, or work the
        // flush left: the driver takes it
        let next = self.next_wake();
        let wake = taken == BATCH
            || earlier(next, self.armed)
            || self.sup.is_fully_closed()
            || self.wake_driver;
        self.wake_driver = false;
        if wake { self.waker.clone() } else { None }
    }

    /// [`Client::publish`](crate::Client::publish) on the caller's thread: the
    /// requests queued before it first (call order; at most a batch of them, or
    /// the publish is given back to go behind the rest), then the publish, then
    /// everything the supervisor has to do about it. Returns the driver's waker
    /// if that left the driver something, to wake once the lock is released.
    fn publish_here(&mut self, request: Request) -> Result<Option<Waker>, Request> {
        self.batch_now = Some(self.timer.now());
        let mut taken = 0;
        while taken < BATCH
            && let Ok(earlier) = self.requests.try_recv()
        {
            self.on_request(earlier);
            taken += 1;
        }
        let result = if self.requests.is_empty() {
            self.on_request(request);
            Ok(())
        } else {
            self.wake_driver = true;
            Err(request)
        };
        self.flush();
        self.guard_relay();
        self.batch_now = None;
        // the driver's timer must fire by the earliest deadline now known
        let next = self.next_wake();
        let wake = earlier(next, self.armed) || self.sup.is_fully_closed() || self.wake_driver;
        self.wake_driver = false;
        let waker = if wake { self.waker.clone() } else { None };
        result.map(|()| waker)
    }

    fn now(&self) -> Instant {
        self.batch_now.unwrap_or_else(|| self.timer.now())
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        self.sup.handle(now, input);
    }

    fn next_wake(&self) -> Option<Instant> {
        let next = self.sup.poll_timeout();
        match (next, self.relay_due) {
            (Some(next), Some(due)) => Some(next.min(due)),
            (next, due) => next.or(due),
        }
    }

    /// Keeps the driver's timer looking at the channels every
    /// [`RELAY_GRACE`](crate::contract::RELAY_GRACE) while wake-ups are
    /// handed to publishers (see [`Relay`](crate::contract::Relay)); asks the
    /// relay only when the last look is due.
    fn guard_relay(&mut self) {
        let now = self.now();
        if self.relay_due.is_some_and(|due| due > now) {
            return;
        }
        self.relay_due = self
            .shared
            .relay
            .engaged()
            .then(|| now + crate::contract::RELAY_GRACE);
    }

    /// Executes every command and routes every event the supervisor has.
    fn flush(&mut self) {
        loop {
            let mut any = false;
            while let Some(command) = self.sup.poll_command() {
                any = true;
                self.execute(command);
            }
            while let Some((event, reply)) = self.sup.next_event() {
                any = true;
                match (event, reply) {
                    (Event::PublishResolved { result, .. }, Some(reply)) => {
                        self.resolved.push((ReplyKey::from_u64(reply), result));
                    }
                    (event, _) => self.route(event),
                }
            }
            if !any {
                break;
            }
        }
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Dial {
                connection,
                epoch,
                endpoint,
            } => self.dial(connection, epoch, endpoint),
            Command::OpenChannel {
                channel,
                epoch,
                generation,
            } => {
                let Some((e, conn)) = self.conns.get(&channel.connection) else {
                    return; // its connection is gone; the supervisor hears of it
                };
                if *e != epoch {
                    return;
                }
                let conn = Arc::clone(conn);
                let span = tracing::debug_span!(
                    target: targets::CHANNEL,
                    "channel_open",
                    %channel,
                    generation,
                    outcome = tracing::field::Empty,
                    duration_ms = tracing::field::Empty,
                );
                let started = self.now();
                self.ops.push(
                    async move {
                        let result = async {
                            let ch = conn.open_channel().await?;
                            ch.confirm_select().await?;
                            Ok(ch)
                        }
                        .await;
                        Done::Opened {
                            channel,
                            generation,
                            result,
                            span: tracing::Span::current(),
                            started,
                        }
                    }
                    .instrument(span)
                    .boxed(),
                );
                self.wake_driver = true;
            }
            Command::Publish {
                channel,
                generation,
                seq,
                message,
            } => self.outbound(channel, generation, Outbound::Publish(message), Some(seq)),
            Command::Ack {
                channel,
                generation,
                delivery_tag,
                kind,
            } => self.outbound(channel, generation, Outbound::Ack(delivery_tag, kind), None),
            Command::Topology {
                channel,
                generation,
                op,
            } => {
                let Some(slot) = self
                    .chans
                    .get(&channel)
                    .filter(|s| s.generation == generation)
                else {
                    return;
                };
                let ch = Arc::clone(&slot.writer.channel);
                self.ops.push(
                    async move {
                        let result = run_topology(&*ch, &op).await;
                        Done::Topology {
                            channel,
                            generation,
                            result,
                        }
                    }
                    .instrument(tracing::debug_span!(
                        target: targets::TOPOLOGY,
                        "topology_op",
                        %channel,
                        generation
                    ))
                    .boxed(),
                );
                self.wake_driver = true;
            }
            Command::CloseChannel {
                channel,
                generation,
            } => {
                if self
                    .chans
                    .get(&channel)
                    .is_some_and(|s| s.generation == generation)
                    && let Some(slot) = self.chans.remove(&channel)
                {
                    let ch = Arc::clone(&slot.writer.channel);
                    self.ops.push(
                        async move {
                            // what was queued on it goes first
                            slot.writer.finish().await;
                            let _ = ch.close().await;
                            Done::Nothing
                        }
                        .boxed(),
                    );
                    self.wake_driver = true;
                }
            }
            Command::CloseConnection { connection, epoch } => {
                // only the slot's adopted connection of this epoch is here (a dial
                // the supervisor no longer wanted was closed when it answered)
                let conn = match self.conns.get(&connection) {
                    Some((e, _)) if *e == epoch => self.conns.remove(&connection).map(|(_, c)| c),
                    _ => None,
                };
                // Acks (and publishes) already queued on this connection's channels
                // go out before connection.close: otherwise the broker requeues
                // deliveries the application acked.
                let writers: Vec<Writer<ChannelOf<T>>> = if conn.is_some() {
                    let ids: Vec<ChannelId> = self
                        .chans
                        .keys()
                        .filter(|id| id.connection == connection)
                        .copied()
                        .collect();
                    ids.iter()
                        .filter_map(|id| self.chans.remove(id))
                        .map(|slot| slot.writer)
                        .collect()
                } else {
                    Vec::new()
                };
                if let Some(conn) = conn {
                    self.ops.push(
                        async move {
                            // a writer that failed (broken channel) ends at once
                            for writer in writers {
                                writer.finish().await;
                            }
                            let _ = conn.close().await;
                            Done::ConnectionClosed { connection, epoch }
                        }
                        .boxed(),
                    );
                    self.wake_driver = true;
                }
            }
        }
    }

    fn dial(&mut self, connection: ConnectionId, epoch: u64, endpoint: Arc<Endpoint>) {
        let transport = Arc::clone(&self.transport);
        let options = self.options.clone();
        // Endpoint's Display redacts the password
        let span = tracing::debug_span!(
            target: targets::CONNECTION,
            "dial",
            %connection,
            epoch,
            endpoint = %endpoint,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let started = self.now();
        self.ops.push(
            async move {
                let result = transport.connect(&endpoint, &options).await;
                Done::Dialed {
                    connection,
                    epoch,
                    result,
                    span: tracing::Span::current(),
                    started,
                }
            }
            .instrument(span)
            .boxed(),
        );
        self.wake_driver = true;
    }

    /// Queues a write on its channel and starts it at once; one that does not
    /// complete is polled with the driver's waker (and the driver is woken).
    /// Queues `item` on the channel's writer; `seq` is a publish's number (from 1),
    /// checked against the publishes the writer took.
    fn outbound(&mut self, channel: ChannelId, generation: u64, item: Outbound, seq: Option<u64>) {
        let Some(slot) = self
            .chans
            .get_mut(&channel)
            .filter(|s| s.generation == generation && !s.writer.failed)
        else {
            return; // a lost channel: the supervisor hears of it
        };
        if let Some(seq) = seq {
            if seq != slot.published + 1 {
                // never expected: fail the channel so its messages are re-sent,
                // rather than pair confirms with the wrong ones
                let error = TransportError::Protocol(format!(
                    "publish number {seq} after {} on this channel",
                    slot.published
                ));
                tracing::error!(target: targets::CHANNEL, %channel, generation, %error, "publish out of sequence");
                self.input(Input::Channel {
                    channel,
                    generation,
                    event: ChannelInput::Lost(error),
                });
                return;
            }
            slot.published = seq;
        }
        slot.writer.queue.push_back(item);
        if slot.writer.current.is_some() {
            return; // behind a pending write: the driver polls it
        }
        let waker = self.waker.as_ref().unwrap_or(Waker::noop());
        match slot.writer.pump(&mut Context::from_waker(waker)) {
            Poll::Ready(Ok(())) => {}
            Poll::Pending => self.wake_driver = true,
            Poll::Ready(Err(error)) => self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::Lost(error),
            }),
        }
    }

    fn on_done(&mut self, done: Done<T::Connection, ChannelOf<T>>) {
        match done {
            Done::Dialed {
                connection,
                epoch,
                result,
                span,
                started,
            } => {
                span.record("outcome", if result.is_ok() { "ok" } else { "error" });
                span.record("duration_ms", self.millis_since(started));
                self.dialed(connection, epoch, result);
            }
            Done::Opened {
                channel,
                generation,
                result,
                span,
                started,
            } => {
                span.record("outcome", if result.is_ok() { "ok" } else { "error" });
                span.record("duration_ms", self.millis_since(started));
                self.opened(channel, generation, result);
            }
            Done::Topology {
                channel,
                generation,
                result,
            } => self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::TopologyDone(result),
            }),
            Done::ConnectionClosed { connection, epoch } => {
                self.input(Input::ConnectionClosed { connection, epoch })
            }
            Done::Nothing => {}
        }
    }

    fn millis_since(&self, started: Instant) -> f64 {
        self.now().saturating_duration_since(started).as_secs_f64() * 1e3
    }

    fn dialed(
        &mut self,
        connection: ConnectionId,
        epoch: u64,
        result: Result<T::Connection, TransportError>,
    ) {
        match result {
            Ok(conn) => {
                let conn = Arc::new(conn);
                let channel_max = conn.channel_max();
                self.input(Input::Tuned {
                    connection,
                    epoch,
                    channel_max,
                });
                self.input(Input::Connected { connection, epoch });
                if self.sup.connection_epoch(connection) != Some(epoch) {
                    // A dial the supervisor gave up on (timed out, superseded,
                    // closing) answered after all: close it here, and leave the
                    // slot's live connection and its channels alone.
                    tracing::debug!(
                        target: targets::CONNECTION,
                        client = self.client_name(),
                        %connection,
                        epoch,
                        "a dial given up on answered late: closed"
                    );
                    self.ops.push(
                        async move {
                            let _ = conn.close().await;
                            Done::Nothing
                        }
                        .boxed(),
                    );
                    self.wake_driver = true;
                    return;
                }
                let events = conn
                    .events()
                    .chain(futures::stream::once(async {
                        ConnectionEvent::Closed(TransportError::Io(
                            "connection event stream ended".into(),
                        ))
                    }))
                    .map(move |e| (connection, epoch, e))
                    .boxed();
                self.conn_events.push(events);
                tracing::info!(
                    target: targets::CONNECTION,
                    client = self.client_name(),
                    %connection,
                    epoch,
                    channel_max,
                    "connected"
                );
                // adopted before the commands of its Connected (channel opens) run
                self.conns.insert(connection, (epoch, conn));
            }
            Err(error) => {
                tracing::warn!(
                    target: targets::CONNECTION,
                    client = self.client_name(),
                    %connection,
                    epoch,
                    %error,
                    "dial failed"
                );
                self.input(Input::DialFailed {
                    connection,
                    epoch,
                    error,
                });
            }
        }
    }

    fn opened(
        &mut self,
        channel: ChannelId,
        generation: u64,
        result: Result<ChannelOf<T>, TransportError>,
    ) {
        match result {
            Ok(ch) => {
                let ch = Arc::new(ch);
                let events = ch
                    .events()
                    .chain(futures::stream::once(async {
                        ChannelEvent::Closed(TransportError::Io(
                            "channel event stream ended".into(),
                        ))
                    }))
                    .map(move |e| (channel, generation, e))
                    .boxed();
                self.chan_events.push(events);
                self.chans.insert(
                    channel,
                    ChanSlot {
                        generation,
                        writer: Writer::new(ch),
                        published: 0,
                    },
                );
                self.input(Input::Channel {
                    channel,
                    generation,
                    event: ChannelInput::Opened,
                });
            }
            Err(error) => self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::OpenFailed(error),
            }),
        }
    }

    /// The client's name, for tracing fields.
    fn client_name(&self) -> &str {
        self.options.connection_name.as_deref().unwrap_or("")
    }

    fn on_connection_event(
        &mut self,
        connection: ConnectionId,
        epoch: u64,
        event: ConnectionEvent,
    ) {
        let current = self
            .conns
            .get(&connection)
            .is_some_and(|(e, _)| *e == epoch);
        match event {
            ConnectionEvent::Closed(error) => {
                if current {
                    tracing::warn!(
                        target: targets::CONNECTION,
                        client = self.client_name(),
                        %connection,
                        epoch,
                        %error,
                        "connection lost"
                    );
                    self.conns.remove(&connection);
                    self.chans.retain(|id, _| id.connection != connection);
                }
                self.input(Input::ConnectionLost {
                    connection,
                    epoch,
                    error,
                });
            }
            ConnectionEvent::Blocked(reason) => self.input(Input::Blocked {
                connection,
                epoch,
                reason,
            }),
            ConnectionEvent::Unblocked => self.input(Input::Unblocked { connection, epoch }),
        }
    }

    fn on_channel_event(&mut self, channel: ChannelId, generation: u64, event: ChannelEvent) {
        let input = match event {
            ChannelEvent::Closed(error) => {
                if self
                    .chans
                    .get(&channel)
                    .is_some_and(|s| s.generation == generation)
                {
                    self.chans.remove(&channel);
                }
                Input::Channel {
                    channel,
                    generation,
                    event: ChannelInput::Lost(error),
                }
            }
            ChannelEvent::Ack {
                delivery_tag,
                multiple,
            } => Input::Channel {
                channel,
                generation,
                event: ChannelInput::Confirm {
                    delivery_tag,
                    multiple,
                    ack: true,
                },
            },
            ChannelEvent::Nack {
                delivery_tag,
                multiple,
            } => Input::Channel {
                channel,
                generation,
                event: ChannelInput::Confirm {
                    delivery_tag,
                    multiple,
                    ack: false,
                },
            },
            ChannelEvent::Delivery(delivery) => Input::Channel {
                channel,
                generation,
                event: ChannelInput::Delivery(delivery),
            },
            ChannelEvent::Return(returned) => Input::Channel {
                channel,
                generation,
                event: ChannelInput::Returned(returned),
            },
            ChannelEvent::ConsumerCancelled { consumer_tag } => Input::Channel {
                channel,
                generation,
                event: ChannelInput::ConsumerCancelled { consumer_tag },
            },
        };
        self.input(input);
    }

    /// The application let go of `consumer`: it is cancelled, and what it did
    /// not read goes back to the queue.
    fn drop_consumer(&mut self, consumer: ConsumerId) {
        let now = self.now();
        let _ = self.sup.cancel(now, consumer);
        if let Some(items) = self.consumers.remove(&consumer) {
            self.give_back(items.take_unread());
        }
    }

    /// Deliveries a dropped [`Consumer`](crate::Consumer) never read go back to
    /// their queue (a nack with requeue), rather than wait, unacked, for their
    /// channel to close. Those of a channel generation since lost, or of an
    /// auto-ack consumer, are not the client's to give back and are left.
    fn give_back(&mut self, unread: VecDeque<ConsumerItem>) {
        let now = self.now();
        for item in unread {
            if let ConsumerItem::Delivery {
                delivery,
                channel,
                generation,
            } = item
                // one from a lost generation is the broker's again already (and
                // is no stale ack of the application's to count)
                && self.sup.channel_generation(channel) == Some(generation)
                && self.sup.channel_state(channel).is_some_and(|s| s.is_open())
            {
                let requeue = AckKind::Nack {
                    multiple: false,
                    requeue: true,
                };
                let _ = self
                    .sup
                    .ack(now, channel, generation, delivery.delivery_tag, requeue);
            }
        }
    }

    fn on_request(&mut self, request: Request) {
        let now = self.now();
        match request {
            Request::Publish { reply, .. } if self.sup.is_closing() => {
                self.shared
                    .replies
                    .resolve(reply, Err(PublishError::Closed));
            }
            Request::Publish { message, reply, .. }
                if let Err(reason) = self.transport.check_message(&message) =>
            {
                self.shared
                    .replies
                    .resolve(reply, Err(PublishError::Invalid(reason)));
            }
            Request::Publish {
                message,
                timeout,
                wait,
                reply,
            } => {
                let deadline = timeout.map(|t| crate::supervisor::deadline_after(now, t));
                let accepted =
                    self.sup
                        .publish_replying(now, message, deadline, wait, reply.to_u64());
                if let Err(e) = accepted {
                    self.shared.replies.resolve(reply, Err(e));
                }
            }
            Request::Topology { op, reply } => match op(&mut self.sup, now) {
                Ok(id) => {
                    self.topology.insert(id, reply);
                }
                Err(e) => match reply {
                    TopologyReply::Unit(r) => {
                        let _ = r.send(Err(e));
                    }
                    TopologyReply::Queue(_, r) => {
                        let _ = r.send(Err(e));
                    }
                },
            },
            Request::DeclareQueue { decl, reply } => match self.sup.declare_queue(now, decl) {
                Ok((id, handle)) => {
                    self.topology
                        .insert(id, TopologyReply::Queue(handle, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Consume {
                queue,
                tag,
                options,
                items,
                reply,
            } => match self.sup.consume(now, queue, tag, options) {
                Ok(id) => {
                    // the caller hears the broker's first answer
                    self.consumers.insert(id, items);
                    self.consume_replies.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Cancel { consumer } => self.drop_consumer(consumer),
            Request::Ack {
                channel,
                generation,
                delivery_tag,
                kind,
                reply,
            } => {
                let _ = reply.send(self.sup.ack(now, channel, generation, delivery_tag, kind));
            }
            Request::Watch { events } => self.watchers.push(events),
            Request::Close { discard, done } => {
                let before = self.sup.stats().closed + self.closed_here;
                self.close_waiters.push((done, before));
                let close = if discard {
                    Input::CloseNow
                } else {
                    Input::Close
                };
                self.sup.handle(now, close);
                // nothing new is accepted from here: `is_closed()` and
                // `state().closed` say so while the close drains
                *lock(&self.shared.state) = ClientState::of(&self.sup);
                self.shared.closed.store(true, Ordering::SeqCst);
            }
            Request::Connected { reply } => match self.sup.first_contact() {
                Ok(true) => {
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
                Ok(false) => self.contact_waiters.push(reply),
            },
            Request::Flush { reply } => {
                let id = self.sup.flush(now);
                self.flushes.insert(id, reply);
            }
        }
    }

    fn route(&mut self, event: Event) {
        match event {
            // its reply is keyed in the outbox: `flush` takes it
            Event::PublishResolved { .. } => {}
            Event::Flushed {
                flush,
                not_confirmed,
            } => {
                if let Some(reply) = self.flushes.remove(&flush) {
                    let _ = reply.send(Flushed { not_confirmed });
                }
            }
            Event::TopologyResolved { op, result } => match self.topology.remove(&op) {
                Some(TopologyReply::Unit(reply)) => {
                    let _ = reply.send(result.map(|_| ()));
                }
                Some(TopologyReply::Queue(handle, reply)) => {
                    let _ = reply.send(result.map(|name| (handle, name.unwrap_or_default())));
                }
                None => {}
            },
            Event::Delivery {
                consumer,
                channel,
                generation,
                delivery,
            } => {
                let item = ConsumerItem::Delivery {
                    delivery,
                    channel,
                    generation,
                };
                if let Some(items) = self.consumers.get(&consumer) {
                    let sup = &self.sup;
                    let stale =
                        |channel, generation| sup.channel_generation(channel) != Some(generation);
                    if let Err(ReceiverGone(item)) = items.send(item, stale) {
                        // the application dropped the Consumer: stop it, and
                        // give back what it did not read, this one too
                        self.drop_consumer(consumer);
                        self.give_back(VecDeque::from([item]));
                    }
                } else {
                    // cancelled after the supervisor took it (a request handled
                    // between the two): it goes back to the queue
                    self.give_back(VecDeque::from([item]));
                }
            }
            Event::FirstContact { result } => {
                for reply in self.contact_waiters.drain(..) {
                    let _ = reply.send(result.clone());
                }
                self.broadcast(Event::FirstContact { result });
            }
            Event::ConsumeResolved { consumer, result } => {
                if result.is_err() {
                    self.consumers.remove(&consumer);
                }
                if let Some(reply) = self.consume_replies.remove(&consumer)
                    && reply.send(result.clone().map(|()| consumer)).is_err()
                    && result.is_ok()
                {
                    // the caller dropped its `consume` future: nobody will hold
                    // this consumer, so it is cancelled as a dropped one is
                    self.drop_consumer(consumer);
                }
                self.broadcast(Event::ConsumeResolved { consumer, result });
            }
            Event::ConsumerEnded { consumer, error } => {
                if let Some(items) = self.consumers.remove(&consumer) {
                    let _ = items.send(ConsumerItem::Ended(error.clone()), |_, _| false);
                }
                self.broadcast(Event::ConsumerEnded { consumer, error });
            }
            other => {
                self.update_state(&other);
                self.broadcast(other);
            }
        }
    }

    fn update_state(&self, event: &Event) {
        if let Event::QueueRenamed { queue, new, .. } = event {
            lock(&self.shared.queue_names).insert(*queue, new.clone());
        }
        if matches!(
            event,
            Event::StateChanged { .. } | Event::Blocked { .. } | Event::Unblocked { .. }
        ) {
            *lock(&self.shared.state) = ClientState::of(&self.sup);
        }
    }

    fn broadcast(&mut self, event: Event) {
        self.watchers.retain(|w| w.send(&event));
    }

    /// Everything still waiting resolves; consumers end. Returns how many
    /// accepted publishes it resolved `Closed` (queued for the driver or in
    /// the outbox): what a driver dropped before it ended did not send.
    fn finish(&mut self) -> usize {
        self.done = true;
        let mut lost = 0;
        // nothing new is taken; what was sent and not taken is dropped (its
        // replies resolve `Closed`)
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            if let Request::Publish { reply, .. } = request {
                lost += usize::from(
                    self.shared
                        .replies
                        .resolve(reply, Err(PublishError::Closed)),
                );
            }
        }
        // what the supervisor still owes resolves Closed there too, so that
        // its stats count it as the futures see it
        let abandoned = self.sup.abandon_publishes();
        // every publish accepted and not resolved (or resolved and its event not
        // routed), in slot order: the same every run, as the simulator needs
        let unresolved: Vec<Resolved> = self
            .sup
            .publish_replies()
            .map(|reply| (ReplyKey::from_u64(reply), Err(PublishError::Closed)))
            .collect();
        let closed = self.shared.replies.resolve_all(unresolved);
        lost += closed;
        // those the supervisor resolved above are in its `closed` already
        self.closed_here += (closed as u64).saturating_sub(abandoned);
        for (_, reply) in std::mem::take(&mut self.topology) {
            match reply {
                TopologyReply::Unit(r) => {
                    let _ = r.send(Err(TopologyError::Closed));
                }
                TopologyReply::Queue(_, r) => {
                    let _ = r.send(Err(TopologyError::Closed));
                }
            }
        }
        for (_, reply) in std::mem::take(&mut self.consume_replies) {
            let _ = reply.send(Err(ConsumeError::Closed));
        }
        // `connected()` and `flush()` callers still waiting hear `Closed` (their
        // senders go)
        self.contact_waiters.clear();
        self.flushes.clear();
        // their channels are gone: what acking consumers hold goes back to
        // the broker, not to the application
        for (_, items) in std::mem::take(&mut self.consumers) {
            items.end(ConsumeError::Closed);
        }
        *lock(&self.shared.state) = ClientState::of(&self.sup);
        self.shared.closed.store(true, Ordering::SeqCst);
        // every publish future resolves before `close()` returns
        let resolved = std::mem::take(&mut self.resolved);
        self.shared.replies.resolve_all(resolved);
        let closed = self.sup.stats().closed + self.closed_here;
        for (done, before) in self.close_waiters.drain(..) {
            let _ = done.send(CloseSummary {
                unresolved: closed.saturating_sub(before),
            });
        }
        // watch streams end; the transport's objects go now, not when the last
        // client handle does
        self.watchers.clear();
        self.chans.clear();
        self.conns.clear();
        self.ops = FuturesUnordered::new();
        self.conn_events = StreamSet::default();
        self.chan_events = StreamSet::default();
        self.sleep = Fuse::terminated();
        self.waker = None;
        tracing::debug!(target: targets::CLIENT, "driver finished");
        lost
    }
}

/// One topology step on a channel: `basic.qos`, `basic.consume` and `basic.cancel`
/// through their own methods, every declare, delete, bind and unbind through
/// [`Channel::run`]. Answers a declared queue's real name.
async fn run_topology<C: Channel>(
    ch: &C,
    op: &TopologyOp,
) -> Result<Option<String>, TransportError> {
    match op {
        TopologyOp::Qos { prefetch_count } => ch.qos(*prefetch_count).await.map(|()| None),
        TopologyOp::Consume {
            queue,
            consumer_tag,
            options,
        } => ch
            .consume(queue, consumer_tag, options)
            .await
            .map(|()| None),
        TopologyOp::Cancel { consumer_tag } => ch.cancel(consumer_tag).await.map(|()| None),
        op => match (op, ch.run(op).await?) {
            (_, TopologyOutcome::Queue(info)) => Ok(Some(info.name)),
            (TopologyOp::DeclareQueue(_), other) => Err(other.unexpected("queue.declare")),
            _ => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// What the driver moves once or more per confirm and per publish stays
    /// small: the large, rare payloads (deliveries, returns, properties) are
    /// boxed or behind the message's `Arc`: a confirm's `ChannelEvent` passes
    /// through several stream adaptors, so each byte of it is copied many times.
    #[test]
    fn the_hot_path_types_stay_small() {
        assert!(size_of::<crate::transport::ChannelEvent>() <= 40);
        assert!(size_of::<crate::supervisor::Input>() <= 64);
        assert!(size_of::<super::Outbound>() <= 16);
        assert!(size_of::<crate::event::Event>() <= 96);
        assert!(size_of::<crate::contract::Request>() <= 112);
        // one per message waiting in the outbox
        assert!(size_of::<crate::outbox::Entry>() <= 48);
    }
}
