//! The [`Supervisor`]: N connection machines x M channel machines, one sans-IO state
//! machine. See the crate docs for how to drive it.

mod channel;
mod publish;
mod topology;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::endpoint::Endpoint;
use crate::error::{ConfigError, ErrorClass, TransportError};
use crate::event::{Event, Reason};
use crate::ids::{ChannelId, ConnectionId, Object};
use crate::message::{Delivery, Message, Returned};
use crate::outbox::Outbox;
use crate::state::{ChannelState, ConnectionState};
use crate::telemetry::{LatencyHistogram, Metrics, class_label, targets};
use crate::topology::{AckKind, Registry, TopologyOp};
use channel::Chan;
use topology::{Cancelled, Hold};

pub use publish::Stats;
pub(crate) use publish::check_message;
pub use topology::{EXCLUSIVE_USE_GRACE, MAX_CONSUME_REFUSALS, MAX_REPLAY_REFUSALS};

/// Something that happened, fed to [`Supervisor::handle`].
///
/// Results of commands echo the `epoch` (connections) or `generation` (channels)
/// of the command; results for an older epoch or generation are stale and ignored
/// (or, for a late successful dial, answered with a [`Command::CloseConnection`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Input {
    /// A [`Command::Dial`] succeeded.
    Connected {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the dial.
        epoch: u64,
    },
    /// A [`Command::Dial`] failed.
    DialFailed {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the dial.
        epoch: u64,
        /// Why.
        error: TransportError,
    },
    /// An established connection failed (I/O, heartbeat, connection.close from the
    /// broker).
    ConnectionLost {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the connection.
        epoch: u64,
        /// Why.
        error: TransportError,
    },
    /// The transport finished a [`Command::CloseConnection`].
    ConnectionClosed {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the connection.
        epoch: u64,
    },
    /// The broker sent connection.blocked.
    Blocked {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the connection.
        epoch: u64,
        /// The broker's reason.
        reason: String,
    },
    /// The broker sent connection.unblocked.
    Unblocked {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the connection.
        epoch: u64,
    },
    /// Something happened on one generation of a channel.
    Channel {
        /// The slot.
        channel: ChannelId,
        /// The generation of the open or of the channel; older ones are stale.
        generation: u64,
        /// What happened.
        event: ChannelInput,
    },
    /// What the broker allows on a connection about to be reported
    /// [`Connected`](Input::Connected): its negotiated `channel_max`. Optional;
    /// sent before `Connected` for the same epoch, it lets the supervisor refuse a
    /// pool that asks for more channels than the broker allows.
    Tuned {
        /// The slot.
        connection: ConnectionId,
        /// The epoch of the dial.
        epoch: u64,
        /// The broker's limit of channels on this connection.
        channel_max: u16,
    },
    /// The application asks to close, draining first: nothing new is accepted;
    /// every message already accepted is published and its confirm awaited,
    /// across recoveries, until [`Config::close_timeout`]; then the connections
    /// close. What is still unresolved at the timeout resolves
    /// [`PublishError::Closed`](crate::PublishError::Closed). Terminal.
    Close,
    /// The application asks to close at once, without draining: messages not yet
    /// sent resolve [`PublishError::Closed`](crate::PublishError::Closed) now
    /// (their loss is the caller's choice); those in flight get the close timeout
    /// for their confirms. Terminal; also ends a drain under way.
    CloseNow,
    /// A timer may have expired. Harmless when none has.
    Timeout,
}

/// What happened on a channel: the payload of [`Input::Channel`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChannelInput {
    /// A [`Command::OpenChannel`] succeeded (channel open, confirms selected).
    Opened,
    /// A [`Command::OpenChannel`] failed.
    OpenFailed(TransportError),
    /// The open channel was closed by the broker or failed.
    Lost(TransportError),
    /// A publisher confirm (see [`ChannelEvent::Ack`]).
    ///
    /// [`ChannelEvent::Ack`]: crate::ChannelEvent::Ack
    Confirm {
        /// The publish sequence number confirmed.
        delivery_tag: u64,
        /// Covers every earlier number too.
        multiple: bool,
        /// `true` for basic.ack, `false` for basic.nack.
        ack: bool,
    },
    /// A mandatory message came back unroutable (basic.return).
    Returned(Box<Returned>),
    /// A delivery to a consumer (boxed: it is ten times the size of a confirm).
    Delivery(Box<Delivery>),
    /// The broker cancelled a consumer (basic.cancel, e.g. its queue was deleted).
    ConsumerCancelled {
        /// The consumer's tag.
        consumer_tag: String,
    },
    /// The [`Command::Topology`] in flight on this channel finished. `Ok` carries
    /// the real queue name for a queue declaration.
    TopologyDone(Result<Option<String>, TransportError>),
}

