//! [`SimBroker`]: the in-memory broker, its fault injection and its inspection API.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::message::{FieldTable, Message, Properties};
use amqp_rebound_core::topology::ExchangeKind;
use amqp_rebound_core::transport::ConnectOptions;
use bytes::Bytes;

use crate::clock::VirtualClock;
use crate::model::{Action, DialCheck, State};
use crate::transport::{SimConnection, SimTransport};

/// How the simulated broker is set up. Build it with struct update syntax or the
/// `with_*` methods:
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_sim::BrokerConfig;
///
/// let config = BrokerConfig::default()
///     .with_seed(7)
///     .with_latency(Duration::from_millis(2))
///     .with_credentials("app", "s3cr3t");
/// assert_eq!(config.username, "app");
/// assert!(!format!("{config:?}").contains("s3cr3t"), "the password is redacted");
/// ```
#[derive(Clone)]
pub struct BrokerConfig {
    /// Seeds the broker's one random generator (server-named queue and consumer
    /// tag suffixes). Same seed, same names.
    pub seed: u64,
    /// The only user the broker accepts (default `guest`).
    pub username: String,
    /// That user's password (default `guest`). Never printed.
    pub password: String,
    /// One-way latency of new connections, each direction (default 1 ms): a call
    /// takes two latencies, a confirm arrives one latency after its publish is
    /// routed, which is one latency after it was sent.
    pub latency: Duration,
    /// The heartbeat interval used when the endpoint asks for none (default 10 s).
    /// A partitioned connection is declared dead after twice its interval. An
    /// endpoint `?heartbeat=0`, or zero here, disables heartbeats: a partitioned
    /// connection then hangs until the partition heals.
    pub default_heartbeat: Duration,
    /// Channels per connection (default 2047, RabbitMQ's). Opening one more closes
    /// the connection with 530 NOT_ALLOWED.
    pub channel_max: u16,
    /// Whether a restart keeps transient (delivery mode 1) messages in durable
    /// queues (default true: "durable queues keep their messages"). False models
    /// classic queues, which keep only persistent messages.
    pub restart_keeps_transient_messages: bool,
    /// Record a human-readable trace of broker activity, stamped with virtual time
    /// (see [`SimBroker::trace`]). Off by default. Independently of this, the same
    /// lines go to `tracing` at DEBUG level.
    pub trace: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            seed: 0,
            username: "guest".to_owned(),
            password: "guest".to_owned(),
            latency: Duration::from_millis(1),
            default_heartbeat: Duration::from_secs(10),
            channel_max: 2047,
            restart_keeps_transient_messages: true,
            trace: false,
        }
    }
}

impl BrokerConfig {
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the accepted user and password.
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.username = username.into();
        self.password = password.into();
        self
    }

    /// Sets the one-way latency of new connections.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the default heartbeat interval.
    pub fn with_default_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.default_heartbeat = heartbeat;
        self
    }

    /// Turns the trace on or off.
    pub fn with_trace(mut self, trace: bool) -> Self {
        self.trace = trace;
        self
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("seed", &self.seed)
            .field("username", &self.username)
            .field("password", &"***")
            .field("latency", &self.latency)
            .field("default_heartbeat", &self.default_heartbeat)
            .field("channel_max", &self.channel_max)
            .field(
                "restart_keeps_transient_messages",
                &self.restart_keeps_transient_messages,
            )
            .field("trace", &self.trace)
            .finish()
    }
}

/// What the broker does with publisher confirms (a fault knob; see
/// [`SimBroker::set_confirm_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ConfirmMode {
    /// Ack every routed (or unroutable) message at once.
    #[default]
    Normal,
    /// Route at once, but send the ack this much later (a slow disk). Acks of
    /// messages published after switching back to `Normal` may overtake delayed
    /// ones, as RabbitMQ's out-of-order confirms can.
    Delay(Duration),
    /// Route, but never send the ack (a lost confirm: the client must time out or
    /// recover, and re-publish).
    Drop,
    /// Refuse the message: not routed, nacked (like an overflow `reject-publish`).
    Nack,
}

/// A connection's identity in the simulated broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimConnectionId(pub u64);

