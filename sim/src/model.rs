//! The broker's state and the processing of every frame: the synchronous heart of the
//! simulator. [`crate::SimBroker`] wraps it in a lock; [`crate::transport`] feeds it
//! requests through the per-connection wire queues.
//!
//! # The wire
//!
//! Every connection has two FIFO queues, stamped with the virtual time each item is
//! due at the other end: `up` (client to broker: requests) and `down` (broker to
//! client: replies, deliveries, confirms, returns, cancels, closes). An item is due
//! one latency after it was sent, and never before the item ahead of it, so each
//! direction keeps its order like a TCP stream. A clock action per item flushes the
//! queue when it falls due. While the connection's host is partitioned both queues
//! stall; when it heals they drain. A publish at the head of `up` stalls while the
//! connection is blocked (RabbitMQ stops reading from a blocked publisher's socket).
//!
//! A connection is closed on the broker side ([`State::close_conn_broker`]: channels
//! closed, unacked messages requeued, exclusive queues deleted) possibly before the
//! client learns of it ([`State::notify_client_closed`]: the `Closed` events, pending
//! calls fail, both queues dropped). A kill does both at once; a broker close queues
//! its `Closed` behind the frames already in flight; a partition tells the client only
//! at the heartbeat timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::message::{Delivery, FieldTable, Message, Returned};
use amqp_rebound_core::topology::{ConsumeOptions, ExchangeDecl, ExchangeKind, QueueDecl};
use amqp_rebound_core::transport::{ChannelEvent, ConnectOptions, ConnectionEvent, QueueInfo};
use futures::channel::{mpsc, oneshot};

use crate::broker::{
    BindingDestination, BindingSnapshot, BrokerConfig, BrokerStats, ConfirmMode, ConnectionInfo,
    ConnectionStats, ExchangeSnapshot, LedgerEntry, QueueSnapshot, SimConnectionId, StoredMessage,
};
use crate::clock::VirtualClock;
use crate::routing::{headers_match, topic_matches};

/// A request from a client, as it travels up the wire.
pub(crate) struct Request {
    pub(crate) chan: Option<u64>,
    pub(crate) op: Op,
    pub(crate) reply: Option<ReplyTx>,
}

/// Where a call's answer goes.
pub(crate) type ReplyTx = oneshot::Sender<Result<Reply, TransportError>>;

/// One AMQP method from the client.
pub(crate) enum Op {
    OpenChannel,
    CloseConnection,
    CloseChannel,
    ConfirmSelect,
    Qos(u16),
    DeclareExchange(Box<ExchangeDecl>),
    DeleteExchange(String),
    DeclareQueue(Box<QueueDecl>),
    DeleteQueue(String),
    BindQueue {
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    },
    UnbindQueue {
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    },
    BindExchange {
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
    },
    UnbindExchange {
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
    },
    Publish(Box<Message>),
    Consume {
        queue: String,
        consumer_tag: String,
        options: Box<ConsumeOptions>,
    },
    Cancel(String),
    Ack {
        delivery_tag: u64,
        multiple: bool,
    },
    Nack {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        delivery_tag: u64,
        requeue: bool,
    },
}

/// A successful answer to a call.
pub(crate) enum Reply {
    Done,
    Channel {
        key: u64,
        number: u16,
        events: mpsc::UnboundedReceiver<ChannelEvent>,
    },
    Queue(QueueInfo),
    Count(u32),
}

/// One item travelling down the wire.
enum Down {
    Reply(ReplyTx, Result<Reply, TransportError>),
    Conn(ConnectionEvent),
    Chan(u64, Box<ChannelEvent>),
}

impl Down {
    fn chan(chan: u64, event: ChannelEvent) -> Down {
        Down::Chan(chan, Box::new(event))
    }
}

/// What a clock action asks the broker to do.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    FlushUp(u64),
    FlushDown(u64),
    HeartbeatCheck {
        conn: u64,
        host: String,
        epoch: u64,
    },
    DelayedConfirm {
        conn: u64,
        chan: u64,
        delivery_tag: u64,
    },
}

/// A failed method: what it closes.
enum Fail {
    Channel(TransportError),
    Connection(TransportError),
}

fn reply(code: u16, text: impl Into<String>) -> TransportError {
    TransportError::Reply {
        code,
        text: text.into(),
    }
}

fn channel_fail(code: u16, text: impl Into<String>) -> Fail {
    Fail::Channel(reply(code, text))
}

fn not_found_queue(name: &str) -> Fail {
    channel_fail(
        reply_code::NOT_FOUND,
        format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    )
}

fn not_found_exchange(name: &str) -> Fail {
    channel_fail(
        reply_code::NOT_FOUND,
        format!("NOT_FOUND - no exchange '{name}' in vhost '/'"),
    )
}

fn locked(name: &str) -> Fail {
    channel_fail(
        reply_code::RESOURCE_LOCKED,
        format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'"
        ),
    )
}

/// Why queued messages were dropped, for the conservation counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropCause {
    Delete,
    Restart,
}

#[derive(Debug, Default)]
pub(crate) struct HostState {
    refuse_until: Option<Instant>,
    refuse_forever: bool,
    /// The epoch of the partition in force, if any.
    partition: Option<u64>,
}

struct Exchange {
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
    builtin: bool,
    had_binding: bool,
}

struct Queue {
    id: u64,
    durable: bool,
    owner: Option<u64>,
    auto_delete: bool,
    arguments: FieldTable,
    ready: VecDeque<StoredMessage>,
    /// Consumers in registration order, for round-robin.
    consumers: Vec<(u64, String)>,
    next_consumer: usize,
    had_consumer: bool,
}

#[derive(Clone, PartialEq)]
struct Binding {
    source: String,
    destination: BindingDestination,
    routing_key: String,
    arguments: FieldTable,
}

struct Consumer {
    queue: String,
    queue_id: u64,
    no_ack: bool,
    exclusive: bool,
    prefetch: u16,
    unacked: u32,
}

struct Unacked {
    queue: String,
    queue_id: u64,
    consumer_tag: String,
    message: StoredMessage,
}

struct Chan {
    conn: u64,
    number: u16,
    broker_open: bool,
    close_reason: Option<TransportError>,
    client_closed: Option<TransportError>,
    events: Option<mpsc::UnboundedSender<ChannelEvent>>,
    confirm: bool,
    next_publish_seq: u64,
    prefetch: u16,
    next_delivery_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: BTreeSet<String>,
}

struct Conn {
    host: String,
    user: String,
    name: Option<String>,
    heartbeat: Option<Duration>,
    latency: Duration,
    broker_open: bool,
    close_reason: Option<TransportError>,
    client_closed: Option<TransportError>,
    events: Option<mpsc::UnboundedSender<ConnectionEvent>>,
    up: VecDeque<(Instant, Request)>,
    down: VecDeque<(Instant, Down)>,
    up_tail: Instant,
    down_tail: Instant,
    /// Broker-open channels: number -> key.
    channels: BTreeMap<u16, u64>,
    /// Every channel ever opened on it, in order (the client may not know yet
    /// that some are closed).
    all_channels: Vec<u64>,
    blocked: Option<String>,
    told_blocked: bool,
    stats: ConnectionStats,
}