/// Work for the driver, drained with [`Supervisor::poll_command`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Command {
    /// Open a connection to `endpoint`; answer with [`Input::Connected`] or
    /// [`Input::DialFailed`] carrying the same `epoch`.
    Dial {
        /// The slot.
        connection: ConnectionId,
        /// Identifies this dial; echo it in the answer and in later events of the
        /// connection it makes.
        epoch: u64,
        /// Where to.
        endpoint: Arc<Endpoint>,
    },
    /// Open a channel (and select confirms) on the connection of `epoch`; answer
    /// with an [`Input::Channel`] carrying [`ChannelInput::Opened`] or
    /// [`ChannelInput::OpenFailed`].
    OpenChannel {
        /// The slot.
        channel: ChannelId,
        /// The connection epoch to open it on.
        epoch: u64,
        /// Identifies this open; echo it in the answer and later channel events.
        generation: u64,
    },
    /// Publish `message` on the channel; it is number `seq` of this generation,
    /// counting from 1: the number the broker's confirm for it carries. The
    /// driver hands a channel's messages to the transport one at a time, in
    /// `seq` order, and fails the channel on a gap; a confirm for a number above
    /// the last `seq` fails it too (the transport's count and this one differ).
    Publish {
        /// The slot.
        channel: ChannelId,
        /// The generation to publish on; drop the command if it is gone.
        generation: u64,
        /// Its confirm sequence number on this generation.
        seq: u64,
        /// The message.
        message: Arc<Message>,
    },
    /// Run one topology operation on the channel; answer with
    /// [`ChannelInput::TopologyDone`]. At most one is in flight per channel.
    Topology {
        /// The slot.
        channel: ChannelId,
        /// The generation to run it on.
        generation: u64,
        /// The operation, names resolved.
        op: TopologyOp,
    },
    /// Acknowledge, nack or reject a delivery. Only ever emitted for a delivery of
    /// the channel's current generation.
    Ack {
        /// The slot.
        channel: ChannelId,
        /// The generation the delivery came on (always the current one).
        generation: u64,
        /// The delivery's tag.
        delivery_tag: u64,
        /// Ack, nack or reject.
        kind: AckKind,
    },
    /// Close this generation of the channel if the transport still has it.
    CloseChannel {
        /// The slot.
        channel: ChannelId,
        /// The generation to close.
        generation: u64,
    },
    /// Close this epoch of the connection if the transport still has it; answer
    /// with [`Input::ConnectionClosed`] (optional for stale epochs).
    CloseConnection {
        /// The slot.
        connection: ConnectionId,
        /// The epoch to close.
        epoch: u64,
    },
}

/// A deadline for a timeout too long to represent (`Duration::MAX`): a century
/// away, or `now` on a clock that cannot even count that far.
pub(crate) fn far_future(now: Instant) -> Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(CENTURY).unwrap_or(now)
}

/// `now + timeout`, saturating at [`far_future`] instead of panicking.
pub(crate) fn deadline_after(now: Instant, timeout: std::time::Duration) -> Instant {
    now.checked_add(timeout).unwrap_or_else(|| far_future(now))
}

/// How long a Ready connection's channels take no messages after one of them
/// failed without a reply code (lapin reports its channels' ends within a
/// millisecond of the connection's own).
const SUSPECT_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// When a failed or lost connection is dialled again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// At once (on the next host): the lost connection had done useful work.
    Now,
    /// As after a failed dial: at once on the next host until every host failed
    /// since the slot was last stable, then after the backoff's delay.
    AsFailure,
}

/// Which timer of which object; ordered so that equal deadlines fire in a fixed,
/// seed-independent order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Connection(u16),
    Channel(u16, u16),
    /// When a slot's unanswered dial gets a second one, to the next host.
    ParallelDial(u16),
    /// When a consumer the broker refused as "in exclusive use" is tried again.
    Consumer(u64),
}

struct Conn {
    state: ConnectionState,
    epoch: u64,
    /// Index into `Supervisor::hosts` of the endpoint this slot dials next.
    host: usize,
    /// Failures (dials, and losses of a connection that was not yet stable) since
    /// the connection last stayed Ready for `reset_after`: the slot tries every
    /// host once per backoff step, so a flapping cluster cannot make it loop.
    failures: usize,
    backoff: Backoff,
    timer: Option<Instant>,
    channels: Vec<Chan>,
    /// Entities replayed on this epoch (by channel 0): other channels may start
    /// their consumers.
    topology_ready: bool,
    /// Whether the CloseConnection of a Closing connection went out (it waits for
    /// in-flight confirms first).
    close_sent: bool,
    /// Whether this slot was Ready before (its next Ready is a recovery).
    was_ready: bool,
    /// A channel of this Ready connection failed without a broker reply code:
    /// nothing is placed on its channels until then, in case the connection is
    /// going down with it.
    suspect_until: Option<Instant>,
    /// The loss of this slot's Ready connection, until a channel of it is Ready
    /// again (the recovery's stall).
    lost: Option<Lost>,
    /// A second dial, to the next host, made while the slot's own dial went
    /// unanswered ([`Config::parallel_dial_after`]).
    parallel: Option<ParallelDial>,
    /// When the slot's dial gets its parallel one, if it is still unanswered.
    parallel_timer: Option<Instant>,
}

/// A dial made beside the slot's own. The first to connect becomes the slot's
/// connection (its epoch the slot's); the other is stale, closed if it connects.
struct ParallelDial {
    epoch: u64,
    host: usize,
    started: Instant,
}

/// A Ready connection was lost: its recovery is under way.
struct Lost {
    at: Instant,
    class: ErrorClass,
    /// Dials since the loss.
    dials: u32,
    /// The `recovery` span (disabled unless INFO on the connection target).
    span: tracing::Span,
}