impl fmt::Display for SimConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// A message held by the broker (ready in a queue or delivered and unacked).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The broker's number for the publish; every queue copy of one publish shares
    /// it.
    pub id: u64,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: Properties,
    /// Its body.
    pub payload: Bytes,
    /// It was delivered before and came back.
    pub redelivered: bool,
}

/// What became of one message the broker routed, for loss accounting (see
/// [`SimBroker::ledger`]). Every routed copy ends up in exactly one place: still in
/// a queue (ready or unacked), `acked`, `discarded` or `dropped`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerEntry {
    /// The broker's number for the publish ([`StoredMessage::id`]).
    pub id: u64,
    /// Its body.
    pub payload: Bytes,
    /// When it was routed.
    pub at: Instant,
    /// Queues it was routed to (0: unroutable).
    pub routed: u32,
    /// Copies acked by a consumer (or delivered with `no_ack`).
    pub acked: u32,
    /// Copies nacked or rejected without requeue.
    pub discarded: u32,
    /// Copies lost with their queue (deleted, exclusive owner gone, auto-delete,
    /// restart).
    pub dropped: u32,
}

/// A queue's state, for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    /// Name.
    pub name: String,
    /// Survives a restart.
    pub durable: bool,
    /// The owning connection of an exclusive queue.
    pub exclusive_owner: Option<SimConnectionId>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Messages waiting, head first.
    pub ready: Vec<StoredMessage>,
    /// Messages delivered and not yet acked.
    pub unacked: Vec<StoredMessage>,
    /// Consumer tags, in registration order.
    pub consumers: Vec<String>,
}

impl QueueSnapshot {
    /// Every message the queue holds: ready, then unacked.
    pub fn messages(&self) -> impl Iterator<Item = &StoredMessage> {
        self.ready.iter().chain(self.unacked.iter())
    }
}

/// An exchange, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSnapshot {
    /// Name (`""` is the default exchange).
    pub name: String,
    /// Type.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Cannot be published to.
    pub internal: bool,
    /// One of the exchanges every broker has (`""`, `amq.*`).
    pub builtin: bool,
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BindingDestination {
    /// A queue.
    Queue(String),
    /// An exchange (exchange-to-exchange binding).
    Exchange(String),
}

/// A binding, for tests. The default exchange's implicit bindings are not listed.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingSnapshot {
    /// The exchange messages come from.
    pub source: String,
    /// Where they go.
    pub destination: BindingDestination,
    /// Binding key.
    pub routing_key: String,
    /// Binding arguments.
    pub arguments: FieldTable,
}

/// Counters of one connection, as the broker saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Channels opened.
    pub channels_opened: u64,
    /// Messages published (that reached the broker).
    pub published: u64,
    /// Publisher confirms sent as acks (or due, when delayed).
    pub confirms_acked: u64,
    /// Publisher confirms sent as nacks.
    pub confirms_nacked: u64,
    /// Publisher confirms withheld by [`ConfirmMode::Drop`].
    pub confirms_dropped: u64,
    /// Mandatory messages returned.
    pub returned: u64,
    /// Deliveries sent.
    pub delivered: u64,
    /// Deliveries acked by the client.
    pub acked: u64,
    /// Deliveries nacked or rejected by the client.
    pub rejected: u64,
    /// ack / nack / reject with a delivery tag the channel did not know (each one
    /// closed a channel with 406). Zero in a good run.
    pub unknown_tag_acks: u64,
}

