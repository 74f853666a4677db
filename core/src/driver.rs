//! The [`Driver`]: one future per client that runs the [`Supervisor`] against a
//! [`Transport`] and a [`Timer`], on any executor.
//!
//! It feeds transport results, transport notifications, application requests and
//! timer expiry into the supervisor, and executes the supervisor's commands
//! concurrently (a `FuturesUnordered`, no spawning). It makes no protocol decision
//! of its own: every retry, reopen and re-publish is the supervisor's.
//!
//! What it drains or retains (pending replies at the end, channels of a lost
//! connection) goes in id order, so the same inputs give the same wake-up order,
//! and the simulator's same-seed-same-trace holds: its maps are ordered
//! (`BTreeMap`), except the publish replies, the one map touched twice per
//! message, which is hashed by id and sorted on the rare path that drains it.
//!
//! Per channel, publishes and acks go through one sequential worker future, so the
//! broker sees them in the order the supervisor emitted them (confirm sequence
//! numbers depend on it); topology operations run one at a time per channel, as
//! the supervisor issues them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::channel::{mpsc, oneshot};
use futures::future::{BoxFuture, Fuse, FutureExt};
use futures::stream::{BoxStream, FuturesUnordered, SelectAll, StreamExt};
use tracing::Instrument;

use crate::client::{ClientState, ConsumerItem, Received, Request, Shared};
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::event::Event;
use crate::ids::{ChannelId, ConnectionId};
use crate::message::Message;
use crate::outbox::{Confirmation, IdHash, PublishError, PublishId};
use crate::supervisor::{Command, Input, Supervisor};
use crate::topology::{AckKind, ConsumerId, OpId, QueueHandle, TopologyError, TopologyOp};
use crate::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, Sleep, Timer, Transport,
};

/// Items one trip through the driver's loop takes before it flushes and looks at
/// its timers again.
const BATCH: usize = 256;

/// Runs a client: spawn it on any executor (or `.await` it); it completes after
/// [`Client::close`](crate::Client::close) or when every `Client` handle is
/// dropped. Dropping it drops every transport connection and resolves every
/// pending operation with a `Closed` error.
#[must_use = "the client does nothing unless its driver is spawned or awaited"]
pub struct Driver {
    inner: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
}