/// N connection machines x M channel machines: the pool, its lifecycles, backoff
/// and host rotation, as one sans-IO state machine.
///
/// Four kinds of methods (as in quinn-proto): getters; [`handle`](Self::handle) for
/// inputs; application commands ([`publish`](Self::publish), the topology
/// requests, [`ack`](Self::ack), [`flush`](Self::flush), and [`Input::Close`]);
/// and the `poll_*` outputs. See the crate docs for the drain
/// rule.
pub struct Supervisor {
    config: Config,
    hosts: Vec<Arc<Endpoint>>,
    rng: fastrand::Rng,
    now: Instant,
    conns: Vec<Conn>,
    commands: VecDeque<Command>,
    events: VecDeque<Event>,
    timers: BTreeSet<(Instant, TimerKey)>,
    /// Nacked messages waiting to be sent again (`retry_nacked`), by when:
    /// (due, id, order), the order telling the message from a later one in
    /// the same slot.
    nack_retries: BTreeSet<(Instant, u64, u64)>,
    next_epoch: u64,
    /// Round-robin cursor over the flat channel index.
    cursor: usize,
    ready_channels: usize,
    closed: bool,
    /// A close is draining the outbox until this deadline (then `closed`).
    draining: Option<Instant>,
    /// Whether a channel was ever Ready (first contact made).
    ever_ready: bool,
    /// The last dial or connection error, while no channel was ever Ready.
    first_error: Option<TransportError>,
    /// Whether a failed first round was reported.
    first_failure_reported: bool,
    /// The broker's message size limit, once a refusal told it: larger messages
    /// are refused at the call.
    max_message_size: Option<usize>,
    /// The frame size a message's properties must fit in: RabbitMQ's default,
    /// or the smallest `frame_max` the host URIs ask for.
    frame_max: u32,
    /// The consumers cancelled lately, with their channel and its generation
    /// (see [`topology::CANCELLED_KEPT`]).
    cancelled: VecDeque<Cancelled>,
    /// Auto-ack consumers cancelled and not yet confirmed cancelled by the
    /// broker: no publish goes out meanwhile (see `topology::Hold`).
    holds: Vec<Hold>,
    /// Broker refusals in a row of each registry entity's replay (see
    /// [`MAX_REPLAY_REFUSALS`](topology::MAX_REPLAY_REFUSALS)).
    replay_refusals: HashMap<u64, u8>,
    /// Replay steps skipped because the application's delete in flight (its
    /// request id first) removes their subject: (request, connection,
    /// channel, generation, step). Run after all if the delete fails.
    skipped_for_delete: Vec<(u64, usize, usize, u64, topology::Step)>,
    /// Consumers the application cancelled while their channel was down, that
    /// the broker had before it (they went with the channel): (connection,
    /// channel, queue entity). Their auto-delete queue is orphaned on that
    /// channel as if they were still there (see
    /// `orphaned_auto_delete_queues`), until the channel's next replay.
    lost_with_channel: Vec<(usize, usize, u64)>,
    /// Flushes waiting for the messages accepted before them.
    flushes: Vec<publish::Flush>,
    next_flush: u64,
    /// How many accepted messages resolved other than Confirmed so far: a flush
    /// counts them all, not only those it waited for.
    not_confirmed: u64,
    outbox: Outbox,
    /// A window slot or channel may have freed up since the last pump.
    room: bool,
    registry: Registry,
    /// Consumers the application started whose first basic.consume is not
    /// answered yet, by deadline.
    consume_waits: BTreeSet<(Instant, u64)>,
    user_ops: topology::UserOps,
    stats: Stats,
    /// Publish-to-confirm latencies, for `Stats`' quantiles.
    confirm_latency: LatencyHistogram,
    /// The stall of the last recovery.
    last_stall: Option<Duration>,
    /// What the `metrics` feature records (nothing without it).
    metrics: Metrics,
    /// Reused buffer for confirmed ids (keeps the confirm path allocation-free).
    scratch: Vec<u64>,
}