/// Broker-wide counters, and the current totals they must balance with.
///
/// Every routed copy of a message is in exactly one place; see
/// [`is_conserved`](BrokerStats::is_conserved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connections accepted.
    pub connections_opened: u64,
    /// Connections open now (broker side).
    pub open_connections: u64,
    /// Dials refused (host refusing, broker down, bad credentials).
    pub dials_refused: u64,
    /// Messages that reached the broker.
    pub published: u64,
    /// Queue copies made by routing (a message routed to 3 queues counts 3).
    pub routed: u64,
    /// Messages no queue took.
    pub unroutable: u64,
    /// Messages refused under [`ConfirmMode::Nack`] (never routed).
    pub nacked_publishes: u64,
    /// Mandatory messages returned.
    pub returned: u64,
    /// Confirm acks sent (or due).
    pub confirms_acked: u64,
    /// Confirm nacks sent.
    pub confirms_nacked: u64,
    /// Confirms withheld.
    pub confirms_dropped: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Deliveries flagged redelivered.
    pub redelivered: u64,
    /// Copies acked by a consumer (including `no_ack` deliveries).
    pub acked: u64,
    /// Copies put back in their queue (nack / reject with requeue, channel or
    /// connection closed with unacked messages).
    pub requeued: u64,
    /// Copies nacked or rejected without requeue (no dead-lettering is modelled).
    pub discarded: u64,
    /// Copies lost because their queue was deleted (queue.delete, exclusive owner
    /// gone, auto-delete).
    pub dropped_by_delete: u64,
    /// Copies lost in a broker restart.
    pub dropped_by_restart: u64,
    /// Acks with an unknown delivery tag (must stay zero in a good run).
    pub unknown_tag_acks: u64,
    /// Broker restarts.
    pub restarts: u64,
    /// Publishes that arrived on a channel not in confirm mode (a client that
    /// publishes before `confirm.select` completed: zero for amqp-rebound).
    pub publishes_outside_confirm_mode: u64,
    /// Publishes to an exchange that does not exist (each one closed its channel
    /// with 404: a client that publishes before its topology is replayed).
    pub publishes_to_missing_exchange: u64,
    /// Copies ready in queues now.
    pub ready: u64,
    /// Copies delivered and unacked now.
    pub unacked: u64,
    /// Consumers now.
    pub consumers: u64,
}

impl BrokerStats {
    /// Conservation of messages: `routed == ready + unacked + acked + discarded +
    /// dropped_by_delete + dropped_by_restart`.
    pub fn is_conserved(&self) -> bool {
        self.routed
            == self.ready
                + self.unacked
                + self.acked
                + self.discarded
                + self.dropped_by_delete
                + self.dropped_by_restart
    }
}

/// A connection as the broker sees it, for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionInfo {
    /// Identity, for the fault methods.
    pub id: SimConnectionId,
    /// The `host:port` it was dialled at.
    pub host: String,
    /// The name from [`ConnectOptions`].
    pub name: Option<String>,
    /// The authenticated user.
    pub user: String,
    /// Open on the broker side.
    pub open: bool,
    /// Why the client was told it closed, once it was.
    pub closed: Option<TransportError>,
    /// The client was last told it is blocked.
    pub blocked: bool,
    /// Open channel numbers.
    pub channels: Vec<u16>,
    /// Counters.
    pub stats: ConnectionStats,
}

/// Turns `host`, `host:port`, `[v6]:port` or a bare IPv6 literal into the key the
/// simulator uses for a host (`host:port`, IPv6 in brackets, port 5672 by default,
/// lower case). What [`host_key`] gives for an [`Endpoint`]'s host and port.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[')
        && let Some((name, after)) = rest.split_once(']')
    {
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(5672);
        return host_key(name, port);
    }
    match host.matches(':').count() {
        1 => match host.rsplit_once(':') {
            Some((name, port)) => match port.parse() {
                Ok(port) => host_key(name, port),
                Err(_) => host_key(host, 5672),
            },
            None => host_key(host, 5672),
        },
        _ => host_key(host, 5672),
    }
}

/// The simulator's key for a host and port: `host:port`, an IPv6 literal in
/// brackets, lower case.
///
/// ```
/// use amqp_rebound_sim::{host_key, normalize_host};
///
/// assert_eq!(host_key("::1", 5672), "[::1]:5672");
/// assert_eq!(normalize_host("Rabbit-A"), "rabbit-a:5672");
/// assert_eq!(normalize_host("[::1]:5673"), "[::1]:5673");
/// ```
pub fn host_key(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An in-memory AMQP 0-9-1 broker (see the [crate docs](crate) for the model).
///
/// A cheap, shared handle: clones are the same broker. Its API is synchronous; the
/// asynchronous side is [`SimTransport`]. One broker can serve several hosts (a
/// cluster behind several addresses); several brokers can sit behind one
/// transport, one per host.
///
/// ```
/// use amqp_rebound_sim::{BrokerConfig, SimBroker, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let broker = SimBroker::new(clock.clone(), BrokerConfig::default().with_seed(1))
///     .with_host("rabbit-a")
///     .with_host("rabbit-b:5673");
/// assert_eq!(broker.hosts(), ["rabbit-a:5672", "rabbit-b:5673"]);
/// let transport = broker.transport();
/// # let _ = transport;
/// ```
#[derive(Clone)]
pub struct SimBroker {
    inner: Arc<Mutex<State>>,
}

impl fmt::Debug for SimBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("SimBroker")
            .field("hosts", &state.hosts())
            .field("config", &state.config)
            .finish_non_exhaustive()
    }
}