/// Everything the simulated broker knows.
pub(crate) struct State {
    me: Weak<Mutex<State>>,
    pub(crate) clock: VirtualClock,
    pub(crate) config: BrokerConfig,
    rng: fastrand::Rng,
    hosts: BTreeMap<String, HostState>,
    next_partition_epoch: u64,
    down_until: Option<Instant>,
    alarm: Option<String>,
    confirm_mode: ConfirmMode,
    exchanges: BTreeMap<String, Exchange>,
    queues: BTreeMap<String, Queue>,
    bindings: Vec<Binding>,
    consumers: BTreeMap<(u64, String), Consumer>,
    conns: BTreeMap<u64, Conn>,
    chans: BTreeMap<u64, Chan>,
    /// Queues whose consumers may take a message.
    dirty: BTreeSet<String>,
    next_conn: u64,
    next_chan: u64,
    next_queue_id: u64,
    next_message_id: u64,
    restarting: bool,
    stats: BrokerStats,
    trace: Vec<String>,
    /// The fate of every message published through a connection, by id.
    ledger: BTreeMap<u64, LedgerEntry>,
}

/// The result of checking a dial against the broker's and the host's state.
pub(crate) enum DialCheck {
    /// A blackholed host: the dial never completes.
    Hang,
    Refused,
    Auth,
    Accept,
}

const BUILTIN_EXCHANGES: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

impl State {
    pub(crate) fn new(me: Weak<Mutex<State>>, clock: VirtualClock, config: BrokerConfig) -> State {
        let rng = fastrand::Rng::with_seed(config.seed);
        let mut state = State {
            me,
            clock,
            config,
            rng,
            hosts: BTreeMap::new(),
            next_partition_epoch: 1,
            down_until: None,
            alarm: None,
            confirm_mode: ConfirmMode::Normal,
            exchanges: BTreeMap::new(),
            queues: BTreeMap::new(),
            bindings: Vec::new(),
            consumers: BTreeMap::new(),
            conns: BTreeMap::new(),
            chans: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_conn: 1,
            next_chan: 1,
            next_queue_id: 1,
            next_message_id: 1,
            restarting: false,
            stats: BrokerStats::default(),
            trace: Vec::new(),
            ledger: BTreeMap::new(),
        };
        state.install_builtin_exchanges();
        state
    }

