//! [`SimBroker`]: the in-memory broker, its fault injection and its inspection API.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::transport::ConnectOptions;

use crate::clock::VirtualClock;
pub use crate::model::{
    BindingDestination, BindingSnapshot, BrokerConfig, BrokerStats, ConfirmMode, ConnectionInfo,
    ConnectionStats, ExchangeSnapshot, LedgerEntry, QueueSnapshot, SimConnectionId, StoredMessage,
};
use crate::model::{DialCheck, State};
use crate::transport::{SimConnection, SimTransport};

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

/// The locked model. Dropping it puts the clock actions the model asked for on
/// the clock, in the order asked, each to run on the model when it falls due.
pub(crate) struct StateGuard<'a> {
    state: MutexGuard<'a, State>,
    inner: &'a Arc<Mutex<State>>,
}

impl Deref for StateGuard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let timers = self.state.take_timers();
        if timers.is_empty() {
            return;
        }
        let clock = self.state.clock.clone();
        for (at, action) in timers {
            // Weak: a pending timer must not keep a dropped broker alive.
            let model = Arc::downgrade(self.inner);
            clock.schedule_at(at, move || {
                if let Some(inner) = model.upgrade() {
                    SimBroker { inner }.lock().run_action(action);
                }
            });
        }
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
            inner: Arc::new(Mutex::new(State::new(clock, config))),
        }
    }

    /// The model, locked. Every timer the model asks for while locked goes on the
    /// clock when the guard drops.
    pub(crate) fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            // The state stays consistent between statements; a panic elsewhere (a
            // failed test assertion) must not turn every later call into a second
            // panic.
            state: self.inner.lock().unwrap_or_else(PoisonError::into_inner),
            inner: &self.inner,
        }
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