impl Driver {
    pub(crate) fn new<T: Transport, K: Timer>(
        sup: Supervisor,
        transport: T,
        timer: K,
        requests: async_channel::Receiver<Request>,
        shared: Arc<Shared>,
        options: ConnectOptions,
    ) -> Driver {
        let state = State {
            sup,
            transport: Arc::new(transport),
            timer,
            options,
            shared,
            conns: BTreeMap::new(),
            chans: BTreeMap::new(),
            ops: FuturesUnordered::new(),
            conn_events: SelectAll::new(),
            chan_events: SelectAll::new(),
            publishes: HashMap::default(),
            topology: BTreeMap::new(),
            consumers: BTreeMap::new(),
            watchers: Vec::new(),
            parked: VecDeque::new(),
            close_waiters: Vec::new(),
            batch_now: None,
        };
        Driver {
            inner: Box::pin(state.run(requests)),
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

/// What the channel worker sends, in order.
enum Outbound {
    Publish(Arc<Message>),
    Ack(u64, AckKind),
    /// Answered once everything queued before it has been handed to the
    /// transport (so a connection close does not overtake acks).
    Flush(oneshot::Sender<()>),
}

/// The result of one command's future.
enum Done<C, H> {
    Dialed {
        connection: ConnectionId,
        epoch: u64,
        result: Result<C, TransportError>,
    },
    Opened {
        channel: ChannelId,
        generation: u64,
        result: Result<H, TransportError>,
    },
    Topology {
        channel: ChannelId,
        generation: u64,
        result: Result<Option<String>, TransportError>,
    },
    WorkerEnded {
        channel: ChannelId,
        generation: u64,
        error: TransportError,
    },
    ConnectionClosed {
        connection: ConnectionId,
        epoch: u64,
    },
    Nothing,
}

type Reply<T> = oneshot::Sender<T>;

struct ChanSlot<H> {
    generation: u64,
    channel: Arc<H>,
    outbound: mpsc::UnboundedSender<Outbound>,
}

struct State<T: Transport, K: Timer> {
    sup: Supervisor,
    transport: Arc<T>,
    timer: K,
    options: ConnectOptions,
    shared: Arc<Shared>,
    conns: BTreeMap<ConnectionId, (u64, Arc<T::Connection>)>,
    chans: BTreeMap<ChannelId, ChanSlot<ChannelOf<T>>>,
    ops: FuturesUnordered<BoxFuture<'static, Done<T::Connection, ChannelOf<T>>>>,
    conn_events: SelectAll<BoxStream<'static, (ConnectionId, u64, ConnectionEvent)>>,
    chan_events: SelectAll<BoxStream<'static, (ChannelId, u64, ChannelEvent)>>,
    publishes: HashMap<PublishId, Reply<Result<Confirmation, PublishError>>, IdHash>,
    topology: BTreeMap<OpId, TopologyReply>,
    consumers: BTreeMap<ConsumerId, mpsc::UnboundedSender<ConsumerItem>>,
    watchers: Vec<mpsc::UnboundedSender<Event>>,
    /// Publishes waiting for room in a full outbox (the caller chose to wait).
    parked: VecDeque<ParkedPublish>,
    close_waiters: Vec<oneshot::Sender<()>>,
    /// The time of the batch [`State::drain_ready`] is taking, if it is.
    batch_now: Option<Instant>,
}

type ChannelOf<T> = <<T as Transport>::Connection as Connection>::Channel;

pub(crate) enum TopologyReply {
    Unit(Reply<Result<(), TopologyError>>),
    Queue(
        QueueHandle,
        Reply<Result<(QueueHandle, String), TopologyError>>,
    ),
}

pub(crate) struct ParkedPublish {
    pub(crate) message: Arc<Message>,
    pub(crate) deadline: Instant,
    pub(crate) reply: Reply<Result<Confirmation, PublishError>>,
}

impl<T: Transport, K: Timer> State<T, K> {
    async fn run(mut self, requests: async_channel::Receiver<Request>) {
        let mut requests = std::pin::pin!(requests);
        let span = tracing::debug_span!("amqp_rebound", client = ?self.options.connection_name);
        let _entered = span.enter();
        let mut sleep: Fuse<Sleep> = Fuse::terminated();
        let mut armed: Option<Instant> = None;
        let mut requests_open = true;
        loop {
            self.flush();
            // Fully closed means every connection closed or its close timed out:
            // what is still running (orphaned dials, a hung close) is dropped.
            if self.sup.is_fully_closed() {
                break;
            }
            // Re-arm only for an earlier wake-up. The next wake-up is usually the
            // oldest publish's deadline, which moves on with every confirm: re-arming
            // each time would register a new timer per trip. A sleep armed too early
            // wakes the supervisor for nothing once, and is then armed again.
            let next = self.next_wake();
            let rearm = match (next, armed) {
                (Some(at), Some(current)) => at < current,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if rearm {
                armed = next;
                sleep = match next {
                    Some(at) => self.timer.sleep_until(at).fuse(),
                    None => Fuse::terminated(),
                };
            }
            futures::select_biased! {
                done = self.ops.select_next_some() => self.on_done(done),
                (connection, epoch, event) = self.conn_events.select_next_some() => {
                    self.on_connection_event(connection, epoch, event)
                }
                (channel, generation, event) = self.chan_events.select_next_some() => {
                    self.on_channel_event(channel, generation, event)
                }
                request = requests.next() => match request {
                    Some(request) => self.on_request(request),
                    None => {
                        if requests_open {
                            requests_open = false;
                            // every Client handle is gone: nobody can use us
                            self.input(Input::Close);
                        }
                    }
                },
                () = sleep => {
                    armed = None;
                    self.input(Input::Timeout);
                }
            }
            self.drain_ready(&requests);
        }
        self.finish();
    }

    /// Takes whatever else is ready right now (up to a bound), so that one trip
    /// through the select and one flush serve a batch, not a single item. Polling
    /// here uses a no-op waker; the select at the top of the loop polls every
    /// source again with the real one before the driver sleeps, so no wake-up is
    /// lost.
    fn drain_ready(&mut self, requests: &async_channel::Receiver<Request>) {
        // one reading of the clock for the batch (it is a system call on some
        // machines, and was ~1% of the CPU per message)
        self.batch_now = Some(self.timer.now());
        self.drain_batch(requests);
        self.batch_now = None;
    }

    /// Each source is drained in turn (a poll of an empty stream set costs as
    /// much as taking an item), up to [`BATCH`] items in all.
    fn drain_batch(&mut self, requests: &async_channel::Receiver<Request>) {
        let mut budget = BATCH;
        while budget > 0 {
            let start = budget;
            while budget > 0
                && let Some(Some((channel, generation, event))) =
                    self.chan_events.next().now_or_never()
            {
                self.on_channel_event(channel, generation, event);
                budget -= 1;
            }
            while budget > 0
                && let Ok(request) = requests.try_recv()
            {
                self.on_request(request);
                budget -= 1;
            }
            while budget > 0
                && let Some(Some(done)) = self.ops.next().now_or_never()
            {
                self.on_done(done);
                budget -= 1;
            }
            if budget == start {
                return;
            }
        }
    }

    fn now(&self) -> Instant {
        self.batch_now.unwrap_or_else(|| self.timer.now())
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        self.sup.handle(now, input);
    }

    fn next_wake(&self) -> Option<Instant> {
        let parked = self.parked.iter().map(|p| p.deadline).min();
        match (self.sup.poll_timeout(), parked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Executes every command and routes every event the supervisor has.
    fn flush(&mut self) {
        loop {
            self.retry_parked();
            let mut any = false;
            while let Some(command) = self.sup.poll_command() {
                any = true;
                self.execute(command);
            }
            while let Some(event) = self.sup.poll_event() {
                any = true;
                self.route(event);
            }
            if !any {
                break;
            }
        }
        *lock(&self.shared.stats) = self.sup.stats();
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
                        }
                    }
                    .instrument(tracing::debug_span!("open_channel", %channel, generation))
                    .boxed(),
                );
            }
            Command::Publish {
                channel,
                generation,
                message,
                ..
            } => self.outbound(channel, generation, Outbound::Publish(message)),
            Command::Ack {
                channel,
                generation,
                delivery_tag,
                kind,
            } => self.outbound(channel, generation, Outbound::Ack(delivery_tag, kind)),
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
                let ch = Arc::clone(&slot.channel);
                self.ops.push(
                    async move {
                        let result = run_topology(&*ch, &op).await;
                        Done::Topology {
                            channel,
                            generation,
                            result,
                        }
                    }
                    .instrument(tracing::debug_span!("topology", %channel, generation))
                    .boxed(),
                );
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
                    self.ops.push(
                        async move {
                            let _ = slot.channel.close().await;
                            Done::Nothing
                        }
                        .boxed(),
                    );
                }
            }
            Command::CloseConnection { connection, epoch } => {
                let conn = match self.conns.get(&connection) {
                    Some((e, _)) if *e == epoch => self.conns.remove(&connection).map(|(_, c)| c),
                    _ => None,
                };
                // Acks (and publishes) already queued on this connection's channel
                // workers go out before connection.close: otherwise the broker
                // requeues deliveries the application acked.
                let flushed: Vec<oneshot::Receiver<()>> = self
                    .chans
                    .iter()
                    .filter(|(id, _)| id.connection == connection)
                    .map(|(_, slot)| {
                        let (done, flushed) = oneshot::channel();
                        let _ = slot.outbound.unbounded_send(Outbound::Flush(done));
                        flushed
                    })
                    .collect();
                self.chans.retain(|id, _| id.connection != connection);
                if let Some(conn) = conn {
                    self.ops.push(
                        async move {
                            // a worker that ended (broken channel) answers at once
                            for worker in flushed {
                                let _ = worker.await;
                            }
                            let _ = conn.close().await;
                            Done::ConnectionClosed { connection, epoch }
                        }
                        .boxed(),
                    );
                }
            }
        }
    }

    fn dial(&mut self, connection: ConnectionId, epoch: u64, endpoint: Arc<Endpoint>) {
        tracing::debug!(%connection, epoch, %endpoint, "dialling");
        let transport = Arc::clone(&self.transport);
        let options = self.options.clone();
        // Endpoint's Display redacts the password
        let endpoint_shown = endpoint.to_string();
        self.ops.push(
            async move {
                let result = transport.connect(&endpoint, &options).await;
                Done::Dialed {
                    connection,
                    epoch,
                    result,
                }
            }
            .instrument(tracing::debug_span!("dial", %connection, epoch, %endpoint_shown))
            .boxed(),
        );
    }

    fn outbound(&mut self, channel: ChannelId, generation: u64, item: Outbound) {
        if let Some(slot) = self
            .chans
            .get(&channel)
            .filter(|s| s.generation == generation)
        {
            // a closed worker means the channel broke; its loss is reported
            let _ = slot.outbound.unbounded_send(item);
        }
    }

    fn on_done(&mut self, done: Done<T::Connection, ChannelOf<T>>) {
        match done {
            Done::Dialed {
                connection,
                epoch,
                result,
            } => match result {
                Ok(conn) => {
                    let conn = Arc::new(conn);
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
                    self.conns.insert(connection, (epoch, conn));
                    tracing::info!(%connection, epoch, "connected");
                    self.input(Input::Connected { connection, epoch });
                }
                Err(error) => {
                    tracing::warn!(%connection, epoch, %error, "dial failed");
                    self.input(Input::DialFailed {
                        connection,
                        epoch,
                        error,
                    });
                }
            },
            Done::Opened {
                channel,
                generation,
                result,
            } => match result {
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
                    let (tx, rx) = mpsc::unbounded();
                    self.ops.push(
                        worker(Arc::clone(&ch), rx, channel, generation)
                            .instrument(tracing::debug_span!("channel", %channel, generation))
                            .boxed(),
                    );
                    self.chans.insert(
                        channel,
                        ChanSlot {
                            generation,
                            channel: ch,
                            outbound: tx,
                        },
                    );
                    self.input(Input::ChannelOpened {
                        channel,
                        generation,
                    });
                }
                Err(error) => self.input(Input::ChannelOpenFailed {
                    channel,
                    generation,
                    error,
                }),
            },
            Done::Topology {
                channel,
                generation,
                result,
            } => self.input(Input::TopologyDone {
                channel,
                generation,
                result,
            }),
            Done::WorkerEnded {
                channel,
                generation,
                error,
            } => self.input(Input::ChannelLost {
                channel,
                generation,
                error,
            }),
            Done::ConnectionClosed { connection, epoch } => {
                self.input(Input::ConnectionClosed { connection, epoch })
            }
            Done::Nothing => {}
        }
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
                    tracing::warn!(%connection, epoch, %error, "connection lost");
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
                Input::ChannelLost {
                    channel,
                    generation,
                    error,
                }
            }
            ChannelEvent::Ack {
                delivery_tag,
                multiple,
            } => Input::Confirm {
                channel,
                generation,
                delivery_tag,
                multiple,
                ack: true,
            },
            ChannelEvent::Nack {
                delivery_tag,
                multiple,
            } => Input::Confirm {
                channel,
                generation,
                delivery_tag,
                multiple,
                ack: false,
            },
            ChannelEvent::Delivery(delivery) => Input::Delivery {
                channel,
                generation,
                delivery,
            },
            ChannelEvent::Return(returned) => Input::Returned {
                channel,
                generation,
                returned,
            },
            ChannelEvent::ConsumerCancelled { consumer_tag } => Input::ConsumerCancelled {
                channel,
                generation,
                consumer_tag,
            },
        };
        self.input(input);
    }

    fn on_request(&mut self, request: Request) {
        let now = self.now();
        match request {
            Request::Publish {
                message,
                timeout,
                wait,
                reply,
            } => match self.sup.publish(
                now,
                Arc::clone(&message),
                timeout.and_then(|t| now.checked_add(t)),
            ) {
                Ok(id) => {
                    self.publishes.insert(id, reply);
                }
                Err(PublishError::Backpressure { .. }) if wait => {
                    let deadline = now + timeout.unwrap_or(self.sup.config().publish_timeout);
                    self.parked.push_back(ParkedPublish {
                        message,
                        deadline,
                        reply,
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
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
                    self.consumers.insert(id, items);
                    let _ = reply.send(Ok(id));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Cancel { consumer } => {
                let _ = self.sup.cancel(now, consumer);
                self.consumers.remove(&consumer);
            }
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
            Request::Close { done } => {
                self.close_waiters.push(done);
                self.sup.handle(now, Input::Close);
            }
        }
    }

    /// Parked publishes go in as soon as the outbox has room, oldest first; past
    /// their deadline they resolve as timed out.
    fn retry_parked(&mut self) {
        let capacity = self.sup.config().outbox_capacity;
        while !self.parked.is_empty() {
            let now = self.now();
            if self.sup.is_closed() {
                for p in self.parked.drain(..) {
                    let _ = p.reply.send(Err(PublishError::Closed));
                }
                return;
            }
            let expired = self.parked.front().is_some_and(|p| p.deadline <= now);
            if !expired && self.sup.outbox_pending() >= capacity {
                return;
            }
            let Some(p) = self.parked.pop_front() else {
                return;
            };
            match self.sup.publish(now, p.message, Some(p.deadline)) {
                Ok(id) => {
                    self.publishes.insert(id, p.reply);
                }
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
            }
        }
    }

    fn route(&mut self, event: Event) {
        match event {
            Event::PublishResolved { id, result } => {
                if let Some(reply) = self.publishes.remove(&id) {
                    let _ = reply.send(result);
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
                if let Some(items) = self.consumers.get(&consumer) {
                    let item = ConsumerItem::Delivery(Box::new(Received::new(
                        *delivery, channel, generation,
                    )));
                    if items.unbounded_send(item).is_err() {
                        // the application dropped the Consumer: stop it
                        self.consumers.remove(&consumer);
                        let now = self.now();
                        let _ = self.sup.cancel(now, consumer);
                    }
                }
            }
            Event::ConsumerEnded { consumer, error } => {
                if let Some(items) = self.consumers.remove(&consumer) {
                    let _ = items.unbounded_send(ConsumerItem::Ended(error.clone()));
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
        self.watchers
            .retain(|w| w.unbounded_send(event.clone()).is_ok());
    }

    /// Everything still waiting resolves; consumers end.
    fn finish(&mut self) {
        let mut publishes: Vec<_> = std::mem::take(&mut self.publishes).into_iter().collect();
        publishes.sort_unstable_by_key(|(id, _)| *id);
        for (_, reply) in publishes {
            let _ = reply.send(Err(PublishError::Closed));
        }
        for p in self.parked.drain(..) {
            let _ = p.reply.send(Err(PublishError::Closed));
        }
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
        for (_, items) in std::mem::take(&mut self.consumers) {
            let _ =
                items.unbounded_send(ConsumerItem::Ended(crate::topology::ConsumeError::Closed));
        }
        *lock(&self.shared.state) = ClientState::of(&self.sup);
        *lock(&self.shared.stats) = self.sup.stats();
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for done in self.close_waiters.drain(..) {
            let _ = done.send(());
        }
        tracing::debug!("driver finished");
    }
}

/// Publishes and acks of one channel generation, one at a time, in order.
async fn worker<T, C>(
    channel: Arc<C>,
    mut items: mpsc::UnboundedReceiver<Outbound>,
    id: ChannelId,
    generation: u64,
) -> Done<T, C>
where
    C: Channel,
{
    while let Some(item) = items.next().await {
        let result = match item {
            Outbound::Publish(message) => channel.publish(&message).await,
            Outbound::Ack(tag, AckKind::Ack { multiple }) => channel.ack(tag, multiple).await,
            Outbound::Ack(tag, AckKind::Nack { multiple, requeue }) => {
                channel.nack(tag, multiple, requeue).await
            }
            Outbound::Ack(tag, AckKind::Reject { requeue }) => channel.reject(tag, requeue).await,
            Outbound::Flush(done) => {
                let _ = done.send(());
                Ok(())
            }
        };
        if let Err(error) = result {
            return Done::WorkerEnded {
                channel: id,
                generation,
                error,
            };
        }
    }
    Done::Nothing
}

async fn run_topology<C: Channel>(
    ch: &C,
    op: &TopologyOp,
) -> Result<Option<String>, TransportError> {
    match op {
        TopologyOp::DeclareExchange(decl) => ch.declare_exchange(decl).await.map(|()| None),
        TopologyOp::DeleteExchange { name } => ch.delete_exchange(name).await.map(|()| None),
        TopologyOp::DeclareQueue(decl) => ch.declare_queue(decl).await.map(|q| Some(q.name)),
        TopologyOp::DeleteQueue { name } => ch.delete_queue(name).await.map(|_| None),
        TopologyOp::BindQueue {
            queue,
            exchange,
            routing_key,
            arguments,
        } => ch
            .bind_queue(queue, exchange, routing_key, arguments)
            .await
            .map(|()| None),
        TopologyOp::UnbindQueue {
            queue,
            exchange,
            routing_key,
            arguments,
        } => ch
            .unbind_queue(queue, exchange, routing_key, arguments)
            .await
            .map(|()| None),
        TopologyOp::BindExchange {
            destination,
            source,
            routing_key,
            arguments,
        } => ch
            .bind_exchange(destination, source, routing_key, arguments)
            .await
            .map(|()| None),
        TopologyOp::UnbindExchange {
            destination,
            source,
            routing_key,
            arguments,
        } => ch
            .unbind_exchange(destination, source, routing_key, arguments)
            .await
            .map(|()| None),
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
    }
}

/// Locks a mutex, ignoring poisoning: the data are plain snapshots.
pub(crate) fn lock<V>(m: &Mutex<V>) -> std::sync::MutexGuard<'_, V> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// What the driver moves once or more per confirm and per publish stays
    /// small: the large, rare payloads (deliveries, returns, properties) are
    /// boxed or behind the message's `Arc`. (A 392-byte `ChannelEvent` was moved
    /// through five stream adaptors per confirm before.)
    #[test]
    fn the_hot_path_types_stay_small() {
        assert!(size_of::<crate::transport::ChannelEvent>() <= 40);
        assert!(size_of::<crate::supervisor::Input>() <= 64);
        assert!(size_of::<super::Outbound>() <= 16);
        assert!(size_of::<crate::event::Event>() <= 96);
        assert!(size_of::<crate::client::Request>() <= 112);
    }
}