    fn install_builtin_exchanges(&mut self) {
        for (name, kind) in BUILTIN_EXCHANGES {
            self.exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                    builtin: true,
                    had_binding: false,
                },
            );
        }
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    pub(crate) fn log(&mut self, line: impl FnOnce() -> String) {
        if self.config.trace || tracing::enabled!(tracing::Level::DEBUG) {
            let elapsed = self.clock.elapsed();
            let line = line();
            tracing::debug!(sim_time = ?elapsed, "{line}");
            if self.config.trace {
                self.trace.push(format!(
                    "[{:>6}.{:03}s] {line}",
                    elapsed.as_secs(),
                    elapsed.subsec_millis()
                ));
            }
        }
    }

    pub(crate) fn trace(&self) -> Vec<String> {
        self.trace.clone()
    }

    fn schedule(&self, at: Instant, action: Action) {
        let me = self.me.clone();
        self.clock.schedule_at(at, move || {
            if let Some(inner) = me.upgrade() {
                crate::broker::SimBroker::from_inner(inner).run_action(action);
            }
        });
    }

    fn random_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..22)
            .map(|_| char::from(ALPHABET[self.rng.usize(..ALPHABET.len())]))
            .collect()
    }

    // ---- hosts and dials -------------------------------------------------------

    pub(crate) fn add_host(&mut self, host: String) {
        self.hosts.entry(host).or_default();
    }

    pub(crate) fn serves(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    pub(crate) fn hosts(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    pub(crate) fn dial_check(&mut self, host: &str, endpoint: &Endpoint) -> DialCheck {
        let now = self.now();
        let Some(h) = self.hosts.get(host) else {
            return DialCheck::Refused;
        };
        if h.partition.is_some() {
            return DialCheck::Hang;
        }
        let refused = h.refuse_forever
            || h.refuse_until.is_some_and(|t| now < t)
            || self.down_until.is_some_and(|t| now < t);
        if refused {
            self.stats.dials_refused += 1;
            self.log(|| format!("dial {host}: refused"));
            return DialCheck::Refused;
        }
        if endpoint.username() != self.config.username
            || endpoint.password() != self.config.password
        {
            self.stats.dials_refused += 1;
            self.log(|| format!("dial {host}: bad credentials"));
            return DialCheck::Auth;
        }
        DialCheck::Accept
    }

    pub(crate) fn open_connection(
        &mut self,
        host: &str,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> (u64, mpsc::UnboundedReceiver<ConnectionEvent>) {
        let id = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::unbounded();
        let heartbeat = match endpoint.heartbeat() {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(u64::from(secs))),
            None => Some(self.config.default_heartbeat).filter(|d| !d.is_zero()),
        };
        let now = self.now();
        self.conns.insert(
            id,
            Conn {
                host: host.to_owned(),
                user: endpoint.username().to_owned(),
                name: options.connection_name.clone(),
                heartbeat,
                latency: self.config.latency,
                broker_open: true,
                close_reason: None,
                client_closed: None,
                events: Some(tx),
                up: VecDeque::new(),
                down: VecDeque::new(),
                up_tail: now,
                down_tail: now,
                channels: BTreeMap::new(),
                all_channels: Vec::new(),
                blocked: None,
                told_blocked: false,
                stats: ConnectionStats::default(),
            },
        );
        self.stats.connections_opened += 1;
        self.log(|| format!("{} open on {host}", SimConnectionId(id)));
        self.update_blocked(id);
        (id, rx)
    }

    // ---- the wire --------------------------------------------------------------

    /// Queues a request from the client. Fails at once if the client already knows
    /// its connection or channel is closed.
    pub(crate) fn send_up(&mut self, conn_id: u64, request: Request) -> Result<(), TransportError> {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return Err(TransportError::Io("no such connection".into()));
        };
        if let Some(err) = &conn.client_closed {
            return Err(err.clone());
        }
        if let Some(chan) = request.chan.and_then(|c| self.chans.get(&c))
            && let Some(err) = &chan.client_closed
        {
            return Err(err.clone());
        }
        let due = (now + conn.latency).max(conn.up_tail);
        conn.up_tail = due;
        conn.up.push_back((due, request));
        self.schedule(due, Action::FlushUp(conn_id));
        Ok(())
    }

    fn send_down(&mut self, conn_id: u64, item: Down) {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.client_closed.is_some() {
            if let Down::Reply(tx, _) = item {
                let err = conn
                    .client_closed
                    .clone()
                    .unwrap_or(TransportError::ClosedByClient);
                let _ = tx.send(Err(err));
            }
            return;
        }
        let due = (now + conn.latency).max(conn.down_tail);
        conn.down_tail = due;
        conn.down.push_back((due, item));
        self.schedule(due, Action::FlushDown(conn_id));
    }

    fn partitioned(&self, conn_id: u64) -> bool {
        self.conns
            .get(&conn_id)
            .and_then(|c| self.hosts.get(&c.host))
            .is_some_and(|h| h.partition.is_some())
    }

    fn blocked(&self, conn_id: u64) -> Option<String> {
        let conn = self.conns.get(&conn_id)?;
        conn.blocked.clone().or_else(|| self.alarm.clone())
    }

    pub(crate) fn run_action(&mut self, action: Action) {
        match action {
            Action::FlushUp(conn) => self.flush_up(conn),
            Action::FlushDown(conn) => self.flush_down(conn),
            Action::HeartbeatCheck { conn, host, epoch } => {
                let same_partition = self
                    .hosts
                    .get(&host)
                    .is_some_and(|h| h.partition == Some(epoch));
                let alive = self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.client_closed.is_none());
                if same_partition && alive {
                    self.log(|| format!("{}: missed heartbeats", SimConnectionId(conn)));
                    self.close_conn_broker(conn, TransportError::HeartbeatTimeout);
                    self.notify_client_closed(conn, TransportError::HeartbeatTimeout);
                }
            }
            Action::DelayedConfirm {
                conn,
                chan,
                delivery_tag,
            } => {
                let event = ChannelEvent::Ack {
                    delivery_tag,
                    multiple: false,
                };
                let open = self.chans.get(&chan).is_some_and(|c| c.broker_open);
                if open {
                    self.send_down(conn, Down::chan(chan, event));
                }
            }
        }
    }

    fn flush_up(&mut self, conn_id: u64) {
        loop {
            let now = self.now();
            if self.partitioned(conn_id) {
                return;
            }
            let blocked = self.blocked(conn_id).is_some();
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                return;
            };
            if !conn.broker_open {
                return;
            }
            match conn.up.front() {
                Some((due, _)) if *due <= now => {}
                _ => return,
            }
            if blocked
                && matches!(
                    conn.up.front(),
                    Some((
                        _,
                        Request {
                            op: Op::Publish(_),
                            ..
                        }
                    ))
                )
            {
                return;
            }
            let Some((_, request)) = conn.up.pop_front() else {
                return;
            };
            self.process(conn_id, request);
            self.dispatch();
        }
    }

    fn flush_down(&mut self, conn_id: u64) {
        loop {
            let now = self.now();
            if self.partitioned(conn_id) {
                return;
            }
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                return;
            };
            if conn.client_closed.is_some() {
                return;
            }
            match conn.down.front() {
                Some((due, _)) if *due <= now => {}
                _ => return,
            }
            let Some((_, item)) = conn.down.pop_front() else {
                return;
            };
            match item {
                Down::Reply(tx, result) => {
                    let _ = tx.send(result);
                }
                Down::Conn(ConnectionEvent::Closed(err)) => {
                    self.notify_client_closed(conn_id, err);
                    return;
                }
                Down::Conn(event) => {
                    if let Some(tx) = &conn.events {
                        let _ = tx.unbounded_send(event);
                    }
                }
                Down::Chan(chan_id, event) => {
                    let event = *event;
                    let Some(chan) = self.chans.get_mut(&chan_id) else {
                        continue;
                    };
                    if chan.client_closed.is_some() {
                        continue;
                    }
                    if let ChannelEvent::Closed(err) = &event {
                        chan.client_closed = Some(err.clone());
                    }
                    let closing = matches!(event, ChannelEvent::Closed(_));
                    if let Some(tx) = &chan.events {
                        let _ = tx.unbounded_send(event);
                    }
                    if closing {
                        chan.events = None;
                    }
                }
            }
        }
    }

    /// Tells the client its connection is gone: `Closed` on the connection and on
    /// every channel it still thinks open, and every pending call fails with `err`.
    pub(crate) fn notify_client_closed(&mut self, conn_id: u64, err: TransportError) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.client_closed.is_some() {
            return;
        }
        conn.client_closed = Some(err.clone());
        let up = std::mem::take(&mut conn.up);
        let down = std::mem::take(&mut conn.down);
        for (_, request) in up {
            if let Some(tx) = request.reply {
                let _ = tx.send(Err(err.clone()));
            }
        }
        for (_, item) in down {
            if let Down::Reply(tx, _) = item {
                let _ = tx.send(Err(err.clone()));
            }
        }
        if let Some(tx) = conn.events.take() {
            let _ = tx.unbounded_send(ConnectionEvent::Closed(err.clone()));
        }
        let chans = std::mem::take(&mut conn.all_channels);
        for key in chans {
            let Some(chan) = self.chans.get_mut(&key) else {
                continue;
            };
            if chan.client_closed.is_none() {
                chan.client_closed = Some(err.clone());
                if let Some(tx) = chan.events.take() {
                    let _ = tx.unbounded_send(ChannelEvent::Closed(err.clone()));
                }
            }
        }
        self.log(|| format!("{} closed for the client: {err}", SimConnectionId(conn_id)));
    }

    /// Closes a connection on the broker side: its channels close (unacked messages
    /// are requeued, consumers go), its exclusive queues are deleted.
    pub(crate) fn close_conn_broker(&mut self, conn_id: u64, err: TransportError) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.broker_open {
            return;
        }
        conn.broker_open = false;
        conn.close_reason = Some(err.clone());
        let chans: Vec<u64> = conn.channels.values().copied().collect();
        for chan in chans {
            self.close_chan_broker(chan, err.clone());
        }
        let owned: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.owner == Some(conn_id))
            .map(|(name, _)| name.clone())
            .collect();
        let cause = self.drop_cause();
        for name in owned {
            self.delete_queue_internal(&name, cause);
        }
        self.log(|| format!("{} closed by the broker: {err}", SimConnectionId(conn_id)));
    }

    fn drop_cause(&self) -> DropCause {
        if self.restarting {
            DropCause::Restart
        } else {
            DropCause::Delete
        }
    }

    /// Closes a channel on the broker side: unacked messages go back to their queues
    /// (redelivered), its consumers are removed.
    fn close_chan_broker(&mut self, chan_id: u64, err: TransportError) {
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return;
        };
        if !chan.broker_open {
            return;
        }
        chan.broker_open = false;
        chan.close_reason = Some(err);
        let unacked = std::mem::take(&mut chan.unacked);
        let tags: Vec<String> = std::mem::take(&mut chan.consumers).into_iter().collect();
        let (conn_id, number) = (chan.conn, chan.number);
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.channels.remove(&number);
        }
        // Consumers go before the requeue so the messages are not handed straight
        // back to this channel.
        for tag in tags {
            self.remove_consumer(chan_id, &tag, false);
        }
        self.requeue(unacked.into_values().collect());
    }

    /// Puts unacked messages back at the head of their queues, in delivery order.
    fn requeue(&mut self, entries: Vec<Unacked>) {
        for entry in entries.into_iter().rev() {
            match self.queues.get_mut(&entry.queue) {
                Some(q) if q.id == entry.queue_id => {
                    let mut message = entry.message;
                    message.redelivered = true;
                    q.ready.push_front(message);
                    self.stats.requeued += 1;
                    self.dirty.insert(entry.queue);
                }
                _ => {
                    self.note_dropped(entry.message.id, 1);
                    match self.drop_cause() {
                        DropCause::Delete => self.stats.dropped_by_delete += 1,
                        DropCause::Restart => self.stats.dropped_by_restart += 1,
                    }
                }
            }
        }
    }

    // ---- processing ------------------------------------------------------------

    fn process(&mut self, conn_id: u64, request: Request) {
        let Request { chan, op, reply } = request;
        if let Some(chan_id) = chan {
            let closed = self
                .chans
                .get(&chan_id)
                .filter(|c| !c.broker_open)
                .map(|c| {
                    c.close_reason
                        .clone()
                        .unwrap_or(TransportError::ClosedByClient)
                });
            if let Some(err) = closed {
                // AMQP: after channel.close the broker discards the channel's frames.
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Err(err)));
                }
                return;
            }
        }
        match (chan, op) {
            (None, Op::CloseConnection) => {
                self.close_conn_broker(conn_id, TransportError::ClosedByClient);
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Ok(Reply::Done)));
                }
                self.send_down(
                    conn_id,
                    Down::Conn(ConnectionEvent::Closed(TransportError::ClosedByClient)),
                );
            }
            (Some(chan_id), Op::CloseChannel) => {
                self.close_chan_broker(chan_id, TransportError::ClosedByClient);
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Ok(Reply::Done)));
                }
                self.send_down(
                    conn_id,
                    Down::chan(
                        chan_id,
                        ChannelEvent::Closed(TransportError::ClosedByClient),
                    ),
                );
            }
            (chan, op) => {
                let result = match chan {
                    None => self.apply_connection(conn_id, op),
                    Some(chan_id) => self.apply_channel(conn_id, chan_id, op),
                };
                match result {
                    Ok(value) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Ok(value)));
                        }
                    }
                    Err(Fail::Channel(err)) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Err(err.clone())));
                        }
                        if let Some(chan_id) = chan {
                            self.log(|| format!("channel {chan_id} closed by the broker: {err}"));
                            self.close_chan_broker(chan_id, err.clone());
                            self.send_down(conn_id, Down::chan(chan_id, ChannelEvent::Closed(err)));
                        }
                    }
                    Err(Fail::Connection(err)) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Err(err.clone())));
                        }
                        self.close_conn_broker(conn_id, err.clone());
                        self.send_down(conn_id, Down::Conn(ConnectionEvent::Closed(err)));
                    }
                }
            }
        }
    }

    fn apply_connection(&mut self, conn_id: u64, op: Op) -> Result<Reply, Fail> {
        match op {
            Op::OpenChannel => {
                let max = self.config.channel_max;
                let Some(conn) = self.conns.get_mut(&conn_id) else {
                    return Err(Fail::Connection(TransportError::Io("no connection".into())));
                };
                let Some(number) = (1..=max).find(|n| !conn.channels.contains_key(n)) else {
                    return Err(Fail::Connection(reply(
                        reply_code::NOT_ALLOWED,
                        format!(
                            "NOT_ALLOWED - number of channels opened ({max}) has reached the \
                             negotiated channel_max ({max})"
                        ),
                    )));
                };
                let key = self.next_chan;
                self.next_chan += 1;
                conn.channels.insert(number, key);
                conn.all_channels.push(key);
                conn.stats.channels_opened += 1;
                let (tx, rx) = mpsc::unbounded();
                self.chans.insert(
                    key,
                    Chan {
                        conn: conn_id,
                        number,
                        broker_open: true,
                        close_reason: None,
                        client_closed: None,
                        events: Some(tx),
                        confirm: false,
                        next_publish_seq: 1,
                        prefetch: 0,
                        next_delivery_tag: 1,
                        unacked: BTreeMap::new(),
                        consumers: BTreeSet::new(),
                    },
                );
                Ok(Reply::Channel {
                    key,
                    number,
                    events: rx,
                })
            }
            _ => Err(Fail::Connection(reply(
                reply_code_command_invalid(),
                "COMMAND_INVALID - channel method on channel 0",
            ))),
        }
    }

    fn apply_channel(&mut self, conn_id: u64, chan_id: u64, op: Op) -> Result<Reply, Fail> {
        match op {
            Op::ConfirmSelect => {
                if let Some(chan) = self.chans.get_mut(&chan_id) {
                    chan.confirm = true;
                }
                Ok(Reply::Done)
            }
            Op::Qos(prefetch) => {
                if let Some(chan) = self.chans.get_mut(&chan_id) {
                    chan.prefetch = prefetch;
                }
                Ok(Reply::Done)
            }
            Op::DeclareExchange(decl) => self.declare_exchange(&decl).map(|()| Reply::Done),
            Op::DeleteExchange(name) => self.delete_exchange(&name).map(|()| Reply::Done),
            Op::DeclareQueue(decl) => self.declare_queue(conn_id, &decl).map(Reply::Queue),
            Op::DeleteQueue(name) => self.delete_queue(conn_id, &name).map(Reply::Count),
            Op::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let binding =
                    self.check_queue_binding(conn_id, queue, exchange, routing_key, arguments)?;
                self.add_binding(binding);
                Ok(Reply::Done)
            }
            Op::UnbindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let binding =
                    self.check_queue_binding(conn_id, queue, exchange, routing_key, arguments)?;
                self.remove_binding(&binding);
                Ok(Reply::Done)
            }
            Op::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let binding =
                    self.check_exchange_binding(destination, source, routing_key, arguments)?;
                self.add_binding(binding);
                Ok(Reply::Done)
            }
            Op::UnbindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let binding =
                    self.check_exchange_binding(destination, source, routing_key, arguments)?;
                self.remove_binding(&binding);
                Ok(Reply::Done)
            }
            Op::Publish(message) => self
                .publish(conn_id, chan_id, *message)
                .map(|()| Reply::Done),
            Op::Consume {
                queue,
                consumer_tag,
                options,
            } => self
                .consume(conn_id, chan_id, queue, consumer_tag, &options)
                .map(|()| Reply::Done),
            Op::Cancel(tag) => {
                let exists = self.consumers.contains_key(&(chan_id, tag.clone()));
                if exists {
                    self.remove_consumer(chan_id, &tag, false);
                }
                Ok(Reply::Done)
            }
            Op::Ack {
                delivery_tag,
                multiple,
            } => self
                .settle(conn_id, chan_id, delivery_tag, multiple, Settle::Ack)
                .map(|()| Reply::Done),
            Op::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => self
                .settle(
                    conn_id,
                    chan_id,
                    delivery_tag,
                    multiple,
                    Settle::Reject { requeue },
                )
                .map(|()| Reply::Done),
            Op::Reject {
                delivery_tag,
                requeue,
            } => self
                .settle(
                    conn_id,
                    chan_id,
                    delivery_tag,
                    false,
                    Settle::Reject { requeue },
                )
                .map(|()| Reply::Done),
            Op::OpenChannel | Op::CloseConnection | Op::CloseChannel => {
                Err(Fail::Connection(reply(
                    reply_code_command_invalid(),
                    "COMMAND_INVALID - unexpected method",
                )))
            }
        }
    }

    // ---- exchanges -------------------------------------------------------------

    fn declare_exchange(&mut self, decl: &ExchangeDecl) -> Result<(), Fail> {
        let name = &decl.name;
        if name.is_empty() || name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        if let ExchangeKind::Custom(kind) = &decl.kind {
            return Err(Fail::Connection(reply(
                reply_code_command_invalid(),
                format!("COMMAND_INVALID - unknown exchange type '{kind}'"),
            )));
        }
        if let Some(existing) = self.exchanges.get(name) {
            let mismatch = if existing.kind != decl.kind {
                Some((
                    "type",
                    existing.kind.as_str().to_owned(),
                    decl.kind.as_str().to_owned(),
                ))
            } else if existing.durable != decl.durable {
                Some((
                    "durable",
                    existing.durable.to_string(),
                    decl.durable.to_string(),
                ))
            } else if existing.auto_delete != decl.auto_delete {
                Some((
                    "auto_delete",
                    existing.auto_delete.to_string(),
                    decl.auto_delete.to_string(),
                ))
            } else if existing.internal != decl.internal {
                Some((
                    "internal",
                    existing.internal.to_string(),
                    decl.internal.to_string(),
                ))
            } else if existing.arguments != decl.arguments {
                Some(("arguments", "...".to_owned(), "...".to_owned()))
            } else {
                None
            };
            return match mismatch {
                None => Ok(()),
                Some((arg, current, received)) => Err(channel_fail(
                    reply_code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{name}' in \
                         vhost '/': received '{received}' but current is '{current}'"
                    ),
                )),
            };
        }
        self.exchanges.insert(
            name.clone(),
            Exchange {
                kind: decl.kind.clone(),
                durable: decl.durable,
                auto_delete: decl.auto_delete,
                internal: decl.internal,
                arguments: decl.arguments.clone(),
                builtin: false,
                had_binding: false,
            },
        );
        Ok(())
    }

    fn delete_exchange(&mut self, name: &str) -> Result<(), Fail> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - operation not permitted on exchange '{name}'"),
            ));
        }
        if self.exchanges.remove(name).is_none() {
            return Ok(());
        }
        let mut sources = BTreeSet::new();
        self.bindings.retain(|b| {
            let involved =
                b.source == name || b.destination == BindingDestination::Exchange(name.to_owned());
            if involved && b.source != name {
                sources.insert(b.source.clone());
            }
            !involved
        });
        for source in sources {
            self.maybe_auto_delete_exchange(&source);
        }
        Ok(())
    }

    fn maybe_auto_delete_exchange(&mut self, name: &str) {
        let Some(ex) = self.exchanges.get(name) else {
            return;
        };
        if ex.builtin || !ex.auto_delete || !ex.had_binding {
            return;
        }
        if self.bindings.iter().any(|b| b.source == name) {
            return;
        }
        let _ = self.delete_exchange(name);
    }

    // ---- queues ----------------------------------------------------------------

    fn declare_queue(&mut self, conn_id: u64, decl: &QueueDecl) -> Result<QueueInfo, Fail> {
        let name = if decl.name.is_empty() {
            loop {
                let candidate = format!("amq.gen-{}", self.random_suffix());
                if !self.queues.contains_key(&candidate) {
                    break candidate;
                }
            }
        } else if decl.name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - queue name '{}' contains reserved prefix 'amq.*'",
                    decl.name
                ),
            ));
        } else {
            decl.name.clone()
        };
        let owner = decl.exclusive.then_some(conn_id);
        if let Some(q) = self.queues.get(&name) {
            if q.owner != owner {
                return Err(locked(&name));
            }
            let mismatch = if q.durable != decl.durable {
                Some(("durable", q.durable.to_string(), decl.durable.to_string()))
            } else if q.auto_delete != decl.auto_delete {
                Some((
                    "auto_delete",
                    q.auto_delete.to_string(),
                    decl.auto_delete.to_string(),
                ))
            } else if q.arguments != decl.arguments {
                Some(("arguments", "...".to_owned(), "...".to_owned()))
            } else {
                None
            };
            if let Some((arg, current, received)) = mismatch {
                return Err(channel_fail(
                    reply_code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{name}' in \
                         vhost '/': received '{received}' but current is '{current}'"
                    ),
                ));
            }
            return Ok(QueueInfo {
                name: name.clone(),
                message_count: count_u32(q.ready.len()),
                consumer_count: count_u32(q.consumers.len()),
            });
        }
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        self.queues.insert(
            name.clone(),
            Queue {
                id,
                durable: decl.durable,
                owner,
                auto_delete: decl.auto_delete,
                arguments: decl.arguments.clone(),
                ready: VecDeque::new(),
                consumers: Vec::new(),
                next_consumer: 0,
                had_consumer: false,
            },
        );
        self.log(|| format!("queue '{name}' declared"));
        Ok(QueueInfo {
            name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    fn delete_queue(&mut self, conn_id: u64, name: &str) -> Result<u32, Fail> {
        match self.queues.get(name) {
            None => Ok(0),
            Some(q) if q.owner.is_some_and(|o| o != conn_id) => Err(locked(name)),
            Some(_) => Ok(self.delete_queue_internal(name, DropCause::Delete)),
        }
    }

    /// Deletes a queue: its ready messages are dropped, its consumers get a
    /// `basic.cancel`, its bindings go. Returns how many ready messages it held.
    fn delete_queue_internal(&mut self, name: &str, cause: DropCause) -> u32 {
        let Some(q) = self.queues.remove(name) else {
            return 0;
        };
        let dropped = q.ready.len() as u64;
        for m in &q.ready {
            self.note_dropped(m.id, 1);
        }
        match cause {
            DropCause::Delete => self.stats.dropped_by_delete += dropped,
            DropCause::Restart => self.stats.dropped_by_restart += dropped,
        }
        for (chan_id, tag) in q.consumers {
            self.consumers.remove(&(chan_id, tag.clone()));
            let Some(chan) = self.chans.get_mut(&chan_id) else {
                continue;
            };
            chan.consumers.remove(&tag);
            if chan.broker_open {
                let conn = chan.conn;
                self.send_down(
                    conn,
                    Down::chan(
                        chan_id,
                        ChannelEvent::ConsumerCancelled { consumer_tag: tag },
                    ),
                );
            }
        }
        let mut sources = BTreeSet::new();
        let dest = BindingDestination::Queue(name.to_owned());
        self.bindings.retain(|b| {
            let involved = b.destination == dest;
            if involved {
                sources.insert(b.source.clone());
            }
            !involved
        });
        for source in sources {
            self.maybe_auto_delete_exchange(&source);
        }
        self.dirty.remove(name);
        self.log(|| format!("queue '{name}' deleted ({dropped} ready messages dropped)"));
        count_u32(dropped as usize)
    }

    // ---- bindings --------------------------------------------------------------

    fn check_queue_binding(
        &self,
        conn_id: u64,
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    ) -> Result<Binding, Fail> {
        if exchange.is_empty() {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            ));
        }
        let Some(q) = self.queues.get(&queue) else {
            return Err(not_found_queue(&queue));
        };
        if !self.exchanges.contains_key(&exchange) {
            return Err(not_found_exchange(&exchange));
        }
        if q.owner.is_some_and(|o| o != conn_id) {
            return Err(locked(&queue));
        }
        Ok(Binding {
            source: exchange,
            destination: BindingDestination::Queue(queue),
            routing_key,
            arguments,
        })
    }

    fn check_exchange_binding(
        &self,
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
    ) -> Result<Binding, Fail> {
        if destination.is_empty() || source.is_empty() {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            ));
        }
        for name in [&destination, &source] {
            if !self.exchanges.contains_key(name) {
                return Err(not_found_exchange(name));
            }
        }
        Ok(Binding {
            source,
            destination: BindingDestination::Exchange(destination),
            routing_key,
            arguments,
        })
    }

    fn add_binding(&mut self, binding: Binding) {
        if let Some(ex) = self.exchanges.get_mut(&binding.source) {
            ex.had_binding = true;
        }
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
    }

    fn remove_binding(&mut self, binding: &Binding) {
        let before = self.bindings.len();
        self.bindings.retain(|b| b != binding);
        if self.bindings.len() != before {
            self.maybe_auto_delete_exchange(&binding.source);
        }
    }

    // ---- publishing ------------------------------------------------------------

    /// The queues a message published to `exchange` with `routing_key` reaches,
    /// following exchange-to-exchange bindings, each queue once.
    fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> BTreeSet<String> {
        let mut queues = BTreeSet::new();
        if exchange.is_empty() {
            if self.queues.contains_key(routing_key) {
                queues.insert(routing_key.to_owned());
            }
            return queues;
        }
        let mut visited = BTreeSet::new();
        let mut stack = vec![exchange.to_owned()];
        while let Some(name) = stack.pop() {
            if !visited.insert(name.clone()) {
                continue;
            }
            let Some(ex) = self.exchanges.get(&name) else {
                continue;
            };
            for b in self.bindings.iter().filter(|b| b.source == name) {
                let hit = match &ex.kind {
                    ExchangeKind::Direct => b.routing_key == routing_key,
                    ExchangeKind::Fanout => true,
                    ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                    ExchangeKind::Headers => headers_match(&b.arguments, headers),
                    _ => false,
                };
                if !hit {
                    continue;
                }
                match &b.destination {
                    BindingDestination::Queue(q) => {
                        if self.queues.contains_key(q) {
                            queues.insert(q.clone());
                        }
                    }
                    BindingDestination::Exchange(e) => stack.push(e.clone()),
                }
            }
        }
        queues
    }

    /// Routes a message into its queues; returns how many took it.
    fn enqueue(&mut self, message: &Message) -> usize {
        let queues = self.route(
            &message.exchange,
            &message.routing_key,
            message.properties.headers.as_ref(),
        );
        let id = self.next_message_id;
        self.next_message_id += 1;
        self.stats.published += 1;
        for name in &queues {
            if let Some(q) = self.queues.get_mut(name) {
                q.ready.push_back(StoredMessage {
                    id,
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                    properties: message.properties.clone(),
                    payload: message.payload.clone(),
                    redelivered: false,
                });
                self.dirty.insert(name.clone());
            }
        }
        self.stats.routed += queues.len() as u64;
        if queues.is_empty() {
            self.stats.unroutable += 1;
        }
        self.ledger.insert(
            id,
            LedgerEntry {
                id,
                payload: message.payload.clone(),
                at: self.clock.now(),
                routed: count_u32(queues.len()),
                acked: 0,
                discarded: 0,
                dropped: 0,
            },
        );
        queues.len()
    }

    /// Records that `n` copies of message `id` were lost with their queue.
    fn note_dropped(&mut self, id: u64, n: u32) {
        if let Some(l) = self.ledger.get_mut(&id) {
            l.dropped += n;
        }
    }

    pub(crate) fn ledger(&self) -> Vec<LedgerEntry> {
        self.ledger.values().cloned().collect()
    }

    fn check_publish(&self, message: &Message) -> Result<(), Fail> {
        let Some(ex) = self.exchanges.get(&message.exchange) else {
            return Err(not_found_exchange(&message.exchange));
        };
        if ex.internal {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - cannot publish to internal exchange '{}' in vhost '/'",
                    message.exchange
                ),
            ));
        }
        Ok(())
    }

    fn publish(&mut self, conn_id: u64, chan_id: u64, message: Message) -> Result<(), Fail> {
        if !self.exchanges.contains_key(&message.exchange) {
            self.stats.publishes_to_missing_exchange += 1;
        }
        if self.chans.get(&chan_id).is_some_and(|c| !c.confirm) {
            self.stats.publishes_outside_confirm_mode += 1;
        }
        self.check_publish(&message)?;
        let user = self
            .conns
            .get(&conn_id)
            .map(|c| c.user.clone())
            .unwrap_or_default();
        if let Some(claimed) = &message.properties.user_id
            && *claimed != user
        {
            return Err(channel_fail(
                reply_code::PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - user_id property set to '{claimed}' but \
                         authenticated user was '{user}'"
                ),
            ));
        }
        let seq = match self.chans.get_mut(&chan_id) {
            Some(chan) if chan.confirm => {
                let seq = chan.next_publish_seq;
                chan.next_publish_seq += 1;
                Some(seq)
            }
            _ => None,
        };
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.stats.published += 1;
        }
        let mode = self.confirm_mode;
        if mode == ConfirmMode::Nack {
            // The broker refuses the message (as with reject-publish overflow).
            self.stats.published += 1;
            self.stats.nacked_publishes += 1;
            if let Some(seq) = seq {
                self.stats.confirms_nacked += 1;
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.stats.confirms_nacked += 1;
                }
                self.send_down(
                    conn_id,
                    Down::chan(
                        chan_id,
                        ChannelEvent::Nack {
                            delivery_tag: seq,
                            multiple: false,
                        },
                    ),
                );
            }
            return Ok(());
        }
        let routed = self.enqueue(&message);
        if routed == 0 && message.mandatory {
            self.stats.returned += 1;
            if let Some(conn) = self.conns.get_mut(&conn_id) {
                conn.stats.returned += 1;
            }
            self.send_down(
                conn_id,
                Down::chan(
                    chan_id,
                    ChannelEvent::Return(Box::new(Returned {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".to_owned(),
                        exchange: message.exchange.clone(),
                        routing_key: message.routing_key.clone(),
                        properties: message.properties.clone(),
                        payload: message.payload.clone(),
                    })),
                ),
            );
        }
        let Some(seq) = seq else {
            return Ok(());
        };
        let ack = ChannelEvent::Ack {
            delivery_tag: seq,
            multiple: false,
        };
        match mode {
            ConfirmMode::Drop => {
                self.stats.confirms_dropped += 1;
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.stats.confirms_dropped += 1;
                }
            }
            ConfirmMode::Delay(delay) => {
                self.count_ack(conn_id);
                let at = self.now() + delay;
                self.schedule(
                    at,
                    Action::DelayedConfirm {
                        conn: conn_id,
                        chan: chan_id,
                        delivery_tag: seq,
                    },
                );
            }
            ConfirmMode::Normal | ConfirmMode::Nack => {
                self.count_ack(conn_id);
                self.send_down(conn_id, Down::chan(chan_id, ack));
            }
        }
        Ok(())
    }

    fn count_ack(&mut self, conn_id: u64) {
        self.stats.confirms_acked += 1;
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.stats.confirms_acked += 1;
        }
    }

    /// Publishes from outside any connection (like the management UI). Returns how
    /// many queues took the message.
    pub(crate) fn inject(&mut self, message: &Message) -> Result<usize, TransportError> {
        match self.check_publish(message) {
            Ok(()) => {}
            Err(Fail::Channel(err) | Fail::Connection(err)) => return Err(err),
        }
        let routed = self.enqueue(message);
        self.dispatch();
        Ok(routed)
    }

    // ---- consuming -------------------------------------------------------------

    fn consume(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        queue: String,
        consumer_tag: String,
        options: &ConsumeOptions,
    ) -> Result<(), Fail> {
        let Some(q) = self.queues.get(&queue) else {
            return Err(not_found_queue(&queue));
        };
        if q.owner.is_some_and(|o| o != conn_id) {
            return Err(locked(&queue));
        }
        let in_exclusive_use = q
            .consumers
            .iter()
            .any(|key| self.consumers.get(key).is_some_and(|c| c.exclusive));
        if in_exclusive_use || (options.exclusive && !q.consumers.is_empty()) {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use"),
            ));
        }
        let queue_id = q.id;
        let tag = if consumer_tag.is_empty() {
            format!("amq.ctag-{}", self.random_suffix())
        } else {
            consumer_tag
        };
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return Err(not_found_queue(&queue));
        };
        if chan.consumers.contains(&tag) {
            return Err(Fail::Connection(reply(
                reply_code::NOT_ALLOWED,
                format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
            )));
        }
        if let Some(prefetch) = options.prefetch {
            // What an adapter does: basic.qos, then basic.consume.
            chan.prefetch = prefetch;
        }
        let prefetch = chan.prefetch;
        chan.consumers.insert(tag.clone());
        self.consumers.insert(
            (chan_id, tag.clone()),
            Consumer {
                queue: queue.clone(),
                queue_id,
                no_ack: options.no_ack,
                exclusive: options.exclusive,
                prefetch,
                unacked: 0,
            },
        );
        if let Some(q) = self.queues.get_mut(&queue) {
            q.consumers.push((chan_id, tag));
            q.had_consumer = true;
        }
        self.dirty.insert(queue);
        Ok(())
    }

    /// Removes a consumer; with `notify`, its channel gets a `basic.cancel`. An
    /// auto-delete queue that loses its last consumer is deleted.
    pub(crate) fn remove_consumer(&mut self, chan_id: u64, tag: &str, notify: bool) {
        let Some(consumer) = self.consumers.remove(&(chan_id, tag.to_owned())) else {
            return;
        };
        let mut conn = None;
        if let Some(chan) = self.chans.get_mut(&chan_id) {
            chan.consumers.remove(tag);
            conn = Some(chan.conn);
        }
        if notify && let Some(conn) = conn {
            self.send_down(
                conn,
                Down::chan(
                    chan_id,
                    ChannelEvent::ConsumerCancelled {
                        consumer_tag: tag.to_owned(),
                    },
                ),
            );
        }
        let mut delete = false;
        if let Some(q) = self.queues.get_mut(&consumer.queue)
            && q.id == consumer.queue_id
        {
            q.consumers.retain(|(c, t)| !(*c == chan_id && t == tag));
            if q.next_consumer >= q.consumers.len() {
                q.next_consumer = 0;
            }
            delete = q.auto_delete && q.consumers.is_empty() && q.had_consumer;
        }
        if delete {
            let cause = self.drop_cause();
            self.delete_queue_internal(&consumer.queue, cause);
        }
    }

    /// Broker-initiated cancel of every consumer with this tag.
    pub(crate) fn cancel_consumers_tagged(&mut self, tag: &str) -> usize {
        let keys: Vec<u64> = self
            .consumers
            .keys()
            .filter(|(_, t)| t == tag)
            .map(|(c, _)| *c)
            .collect();
        for chan in &keys {
            self.remove_consumer(*chan, tag, true);
        }
        keys.len()
    }

    fn settle(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        delivery_tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), Fail> {
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return Ok(());
        };
        let tags: Vec<u64> = if multiple && delivery_tag == 0 {
            chan.unacked.keys().copied().collect()
        } else if !chan.unacked.contains_key(&delivery_tag) {
            self.stats.unknown_tag_acks += 1;
            if let Some(conn) = self.conns.get_mut(&conn_id) {
                conn.stats.unknown_tag_acks += 1;
            }
            return Err(channel_fail(
                reply_code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"),
            ));
        } else if multiple {
            chan.unacked
                .range(..=delivery_tag)
                .map(|(t, _)| *t)
                .collect()
        } else {
            vec![delivery_tag]
        };
        let entries: Vec<Unacked> = tags.iter().filter_map(|t| chan.unacked.remove(t)).collect();
        let count = entries.len() as u64;
        for entry in &entries {
            if let Some(c) = self
                .consumers
                .get_mut(&(chan_id, entry.consumer_tag.clone()))
            {
                c.unacked = c.unacked.saturating_sub(1);
                self.dirty.insert(c.queue.clone());
            }
        }
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            match how {
                Settle::Ack => conn.stats.acked += count,
                Settle::Reject { .. } => conn.stats.rejected += count,
            }
        }
        for entry in &entries {
            if let Some(l) = self.ledger.get_mut(&entry.message.id) {
                match how {
                    Settle::Ack => l.acked += 1,
                    Settle::Reject { requeue: false } => l.discarded += 1,
                    Settle::Reject { requeue: true } => {}
                }
            }
        }
        match how {
            Settle::Ack => self.stats.acked += count,
            Settle::Reject { requeue: true } => self.requeue(entries),
            Settle::Reject { requeue: false } => self.stats.discarded += count,
        }
        Ok(())
    }

    /// Hands ready messages to consumers with room, round-robin per queue.
    fn dispatch(&mut self) {
        while let Some(name) = self.dirty.pop_first() {
            while let Some(q) = self.queues.get_mut(&name) {
                if q.ready.is_empty() || q.consumers.is_empty() {
                    break;
                }
                let n = q.consumers.len();
                let start = q.next_consumer % n;
                let pick = (0..n).map(|i| (start + i) % n).find(|&i| {
                    self.consumers.get(&q.consumers[i]).is_some_and(|c| {
                        c.no_ack || c.prefetch == 0 || c.unacked < u32::from(c.prefetch)
                    })
                });
                let Some(i) = pick else {
                    break;
                };
                q.next_consumer = (i + 1) % n;
                let key = q.consumers[i].clone();
                let Some(message) = q.ready.pop_front() else {
                    break;
                };
                self.deliver(&key, &name, message);
            }
        }
    }

    fn deliver(&mut self, key: &(u64, String), queue: &str, message: StoredMessage) {
        let (chan_id, tag) = key;
        let Some(consumer) = self.consumers.get_mut(key) else {
            return;
        };
        let Some(chan) = self.chans.get_mut(chan_id) else {
            return;
        };
        let delivery_tag = chan.next_delivery_tag;
        chan.next_delivery_tag += 1;
        let delivery = Delivery {
            consumer_tag: tag.clone(),
            delivery_tag,
            redelivered: message.redelivered,
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            properties: message.properties.clone(),
            payload: message.payload.clone(),
        };
        self.stats.delivered += 1;
        if message.redelivered {
            self.stats.redelivered += 1;
        }
        if consumer.no_ack {
            self.stats.acked += 1;
            if let Some(l) = self.ledger.get_mut(&message.id) {
                l.acked += 1;
            }
        } else {
            consumer.unacked += 1;
            chan.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue.to_owned(),
                    queue_id: consumer.queue_id,
                    consumer_tag: tag.clone(),
                    message,
                },
            );
        }
        let conn = chan.conn;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.stats.delivered += 1;
        }
        self.send_down(
            conn,
            Down::chan(*chan_id, ChannelEvent::Delivery(Box::new(delivery))),
        );
    }

    // ---- faults ----------------------------------------------------------------

    pub(crate) fn kill_connection(&mut self, conn_id: u64, err: TransportError) -> bool {
        let alive = self
            .conns
            .get(&conn_id)
            .is_some_and(|c| c.client_closed.is_none());
        if !alive {
            return false;
        }
        self.close_conn_broker(conn_id, err.clone());
        self.notify_client_closed(conn_id, err);
        true
    }

    /// A broker-initiated `connection.close`: it travels behind the frames in flight.
    pub(crate) fn close_connection(&mut self, conn_id: u64, err: TransportError) -> bool {
        let open = self.conns.get(&conn_id).is_some_and(|c| c.broker_open);
        if !open {
            return false;
        }
        self.close_conn_broker(conn_id, err.clone());
        self.send_down(conn_id, Down::Conn(ConnectionEvent::Closed(err)));
        true
    }

    pub(crate) fn close_channel(&mut self, conn_id: u64, number: u16, err: TransportError) -> bool {
        let Some(chan_id) = self
            .conns
            .get(&conn_id)
            .and_then(|c| c.channels.get(&number))
            .copied()
        else {
            return false;
        };
        self.close_chan_broker(chan_id, err.clone());
        self.send_down(conn_id, Down::chan(chan_id, ChannelEvent::Closed(err)));
        true
    }

    pub(crate) fn open_conn_ids(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.broker_open)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn live_conn_ids_on(&self, host: &str) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.host == host && c.client_closed.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn refuse_dials(&mut self, host: &str, until: Option<Instant>) -> bool {
        let Some(h) = self.hosts.get_mut(host) else {
            return false;
        };
        match until {
            Some(t) => h.refuse_until = Some(t),
            None => h.refuse_forever = true,
        }
        true
    }

    pub(crate) fn accept_dials(&mut self, host: &str) -> bool {
        let Some(h) = self.hosts.get_mut(host) else {
            return false;
        };
        h.refuse_until = None;
        h.refuse_forever = false;
        true
    }

    pub(crate) fn partition(&mut self, host: &str) -> bool {
        let epoch = self.next_partition_epoch;
        let Some(h) = self.hosts.get_mut(host) else {
            return false;
        };
        if h.partition.is_some() {
            return true;
        }
        self.next_partition_epoch += 1;
        h.partition = Some(epoch);
        let now = self.now();
        for conn in self.live_conn_ids_on(host) {
            if let Some(hb) = self.conns.get(&conn).and_then(|c| c.heartbeat) {
                self.schedule(
                    now + hb * 2,
                    Action::HeartbeatCheck {
                        conn,
                        host: host.to_owned(),
                        epoch,
                    },
                );
            }
        }
        self.log(|| format!("host {host} partitioned"));
        true
    }

    pub(crate) fn heal(&mut self, host: &str) -> bool {
        let Some(h) = self.hosts.get_mut(host) else {
            return false;
        };
        if h.partition.take().is_none() {
            return true;
        }
        let now = self.now();
        for conn in self.live_conn_ids_on(host) {
            self.schedule(now, Action::FlushUp(conn));
            self.schedule(now, Action::FlushDown(conn));
        }
        self.log(|| format!("host {host} healed"));
        true
    }

    pub(crate) fn restart(&mut self, downtime: Duration) {
        self.log(|| format!("broker restart (down for {downtime:?})"));
        self.restarting = true;
        let forced = reply(
            reply_code::CONNECTION_FORCED,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        );
        for conn in self.open_conn_ids() {
            self.close_connection(conn, forced.clone());
        }
        let transient: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.durable)
            .map(|(n, _)| n.clone())
            .collect();
        for name in transient {
            self.delete_queue_internal(&name, DropCause::Restart);
        }
        if !self.config.restart_keeps_transient_messages {
            let mut dropped = 0;
            let mut ids = Vec::new();
            for q in self.queues.values_mut() {
                let before = q.ready.len();
                q.ready.retain(|m| {
                    let keep = m.properties.delivery_mode == Some(2);
                    if !keep {
                        ids.push(m.id);
                    }
                    keep
                });
                dropped += (before - q.ready.len()) as u64;
            }
            for id in ids {
                self.note_dropped(id, 1);
            }
            self.stats.dropped_by_restart += dropped;
        }
        let transient: Vec<String> = self
            .exchanges
            .iter()
            .filter(|(_, e)| !e.durable && !e.builtin)
            .map(|(n, _)| n.clone())
            .collect();
        for name in transient {
            let _ = self.delete_exchange(&name);
        }
        for q in self.queues.values_mut() {
            q.consumers.clear();
            q.next_consumer = 0;
        }
        self.alarm = None;
        self.restarting = false;
        self.stats.restarts += 1;
        let now = self.now();
        self.down_until = Some(now + downtime);
    }

    pub(crate) fn set_confirm_mode(&mut self, mode: ConfirmMode) {
        self.confirm_mode = mode;
    }

    pub(crate) fn set_alarm(&mut self, reason: Option<String>) {
        self.alarm = reason;
        for conn in self.open_conn_ids() {
            self.update_blocked(conn);
        }
    }

    pub(crate) fn set_blocked(&mut self, conn_id: u64, reason: Option<String>) -> bool {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return false;
        };
        if !conn.broker_open {
            return false;
        }
        conn.blocked = reason;
        self.update_blocked(conn_id);
        true
    }

    /// Tells a connection about a change of its blocked state; resumes its reads
    /// when unblocked.
    fn update_blocked(&mut self, conn_id: u64) {
        let reason = self.blocked(conn_id);
        let now = self.now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.broker_open || conn.told_blocked == reason.is_some() {
            return;
        }
        conn.told_blocked = reason.is_some();
        let event = match reason {
            Some(reason) => ConnectionEvent::Blocked(reason),
            None => {
                self.schedule(now, Action::FlushUp(conn_id));
                ConnectionEvent::Unblocked
            }
        };
        self.send_down(conn_id, Down::Conn(event));
    }

    pub(crate) fn set_latency(&mut self, conn_id: u64, latency: Duration) -> bool {
        match self.conns.get_mut(&conn_id) {
            Some(conn) => {
                conn.latency = latency;
                true
            }
            None => false,
        }
    }

    pub(crate) fn delete_queue_by_name(&mut self, name: &str) -> Option<u32> {
        self.queues
            .contains_key(name)
            .then(|| self.delete_queue_internal(name, DropCause::Delete))
    }

    pub(crate) fn delete_exchange_by_name(&mut self, name: &str) -> bool {
        self.exchanges.contains_key(name) && self.delete_exchange(name).is_ok()
    }

    // ---- inspection ------------------------------------------------------------

    pub(crate) fn closed_error(&self, conn_id: u64, chan_id: Option<u64>) -> TransportError {
        chan_id
            .and_then(|c| self.chans.get(&c))
            .and_then(|c| c.client_closed.clone())
            .or_else(|| {
                self.conns
                    .get(&conn_id)
                    .and_then(|c| c.client_closed.clone())
            })
            .unwrap_or_else(|| TransportError::Io("connection lost".into()))
    }

    pub(crate) fn is_client_closed(&self, conn_id: u64, chan_id: Option<u64>) -> bool {
        chan_id
            .and_then(|c| self.chans.get(&c))
            .is_some_and(|c| c.client_closed.is_some())
            || self
                .conns
                .get(&conn_id)
                .is_none_or(|c| c.client_closed.is_some())
    }

    fn snapshot_queue(&self, name: &str, q: &Queue) -> QueueSnapshot {
        let unacked = self
            .chans
            .values()
            .flat_map(|c| c.unacked.values())
            .filter(|u| u.queue == name && u.queue_id == q.id)
            .map(|u| u.message.clone())
            .collect();
        QueueSnapshot {
            name: name.to_owned(),
            durable: q.durable,
            exclusive_owner: q.owner.map(SimConnectionId),
            auto_delete: q.auto_delete,
            ready: q.ready.iter().cloned().collect(),
            unacked,
            consumers: q.consumers.iter().map(|(_, t)| t.clone()).collect(),
        }
    }

    pub(crate) fn queue(&self, name: &str) -> Option<QueueSnapshot> {
        self.queues.get(name).map(|q| self.snapshot_queue(name, q))
    }

    pub(crate) fn queues(&self) -> Vec<QueueSnapshot> {
        self.queues
            .iter()
            .map(|(n, q)| self.snapshot_queue(n, q))
            .collect()
    }

    pub(crate) fn exchanges(&self) -> Vec<ExchangeSnapshot> {
        self.exchanges
            .iter()
            .map(|(name, e)| ExchangeSnapshot {
                name: name.clone(),
                kind: e.kind.clone(),
                durable: e.durable,
                auto_delete: e.auto_delete,
                internal: e.internal,
                builtin: e.builtin,
            })
            .collect()
    }

    pub(crate) fn bindings(&self) -> Vec<BindingSnapshot> {
        self.bindings
            .iter()
            .map(|b| BindingSnapshot {
                source: b.source.clone(),
                destination: b.destination.clone(),
                routing_key: b.routing_key.clone(),
                arguments: b.arguments.clone(),
            })
            .collect()
    }

    pub(crate) fn connections(&self) -> Vec<ConnectionInfo> {
        self.conns
            .iter()
            .map(|(id, c)| ConnectionInfo {
                id: SimConnectionId(*id),
                host: c.host.clone(),
                name: c.name.clone(),
                user: c.user.clone(),
                open: c.broker_open,
                closed: c.client_closed.clone(),
                blocked: c.told_blocked,
                channels: c.channels.keys().copied().collect(),
                stats: c.stats.clone(),
            })
            .collect()
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let mut stats = self.stats.clone();
        stats.ready = self.queues.values().map(|q| q.ready.len() as u64).sum();
        stats.unacked = self.chans.values().map(|c| c.unacked.len() as u64).sum();
        stats.consumers = self.consumers.len() as u64;
        stats.open_connections = self.conns.values().filter(|c| c.broker_open).count() as u64;
        stats
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Reject { requeue: bool },
}

/// 503 COMMAND_INVALID (a connection error; core has no name for it).
fn reply_code_command_invalid() -> u16 {
    503
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