impl SimBroker {
    /// A broker with the default exchanges (`""`, `amq.direct`, `amq.fanout`,
    /// `amq.topic`, `amq.headers`, `amq.match`), serving no host yet.
    pub fn new(clock: VirtualClock, config: BrokerConfig) -> SimBroker {
        SimBroker {
            inner: Arc::new_cyclic(|me| Mutex::new(State::new(me.clone(), clock, config))),
        }
    }

    pub(crate) fn from_inner(inner: Arc<Mutex<State>>) -> SimBroker {
        SimBroker { inner }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements; a panic elsewhere (a failed
        // test assertion) must not turn every later call into a second panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn run_action(&self, action: Action) {
        self.lock().run_action(action);
    }

    /// The broker's clock.
    pub fn clock(&self) -> VirtualClock {
        self.lock().clock.clone()
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.clock().now()
    }

    /// The configuration it was built with (credentials as changed since).
    pub fn config(&self) -> BrokerConfig {
        self.lock().config.clone()
    }

    /// Serves `host` (see [`normalize_host`] for the forms accepted). Returns the
    /// host's key.
    pub fn add_host(&self, host: &str) -> String {
        let key = normalize_host(host);
        self.lock().add_host(key.clone());
        key
    }

    /// [`add_host`](Self::add_host), builder style.
    pub fn with_host(self, host: &str) -> SimBroker {
        self.add_host(host);
        self
    }

    /// The hosts it serves, as keys, sorted.
    pub fn hosts(&self) -> Vec<String> {
        self.lock().hosts()
    }

    /// Whether it serves `host`.
    pub fn serves(&self, host: &str) -> bool {
        self.lock().serves(&normalize_host(host))
    }

    /// A transport that dials this broker (and nothing else).
    pub fn transport(&self) -> SimTransport {
        SimTransport::new(self.clock()).with_broker(self.clone())
    }

    /// Changes the accepted credentials (existing connections stay).
    pub fn set_credentials(&self, username: impl Into<String>, password: impl Into<String>) {
        let mut state = self.lock();
        state.config.username = username.into();
        state.config.password = password.into();
    }

    /// The dial: one latency to reach the host, the checks, one latency back.
    pub(crate) async fn dial(
        &self,
        host: String,
        endpoint: Endpoint,
        options: ConnectOptions,
    ) -> Result<SimConnection, TransportError> {
        let (clock, latency) = {
            let state = self.lock();
            (state.clock.clone(), state.config.latency)
        };
        clock.sleep(latency).await;
        let check = self.lock().dial_check(&host, &endpoint);
        match check {
            DialCheck::Hang => futures::future::pending().await,
            DialCheck::Refused => Err(TransportError::Io(format!(
                "connection refused by {host} (simulated)"
            ))),
            DialCheck::Auth => {
                clock.sleep(latency).await;
                Err(TransportError::Auth(
                    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"
                        .to_owned(),
                ))
            }
            DialCheck::Accept => {
                let (id, events) = self.lock().open_connection(&host, &endpoint, &options);
                clock.sleep(latency).await;
                Ok(SimConnection::new(self.clone(), id, events))
            }
        }
    }

    // ---- faults ----------------------------------------------------------------

    /// Kills a connection like a TCP reset: at once, frames in flight are lost, the
    /// client sees `Closed(Io)` on the connection and every channel, pending calls
    /// fail. Returns false if the client already knew it closed.
    pub fn kill_connection(&self, id: SimConnectionId) -> bool {
        self.lock().kill_connection(
            id.0,
            TransportError::Io("connection reset by peer (simulated)".into()),
        )
    }

    /// Kills every connection the client still thinks open on `host`. Returns how
    /// many.
    pub fn kill_connections_on(&self, host: &str) -> usize {
        let mut state = self.lock();
        let ids = state.live_conn_ids_on(&normalize_host(host));
        let err = TransportError::Io("connection reset by peer (simulated)".into());
        ids.into_iter()
            .filter(|id| state.kill_connection(*id, err.clone()))
            .count()
    }

    /// Kills every connection (see [`kill_connection`](Self::kill_connection)).
    pub fn kill_all_connections(&self) -> usize {
        let hosts = self.hosts();
        hosts.iter().map(|h| self.kill_connections_on(h)).sum()
    }

    /// Closes a connection from the broker with a reply code, like `rabbitmqctl
    /// close_connection` (320): the close travels behind the frames in flight.
    pub fn close_connection(&self, id: SimConnectionId, code: u16, text: &str) -> bool {
        self.lock().close_connection(
            id.0,
            TransportError::Reply {
                code,
                text: text.to_owned(),
            },
        )
    }

    /// Closes one channel from the broker with a reply code (e.g. 406, 541).
    pub fn close_channel(&self, id: SimConnectionId, channel: u16, code: u16, text: &str) -> bool {
        self.lock().close_channel(
            id.0,
            channel,
            TransportError::Reply {
                code,
                text: text.to_owned(),
            },
        )
    }

    /// Refuses dials to `host` for `duration` of virtual time (connect fails with
    /// `Io("connection refused")`); open connections stay.
    pub fn refuse_dials(&self, host: &str, duration: Duration) -> bool {
        let until = self.now() + duration;
        self.lock().refuse_dials(&normalize_host(host), Some(until))
    }

    /// Refuses dials to `host` until [`accept_dials`](Self::accept_dials).
    pub fn refuse_dials_indefinitely(&self, host: &str) -> bool {
        self.lock().refuse_dials(&normalize_host(host), None)
    }

    /// Ends a refusal on `host`.
    pub fn accept_dials(&self, host: &str) -> bool {
        self.lock().accept_dials(&normalize_host(host))
    }

    /// Blackholes `host`: new dials never complete (not even after the heal), and
    /// open connections stop moving frames both ways. Each open connection reports
    /// `Closed(HeartbeatTimeout)` (and its channels too) after twice its heartbeat
    /// interval, unless the partition heals first, in which case the held frames
    /// flow on. Returns false for a host the broker does not serve.
    pub fn partition(&self, host: &str) -> bool {
        self.lock().partition(&normalize_host(host))
    }

    /// Ends a partition of `host`.
    pub fn heal(&self, host: &str) -> bool {
        self.lock().heal(&normalize_host(host))
    }

    /// Restarts the broker: every connection is closed with 320 CONNECTION_FORCED
    /// (behind its frames in flight), unacked messages return to their queues,
    /// transient and exclusive queues and transient exchanges vanish with their
    /// messages and bindings, frames not yet processed (publishes among them) are
    /// lost, alarms clear. Durable queues keep their messages (see
    /// [`BrokerConfig::restart_keeps_transient_messages`]). Dials are refused for
    /// `downtime`.
    pub fn restart(&self, downtime: Duration) {
        self.lock().restart(downtime);
    }

    /// Sets what happens to publisher confirms from now on.
    pub fn set_confirm_mode(&self, mode: ConfirmMode) {
        self.lock().set_confirm_mode(mode);
    }

    /// Blocks one connection (`connection.blocked` with `reason`): it stops
    /// reading at its next publish until unblocked.
    pub fn block_connection(&self, id: SimConnectionId, reason: &str) -> bool {
        self.lock().set_blocked(id.0, Some(reason.to_owned()))
    }

    /// Unblocks a connection blocked with [`block_connection`](Self::block_connection)
    /// (it stays blocked while an alarm is on).
    pub fn unblock_connection(&self, id: SimConnectionId) -> bool {
        self.lock().set_blocked(id.0, None)
    }

    /// Raises a resource alarm: every connection, open or new, is blocked.
    pub fn set_alarm(&self, reason: &str) {
        self.lock().set_alarm(Some(reason.to_owned()));
    }

    /// Clears the resource alarm.
    pub fn clear_alarm(&self) {
        self.lock().set_alarm(None);
    }

    /// Cancels, from the broker, every consumer with this tag (`basic.cancel` to
    /// its channel). Returns how many.
    pub fn cancel_consumer(&self, consumer_tag: &str) -> usize {
        self.lock().cancel_consumers_tagged(consumer_tag)
    }

    /// Deletes a queue as an administrator would: its consumers get `basic.cancel`,
    /// its ready messages are dropped. Returns how many, or `None` if it did not
    /// exist.
    pub fn delete_queue(&self, name: &str) -> Option<u32> {
        self.lock().delete_queue_by_name(name)
    }

    /// Deletes an exchange and its bindings (not a built-in one). Returns whether
    /// it existed.
    pub fn delete_exchange(&self, name: &str) -> bool {
        self.lock().delete_exchange_by_name(name)
    }

    /// Changes the one-way latency of one connection. Frames keep their order.
    pub fn set_latency(&self, id: SimConnectionId, latency: Duration) -> bool {
        self.lock().set_latency(id.0, latency)
    }

    /// Publishes from outside any connection (like the management UI): routed at
    /// once, no confirm. Returns how many queues took it, or 404 for a missing
    /// exchange.
    pub fn publish(&self, message: &Message) -> Result<usize, TransportError> {
        self.lock().inject(message)
    }

    // ---- inspection --------------------------------------------------------------

    /// One queue, if it exists.
    pub fn queue(&self, name: &str) -> Option<QueueSnapshot> {
        self.lock().queue(name)
    }

    /// Every queue, by name.
    pub fn queues(&self) -> Vec<QueueSnapshot> {
        self.lock().queues()
    }

    /// Every queue name, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues().into_iter().map(|q| q.name).collect()
    }