impl Supervisor {
    /// Validates `config` and starts: every connection slot gets a
    /// [`Command::Dial`] right away.
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let frame_max = frame_max(&config);
        let mut rng = fastrand::Rng::with_seed(config.seed);
        let mut hosts: Vec<Arc<Endpoint>> = config.hosts.iter().cloned().map(Arc::new).collect();
        rng.shuffle(&mut hosts);
        let conns = (0..config.connections)
            .map(|i| Conn {
                state: ConnectionState::Connecting {
                    attempt: 0,
                    endpoint: i % hosts.len(),
                    deadline: now,
                },
                epoch: 0,
                host: i % hosts.len(),
                failures: 0,
                backoff: Backoff::new(config.backoff.clone()),
                timer: None,
                topology_ready: false,
                close_sent: false,
                was_ready: false,
                suspect_until: None,
                lost: None,
                parallel: None,
                parallel_timer: None,
                channels: (0..config.channels_per_connection)
                    .map(|_| Chan::new())
                    .collect(),
            })
            .collect();
        let metrics = Metrics::new(&config, &hosts);
        let outbox = Outbox::new(now, config.publish_timeout);
        let mut sup = Supervisor {
            config,
            hosts,
            rng,
            now,
            conns,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            timers: BTreeSet::new(),
            nack_retries: BTreeSet::new(),
            next_epoch: 1,
            cursor: 0,
            ready_channels: 0,
            closed: false,
            draining: None,
            ever_ready: false,
            first_error: None,
            first_failure_reported: false,
            max_message_size: None,
            frame_max,
            cancelled: VecDeque::new(),
            holds: Vec::new(),
            replay_refusals: HashMap::new(),
            skipped_for_delete: Vec::new(),
            lost_with_channel: Vec::new(),
            flushes: Vec::new(),
            next_flush: 0,
            not_confirmed: 0,
            outbox,
            room: false,
            registry: Registry::default(),
            consume_waits: BTreeSet::new(),
            user_ops: topology::UserOps::default(),
            stats: Stats::default(),
            confirm_latency: LatencyHistogram::default(),
            last_stall: None,
            metrics,
            scratch: Vec::new(),
        };
        for c in 0..sup.conns.len() {
            sup.dial(c, Reason::Start);
        }
        Ok(sup)
    }

    // ----- getters -----

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The host list in the order this client uses (shuffled once by the seed).
    pub fn hosts(&self) -> &[Arc<Endpoint>] {
        &self.hosts
    }

    /// The latest time the supervisor has seen.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// State of a connection slot, `None` for an unknown id.
    pub fn connection_state(&self, id: ConnectionId) -> Option<&ConnectionState> {
        self.conns.get(usize::from(id.0)).map(|c| &c.state)
    }

    /// The current epoch of a connection slot.
    pub fn connection_epoch(&self, id: ConnectionId) -> Option<u64> {
        self.conns.get(usize::from(id.0)).map(|c| c.epoch)
    }

    /// State of a channel slot, `None` for an unknown id.
    pub fn channel_state(&self, id: ChannelId) -> Option<ChannelState> {
        self.chan(id).map(|ch| ch.state)
    }

    /// The current generation of a channel slot.
    pub fn channel_generation(&self, id: ChannelId) -> Option<u64> {
        self.chan(id).map(|ch| ch.generation)
    }

    /// Every connection slot id.
    pub fn connection_ids(&self) -> impl Iterator<Item = ConnectionId> + '_ {
        (0..self.conns.len()).map(|c| ConnectionId(c as u16))
    }

    /// Every channel slot id, connection by connection.
    pub fn channel_ids(&self) -> impl Iterator<Item = ChannelId> + '_ {
        self.conns.iter().enumerate().flat_map(|(c, conn)| {
            (0..conn.channels.len()).map(move |i| ChannelId {
                connection: ConnectionId(c as u16),
                index: i as u16,
            })
        })
    }

    /// The frame size a message's properties must fit in.
    pub(crate) fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The broker's message size limit, once a refusal told it.
    pub(crate) fn max_message_size(&self) -> Option<usize> {
        self.max_message_size
    }

    /// How many channels are Ready right now.
    pub fn ready_channels(&self) -> usize {
        self.ready_channels
    }

    /// Whether every connection and channel is Ready.
    pub fn is_all_ready(&self) -> bool {
        self.ready_channels == self.conns.len() * self.config.channels_per_connection
    }

    /// Whether the supervisor is closed: a close drained (or timed out) or
    /// [`Input::CloseNow`] came. Closed is terminal.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether a channel was ever Ready, and if not, the last dial error.
    pub fn first_contact(&self) -> Result<bool, &TransportError> {
        match (&self.first_error, self.ever_ready) {
            (_, true) => Ok(true),
            (Some(e), false) if self.first_failure_reported => Err(e),
            _ => Ok(false),
        }
    }

    /// Whether a close was asked for ([`Input::Close`], draining or done, or
    /// [`Input::CloseNow`]): nothing new is accepted.
    pub fn is_closing(&self) -> bool {
        self.closed || self.draining.is_some()
    }

    /// Whether every connection has reached [`ConnectionState::Closed`].
    pub fn is_fully_closed(&self) -> bool {
        self.closed
            && self
                .conns
                .iter()
                .all(|c| c.state == ConnectionState::Closed)
    }

    // ----- outputs -----

    /// The next command for the driver. Drain until `None` after every
    /// [`handle`](Self::handle).
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.next_event().map(|(event, _)| event)
    }

    /// The next event, and for a [`Event::PublishResolved`] the reply key its
    /// publish was given ([`publish_replying`](Self::publish_replying)).
    pub(crate) fn next_event(&mut self) -> Option<(Event, Option<u64>)> {
        let event = self.events.pop_front()?;
        let reply = match &event {
            // its id is reported: only now may a new publish take its slot
            Event::PublishResolved { id, .. } => self.outbox.release(id.0),
            _ => None,
        };
        Some((event, reply))
    }

    /// The reply key of every publish whose resolution
    /// [`next_event`](Self::next_event) has not given yet, in slot order.
    pub(crate) fn publish_replies(&self) -> impl Iterator<Item = u64> + '_ {
        self.outbox.replies()
    }

    /// When to call `handle(now, Input::Timeout)` next, if any timer is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines()
            .into_iter()
            .fold(None, |earliest, at| match (earliest, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
    }

    /// Whether a timer is due at `self.now` (`poll_timeout() <= now`, without
    /// the minimum: asked on every input).
    fn due(&self) -> bool {
        self.deadlines()
            .into_iter()
            .any(|at| at.is_some_and(|at| at <= self.now))
    }

    /// The earliest deadline of each timer source (the one list of them).
    fn deadlines(&self) -> [Option<Instant>; 7] {
        [
            self.nack_retries.first().map(|(at, ..)| *at),
            self.holds.iter().map(|h| h.until).min(),
            self.outbox.next_deadline(),
            self.timers.first().map(|(at, _)| *at),
            self.user_ops.next_deadline(),
            self.consume_waits.first().map(|(at, _)| *at),
            self.draining,
        ]
    }

    // ----- input -----

    /// Feeds one input at time `now`. Time that goes backwards is clamped to the
    /// latest time seen; expired timers fire first.
    pub fn handle(&mut self, now: Instant, input: Input) {
        self.advance(now);
        match input {
            Input::Timeout => {}
            Input::Close => self.start_drain(),
            Input::CloseNow => {
                self.draining = None;
                self.close(deadline_after(self.now, self.config.close_timeout));
            }
            Input::Tuned {
                connection,
                epoch,
                channel_max,
            } => {
                self.parallel_connected(connection, epoch);
                let wanted = self.config.channels_per_connection;
                if let Some(c) = self.current(connection, epoch)
                    && matches!(self.conns[c].state, ConnectionState::Connecting { .. })
                    && wanted > usize::from(channel_max)
                {
                    // not one channel above the limit is opened: the dial fails
                    // as refused (a configuration error), and the connection goes
                    self.commands
                        .push_back(Command::CloseConnection { connection, epoch });
                    let error = TransportError::ChannelLimit {
                        wanted,
                        max: channel_max,
                    };
                    let class = error.class();
                    self.connection_failed(c, error, Reason::DialFailed(class), Retry::AsFailure);
                }
            }
            Input::Connected { connection, epoch } => {
                self.parallel_connected(connection, epoch);
                self.on_connected(connection, epoch);
            }
            Input::DialFailed {
                connection,
                epoch,
                error,
            } => {
                if let Some(host) = self
                    .conns
                    .get_mut(usize::from(connection.0))
                    .and_then(|conn| conn.parallel.take_if(|p| p.epoch == epoch))
                    .map(|p| p.host)
                {
                    // the parallel dial failed: counted, and the slot's own dial
                    // goes on alone
                    let c = usize::from(connection.0);
                    self.note_failure(c, &error, true);
                    self.events.push_back(Event::RecoveryFailed {
                        connection,
                        endpoint: self.hosts[host].redacted(),
                        class: error.class(),
                        error,
                        retry_in: Duration::ZERO,
                    });
                } else if let Some(c) = self.current(connection, epoch)
                    && matches!(self.conns[c].state, ConnectionState::Connecting { .. })
                    && self.hand_over_to_parallel(c, &error)
                {
                    // counted; the parallel dial is the slot's now
                } else if let Some(c) = self.current(connection, epoch)
                    && matches!(self.conns[c].state, ConnectionState::Connecting { .. })
                {
                    let class = error.class();
                    self.connection_failed(c, error, Reason::DialFailed(class), Retry::AsFailure);
                }
            }
            Input::ConnectionLost {
                connection,
                epoch,
                error,
            } => self.on_connection_lost(connection, epoch, error),
            Input::ConnectionClosed { connection, epoch } => {
                if let Some(c) = self.current(connection, epoch)
                    && matches!(self.conns[c].state, ConnectionState::Closing { .. })
                {
                    self.finish_close(c);
                }
            }
            Input::Blocked {
                connection,
                epoch,
                reason,
            } => self.set_blocked(connection, epoch, Some(reason)),
            Input::Unblocked { connection, epoch } => self.set_blocked(connection, epoch, None),
            Input::Channel {
                channel,
                generation,
                event,
            } => self.on_channel_input(channel, generation, event),
        }
        self.pump();
        self.check_drained();
        self.sync_metrics();
    }

    fn on_channel_input(&mut self, channel: ChannelId, generation: u64, event: ChannelInput) {
        match event {
            ChannelInput::Opened => self.on_channel_opened(channel, generation),
            ChannelInput::OpenFailed(error) | ChannelInput::Lost(error) => {
                self.on_channel_failed(channel, generation, error);
            }
            ChannelInput::Confirm {
                delivery_tag,
                multiple,
                ack,
            } => self.on_confirm(channel, generation, delivery_tag, multiple, ack),
            ChannelInput::Returned(returned) => self.on_returned(channel, generation, &returned),
            ChannelInput::Delivery(delivery) => self.on_delivery(channel, generation, delivery),
            ChannelInput::ConsumerCancelled { consumer_tag } => {
                self.on_consumer_cancelled(channel, generation, &consumer_tag);
            }
            ChannelInput::TopologyDone(result) => {
                self.on_topology_done(channel, generation, result);
            }
        }
    }

    /// A dial of `epoch` on slot `id` answered: if it is the slot's parallel
    /// dial, it wins the race and becomes the slot's dial.
    fn parallel_connected(&mut self, id: ConnectionId, epoch: u64) {
        let c = usize::from(id.0);
        if self.conns.get(c).is_some_and(|conn| conn.epoch != epoch) {
            self.adopt_parallel(c, epoch);
        }
    }

    /// Brings the metrics' counters and depths up to date (nothing without the
    /// `metrics` feature).
    #[inline]
    fn sync_metrics(&mut self) {
        #[cfg(feature = "metrics")]
        self.metrics.sync(
            &self.stats,
            self.outbox.len(),
            self.outbox.len() - self.outbox.pending_len() - self.outbox.waiting_len(),
        );
    }

    /// The client's name, for tracing fields.
    fn name(&self) -> &str {
        self.config.name.as_deref().unwrap_or("")
    }

    /// Moves the clock (never backwards) and fires what is due.
    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        // the usual case, on every publish and confirm: nothing is due
        if self.due() {
            self.fire_timers();
        }
    }

    // ----- connection machine -----

    /// Index of the slot if `epoch` is its current one.
    fn current(&self, id: ConnectionId, epoch: u64) -> Option<usize> {
        let c = usize::from(id.0);
        (self.conns.get(c)?.epoch == epoch).then_some(c)
    }

    fn dial(&mut self, c: usize, reason: Reason) {
        if self.closed {
            return;
        }
        if reason != Reason::Start {
            self.stats.reconnects += 1;
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let conn = &mut self.conns[c];
        conn.epoch = epoch;
        let endpoint = conn.host;
        if let Some(lost) = &mut conn.lost {
            lost.dials += 1;
        }
        self.metrics
            .dial(c, endpoint, self.now, reason != Reason::Start);
        let deadline = deadline_after(self.now, self.config.connect_timeout);
        let attempt = conn.backoff.attempt();
        self.set_conn_timer(c, Some(deadline));
        self.set_conn_state(
            c,
            ConnectionState::Connecting {
                attempt,
                endpoint,
                deadline,
            },
            reason,
        );
        self.commands.push_back(Command::Dial {
            connection: ConnectionId(c as u16),
            epoch,
            endpoint: Arc::clone(&self.hosts[endpoint]),
        });
        // a parallel dial from an earlier round is stale now
        self.conns[c].parallel = None;
        let parallel_at = (self.hosts.len() > 1)
            .then(|| deadline_after(self.now, self.config.parallel_dial_after))
            .filter(|&at| at < deadline);
        self.set_parallel_timer(c, parallel_at);
    }

    /// The slot's dial is still unanswered: dial the next host beside it.
    fn dial_in_parallel(&mut self, c: usize) {
        let conn = &self.conns[c];
        if self.closed
            || conn.parallel.is_some()
            || !matches!(conn.state, ConnectionState::Connecting { .. })
        {
            return;
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let host = (conn.host + 1) % self.hosts.len();
        let conn = &mut self.conns[c];
        conn.parallel = Some(ParallelDial {
            epoch,
            host,
            started: self.now,
        });
        if let Some(lost) = &mut conn.lost {
            lost.dials += 1;
        }
        tracing::debug!(
            target: targets::CONNECTION,
            client = self.name(),
            connection = %ConnectionId(c as u16),
            epoch,
            endpoint = %self.hosts[host].redacted(),
            "dial unanswered: dialling the next host beside it"
        );
        self.commands.push_back(Command::Dial {
            connection: ConnectionId(c as u16),
            epoch,
            endpoint: Arc::clone(&self.hosts[host]),
        });
    }

    /// The slot's parallel dial of `epoch` connected first, or the slot's own
    /// dial failed or timed out while it runs: it becomes the slot's dial (the
    /// other one is stale from now on). `false` when `epoch` is not the
    /// parallel dial of a Connecting slot.
    fn adopt_parallel(&mut self, c: usize, epoch: u64) -> bool {
        let conn = &mut self.conns[c];
        let ConnectionState::Connecting {
            endpoint, deadline, ..
        } = &mut conn.state
        else {
            return false;
        };
        let Some(p) = conn.parallel.take_if(|p| p.epoch == epoch) else {
            return false;
        };
        *endpoint = p.host;
        *deadline = deadline_after(p.started, self.config.connect_timeout);
        let deadline = *deadline;
        conn.epoch = p.epoch;
        conn.host = p.host;
        self.set_conn_timer(c, Some(deadline));
        self.set_parallel_timer(c, None);
        true
    }

    /// The slot's own dial failed or timed out with a parallel one running: the
    /// failure is counted and the parallel dial carries on as the slot's.
    fn hand_over_to_parallel(&mut self, c: usize, error: &TransportError) -> bool {
        let Some(epoch) = self.conns[c].parallel.as_ref().map(|p| p.epoch) else {
            return false;
        };
        let failed_endpoint = self.hosts[self.conns[c].host].redacted();
        if !self.adopt_parallel(c, epoch) {
            return false;
        }
        let class = error.class();
        // a round that ends here is reported; its backoff comes with the next
        // failure, the parallel dial being under way
        self.note_failure(c, error, true);
        self.events.push_back(Event::RecoveryFailed {
            connection: ConnectionId(c as u16),
            endpoint: failed_endpoint,
            error: error.clone(),
            class,
            retry_in: Duration::ZERO,
        });
        true
    }

    fn set_parallel_timer(&mut self, c: usize, at: Option<Instant>) {
        let key = TimerKey::ParallelDial(c as u16);
        if let Some(old) = std::mem::replace(&mut self.conns[c].parallel_timer, at) {
            self.timers.remove(&(old, key));
        }
        if let Some(at) = at {
            self.timers.insert((at, key));
        }
    }

    fn on_connected(&mut self, id: ConnectionId, epoch: u64) {
        let Some(conn) = self.conns.get(usize::from(id.0)) else {
            return;
        };
        let current = conn.epoch == epoch;
        if current && matches!(conn.state, ConnectionState::Connecting { .. }) {
            let c = usize::from(id.0);
            // the other dial of a race, if one runs, lost it
            self.conns[c].parallel = None;
            self.set_parallel_timer(c, None);
            let conn = &mut self.conns[c];
            conn.topology_ready = false;
            conn.close_sent = false;
            conn.suspect_until = None;
            self.metrics.dial_done(c, self.now, true);
            if conn.was_ready {
                self.stats.recoveries += 1;
                let class = conn
                    .lost
                    .as_ref()
                    .map_or(ErrorClass::Transient, |l| l.class);
                self.metrics.recovered(conn.host, class);
            }
            conn.was_ready = true;
            self.set_conn_timer(c, None);
            let since = self.now;
            self.set_conn_state(
                c,
                ConnectionState::Ready {
                    blocked: false,
                    since,
                },
                Reason::Connected,
            );
            for i in 0..self.conns[c].channels.len() {
                self.open_channel(c, i, Reason::ConnectionUp);
            }
        } else if !current && epoch < self.next_epoch {
            // A dial we gave up on (timeout, close) finished after all: close it so
            // no orphan connection lingers on the broker.
            self.commands.push_back(Command::CloseConnection {
                connection: id,
                epoch,
            });
        }
    }

    fn on_connection_lost(&mut self, id: ConnectionId, epoch: u64, error: TransportError) {
        let Some(c) = self.current(id, epoch) else {
            return;
        };
        self.blame_the_command(c, &error);
        match self.conns[c].state {
            ConnectionState::Ready { since, .. } => {
                let class = error.class();
                if self.conns[c].lost.is_none() {
                    // a recovery runs from the first loss to a channel Ready
                    // again, through any losses right after a handshake
                    let endpoint = self.hosts[self.conns[c].host].redacted();
                    let span = tracing::info_span!(
                        target: targets::CONNECTION,
                        "recovery",
                        client = self.name(),
                        connection = %id,
                        %endpoint,
                        cause = class_label(class),
                        %error,
                        outcome = tracing::field::Empty,
                        stall_ms = tracing::field::Empty,
                        dials = tracing::field::Empty,
                    );
                    self.conns[c].lost = Some(Lost {
                        at: self.now,
                        class,
                        dials: 0,
                        span,
                    });
                }
                let retry = if self.now.saturating_duration_since(since)
                    >= self.config.backoff.reset_after
                {
                    // It did useful work: the broker accepts us, and whatever
                    // dropped the connection (an admin, a node that went away) says
                    // little about the next dial. Redial at once, however many
                    // losses came before; the backoff starts over.
                    self.conns[c].backoff.reset();
                    self.conns[c].failures = 0;
                    Retry::Now
                } else {
                    // Lost right after the handshake: a failed dial, so a broker
                    // that drops every connection meets a growing backoff.
                    Retry::AsFailure
                };
                self.connection_failed(c, error, Reason::ConnectionLost(class), retry);
            }
            ConnectionState::Connecting { .. } => {
                let class = error.class();
                self.connection_failed(c, error, Reason::DialFailed(class), Retry::AsFailure);
            }
            ConnectionState::Closing { .. } => self.finish_close(c),
            ConnectionState::Reconnecting { .. } | ConnectionState::Closed => {}
        }
    }

    /// A dial failed or a Ready connection was lost: channels wait, the next dial
    /// is scheduled, on the next host of the list (the host that dropped us is the
    /// likeliest to be down). [`Retry::Now`] dials it at once. [`Retry::AsFailure`]
    /// counts a failure: the next host is still tried at once, and the slot waits
    /// (by its backoff) only once every host has failed since it was last stable.
    fn connection_failed(&mut self, c: usize, error: TransportError, reason: Reason, retry: Retry) {
        self.conns[c].topology_ready = false;
        // a parallel dial still running is stale: closed if it connects
        self.conns[c].parallel = None;
        self.set_parallel_timer(c, None);
        for i in 0..self.conns[c].channels.len() {
            self.channel_waits_for_connection(c, i);
        }
        let hosts = self.hosts.len();
        let class = error.class();
        self.metrics.dial_done(c, self.now, false);
        let failed_endpoint = self.hosts[self.conns[c].host].redacted();
        let round_failed = self.note_failure(c, &error, retry != Retry::Now);
        let conn = &mut self.conns[c];
        conn.host = (conn.host + 1) % hosts;
        // The next host is tried at once, whatever the error: a refusal by one
        // node (or a proxy that drops the handshake, which some clients cannot
        // tell from one) says little about the others. When a round over every
        // host ends in a refusal, the next round waits at the cap: retrying bad
        // credentials sooner only hammers the broker.
        let delay = if !round_failed {
            std::time::Duration::ZERO
        } else {
            conn.failures = 0;
            if class == ErrorClass::Refused {
                conn.backoff.at_cap(&mut self.rng)
            } else {
                conn.backoff.next_delay(&mut self.rng)
            }
        };
        let attempt = conn.backoff.attempt();
        let retry_at = deadline_after(self.now, delay);
        self.events.push_back(Event::RecoveryFailed {
            connection: ConnectionId(c as u16),
            endpoint: failed_endpoint,
            error: error.clone(),
            class,
            retry_in: delay,
        });
        self.set_conn_state(
            c,
            ConnectionState::Reconnecting {
                attempt,
                retry_at,
                last_error: error,
            },
            reason,
        );
        if delay.is_zero() {
            self.dial(c, Reason::RetryDue);
        } else {
            self.set_conn_timer(c, Some(retry_at));
        }
    }

    /// Counts a failure of slot `c` (a dial, or a connection lost before it was
    /// stable): remembered as the first contact's error until one is made, and
    /// reported as the first contact's failure when it completes a round over
    /// every host. `may_end_round: false` for a loss that is redialled at once
    /// whatever the count. Returns whether a round over every host failed since
    /// the slot last waited its backoff (the backoff is due).
    fn note_failure(&mut self, c: usize, error: &TransportError, may_end_round: bool) -> bool {
        let hosts = self.hosts.len();
        self.metrics.failed(c, error.class());
        let conn = &mut self.conns[c];
        conn.failures += 1;
        let round_failed = may_end_round && conn.failures >= hosts;
        if !self.ever_ready {
            self.first_error = Some(error.clone());
            if round_failed && !self.first_failure_reported {
                self.first_failure_reported = true;
                self.events.push_back(Event::FirstContact {
                    result: Err(error.clone()),
                });
            }
        }
        round_failed
    }

    fn set_blocked(&mut self, id: ConnectionId, epoch: u64, reason: Option<String>) {
        let Some(c) = self.current(id, epoch) else {
            return;
        };
        if let ConnectionState::Ready { blocked, .. } = &mut self.conns[c].state {
            let now_blocked = reason.is_some();
            if *blocked == now_blocked {
                return;
            }
            *blocked = now_blocked;
            self.room |= !now_blocked;
            self.metrics.blocked(now_blocked);
            match &reason {
                Some(reason) => tracing::warn!(
                    target: targets::CONNECTION,
                    client = self.name(),
                    connection = %id,
                    %reason,
                    "connection blocked by the broker"
                ),
                None => tracing::info!(
                    target: targets::CONNECTION,
                    client = self.name(),
                    connection = %id,
                    "connection unblocked"
                ),
            }
            self.events.push_back(match reason {
                Some(reason) => Event::Blocked {
                    connection: id,
                    reason,
                },
                None => Event::Unblocked { connection: id },
            });
        }
    }

    /// [`Input::Close`]: keeps going (recovering as usual) until the outbox is
    /// empty or the close timeout passes.
    fn start_drain(&mut self) {
        if self.is_closing() {
            return;
        }
        // a timeout too far to represent is no timeout: drain until done
        self.draining = Some(deadline_after(self.now, self.config.close_timeout));
        // what waits for room was accepted: it drains too, beyond the capacity
        self.outbox.admit(usize::MAX);
        self.check_drained();
    }

    /// Ends a drain that is done or out of time.
    fn check_drained(&mut self) {
        let Some(deadline) = self.draining else {
            return;
        };
        if self.outbox.is_empty() {
            self.draining = None;
            self.close(deadline);
        } else if deadline <= self.now {
            self.draining = None;
            self.close(self.now);
        }
    }

    /// Closes: what was not sent resolves Closed now; connections close once
    /// their in-flight messages are confirmed, or at `deadline`.
    fn close(&mut self, deadline: Instant) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.holds.clear();
        for conn in &mut self.conns {
            if let Some(lost) = conn.lost.take() {
                lost.span.record("outcome", "closed");
                lost.span.record("dials", lost.dials);
            }
        }
        // Nothing new goes out: waiting publishes and topology requests end now;
        // publishes in flight get until the close timeout for their confirms.
        self.close_outbox_pending();
        self.user_ops_closed();
        for c in 0..self.conns.len() {
            for i in 0..self.conns[c].channels.len() {
                self.set_chan_timer(c, i, None);
                let ch = &mut self.conns[c].channels[i];
                ch.current.steps.clear();
                ch.current.step_in_flight = None;
                self.set_chan_state(c, i, ChannelState::Closed, Reason::CloseRequested);
            }
            self.set_conn_timer(c, None);
            self.set_parallel_timer(c, None);
            self.conns[c].parallel = None;
            match self.conns[c].state {
                ConnectionState::Ready { .. } => {
                    self.set_conn_timer(c, Some(deadline));
                    self.set_conn_state(
                        c,
                        ConnectionState::Closing { deadline },
                        Reason::CloseRequested,
                    );
                    self.close_when_drained(c);
                }
                ConnectionState::Connecting { .. } => {
                    // Orphan the dial in flight: if it still succeeds, on_connected
                    // sees an old epoch and closes it.
                    self.conns[c].epoch = self.next_epoch;
                    self.next_epoch += 1;
                    self.set_conn_state(c, ConnectionState::Closed, Reason::CloseRequested);
                }
                ConnectionState::Reconnecting { .. } => {
                    self.set_conn_state(c, ConnectionState::Closed, Reason::CloseRequested);
                }
                ConnectionState::Closing { .. } | ConnectionState::Closed => {}
            }
        }
    }

    /// Sends the CloseConnection of a Closing connection once nothing it carries
    /// awaits a confirm.
    fn close_when_drained(&mut self, c: usize) {
        let conn = &self.conns[c];
        // a message that resolved while in flight (it timed out) is owed
        // nothing: its late confirm, if it ever comes, is not waited for
        let outbox = &self.outbox;
        if conn.close_sent
            || !matches!(conn.state, ConnectionState::Closing { .. })
            || conn.channels.iter().any(|ch| {
                ch.current
                    .in_flight
                    .iter()
                    .any(|&(_, id)| outbox.get(id).is_some())
            })
        {
            return;
        }
        self.conns[c].close_sent = true;
        self.commands.push_back(Command::CloseConnection {
            connection: ConnectionId(c as u16),
            epoch: self.conns[c].epoch,
        });
    }

    /// A Closing connection is done (closed, lost or out of time): whatever it
    /// still carried resolves as Closed.
    fn finish_close(&mut self, c: usize) {
        for i in 0..self.conns[c].channels.len() {
            self.channel_down(c, i, None);
        }
        if !self.conns[c].close_sent {
            self.conns[c].close_sent = true;
            self.commands.push_back(Command::CloseConnection {
                connection: ConnectionId(c as u16),
                epoch: self.conns[c].epoch,
            });
        }
        self.set_conn_timer(c, None);
        self.set_conn_state(c, ConnectionState::Closed, Reason::CloseFinished);
    }

    // ----- timers -----

    fn fire_timers(&mut self) {
        self.expire_publishes();
        self.expire_user_ops();
        self.expire_consume_waits();
        self.retry_nacked_due();
        if !self.holds.is_empty() {
            // a hold past its bound ends: what it held goes out
            self.pump();
        }
        while let Some(&(at, key)) = self.timers.first() {
            if at > self.now {
                break;
            }
            self.timers.pop_first();
            match key {
                TimerKey::Connection(c) => {
                    let c = usize::from(c);
                    self.conns[c].timer = None;
                    self.connection_timer(c);
                }
                TimerKey::ParallelDial(c) => {
                    let c = usize::from(c);
                    self.conns[c].parallel_timer = None;
                    self.dial_in_parallel(c);
                }
                TimerKey::Consumer(id) => self.consumer_retry_due(id),
                TimerKey::Channel(c, i) => {
                    let (c, i) = (usize::from(c), usize::from(i));
                    self.conns[c].channels[i].timer = None;
                    if self.conns[c].state.is_ready()
                        && matches!(
                            self.conns[c].channels[i].state,
                            ChannelState::Reopening { retry_at: Some(_) }
                        )
                    {
                        self.open_channel(c, i, Reason::RetryDue);
                    }
                }
            }
        }
    }

    fn connection_timer(&mut self, c: usize) {
        match self.conns[c].state {
            ConnectionState::Connecting { .. } => {
                if self.hand_over_to_parallel(c, &TransportError::Timeout) {
                    return;
                }
                // Orphan the late dial: a success after this is closed on arrival.
                self.conns[c].epoch = self.next_epoch;
                self.next_epoch += 1;
                self.connection_failed(
                    c,
                    TransportError::Timeout,
                    Reason::ConnectTimeout,
                    Retry::AsFailure,
                );
            }
            ConnectionState::Reconnecting { .. } => self.dial(c, Reason::RetryDue),
            ConnectionState::Closing { .. } => self.finish_close(c),
            ConnectionState::Ready { .. } => {
                // the connection outlived the failure of its channel: its other
                // channels take messages again
                if self.conns[c].suspect_until.take().is_some() {
                    self.room = true;
                }
            }
            ConnectionState::Closed => {}
        }
    }

    fn set_conn_timer(&mut self, c: usize, at: Option<Instant>) {
        let key = TimerKey::Connection(c as u16);
        if let Some(old) = std::mem::replace(&mut self.conns[c].timer, at) {
            self.timers.remove(&(old, key));
        }
        if let Some(at) = at {
            self.timers.insert((at, key));
        }
    }

    // ----- the one place each kind of state changes -----

    fn set_conn_state(&mut self, c: usize, new: ConnectionState, reason: Reason) {
        let from = self.conns[c].state.phase();
        let to = new.phase();
        let was_blocked = matches!(
            self.conns[c].state,
            ConnectionState::Ready { blocked: true, .. }
        );
        self.metrics.connection_phase(from, to, was_blocked);
        self.conns[c].state = new;
        let object = Object::Connection(ConnectionId(c as u16));
        tracing::debug!(target: targets::CONNECTION, %object, ?from, ?to, ?reason, "state changed");
        self.events.push_back(Event::StateChanged {
            object,
            from,
            to,
            reason,
        });
    }
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("hosts", &self.hosts)
            .field("connections", &self.conns.len())
            .field("ready_channels", &self.ready_channels)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// The frame size a message's properties must fit in (see
/// [`Properties::validate`](crate::Properties::validate)).
fn frame_max(config: &Config) -> u32 {
    config
        .hosts
        .iter()
        .filter_map(|host| host.amqp_uri().query.frame_max)
        .filter(|&max| max != 0)
        .fold(crate::message::FRAME_MAX_DEFAULT, u32::min)
}