    /// Every exchange, by name (built-in ones included).
    pub fn exchanges(&self) -> Vec<ExchangeSnapshot> {
        self.lock().exchanges()
    }

    /// Every explicit binding, in creation order.
    pub fn bindings(&self) -> Vec<BindingSnapshot> {
        self.lock().bindings()
    }

    /// Every connection ever accepted, by id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.lock().connections()
    }

    /// One connection.
    pub fn connection(&self, id: SimConnectionId) -> Option<ConnectionInfo> {
        self.connections().into_iter().find(|c| c.id == id)
    }

    /// The ids of connections open on the broker side, by id.
    pub fn open_connections(&self) -> Vec<SimConnectionId> {
        self.lock()
            .open_conn_ids()
            .into_iter()
            .map(SimConnectionId)
            .collect()
    }

    /// The newest open connection with this [`ConnectOptions`] name.
    pub fn connection_named(&self, name: &str) -> Option<SimConnectionId> {
        self.connections()
            .into_iter()
            .rev()
            .find(|c| c.open && c.name.as_deref() == Some(name))
            .map(|c| c.id)
    }

    /// Broker-wide counters and totals.
    pub fn stats(&self) -> BrokerStats {
        self.lock().stats()
    }

    /// Acks, nacks and rejects that carried an unknown delivery tag (Invariant 8:
    /// zero in a good run).
    pub fn unknown_tag_acks(&self) -> u64 {
        self.lock().stats().unknown_tag_acks
    }

    /// Every message routed so far (through a connection or
    /// [`publish`](Self::publish)), by id, with what became of its copies.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.lock().ledger()
    }

    /// The trace recorded so far (empty unless [`BrokerConfig::trace`]).
    pub fn trace(&self) -> Vec<String> {
        self.lock().trace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<SimBroker>();
        assert_send_sync::<VirtualClock>();
    }

    #[test]
    fn host_keys() {
        assert_eq!(normalize_host("a"), "a:5672");
        assert_eq!(normalize_host("a:1"), "a:1");
        assert_eq!(normalize_host("::1"), "[::1]:5672");
        assert_eq!(normalize_host("[::1]"), "[::1]:5672");
        assert_eq!(normalize_host("[::1]:7"), "[::1]:7");
        // Garbage in, a stable key out.
        assert_eq!(normalize_host("a:x"), "[a:x]:5672");
    }
}
