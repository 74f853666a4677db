//! What the machines tell the application: [`Event`]s.

use std::time::Duration;

use crate::error::{ErrorClass, TransportError};
use crate::ids::{ChannelId, ConnectionId, Object};
use crate::message::Delivery;
use crate::outbox::{Confirmation, FlushId, PublishError, PublishId};
use crate::state::Phase;
use crate::topology::{ConsumeError, ConsumerId, OpId, QueueHandle, TopologyError};

/// Something the application (or an operator) may want to know about.
///
/// Drained with [`Supervisor::poll_event`](crate::Supervisor::poll_event).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection or channel changed state.
    StateChanged {
        /// Which one.
        object: Object,
        /// The state it left.
        from: Phase,
        /// The state it entered.
        to: Phase,
        /// Why.
        reason: Reason,
    },
    /// A dial failed or a connection was lost; the next attempt is scheduled.
    /// For [`ErrorClass::Refused`] errors this repeats at the backoff cap: the
    /// operator has to fix something (credentials, permissions, vhost).
    RecoveryFailed {
        /// The connection slot.
        connection: ConnectionId,
        /// The endpoint, password redacted.
        endpoint: String,
        /// What went wrong.
        error: TransportError,
        /// How the error was classified.
        class: ErrorClass,
        /// Delay before the next dial.
        retry_in: Duration,
    },
    /// The broker blocked a connection (resource alarm). Nothing new is published
    /// on it until [`Event::Unblocked`].
    Blocked {
        /// The connection slot.
        connection: ConnectionId,
        /// The broker's reason, e.g. "low on memory".
        reason: String,
    },
    /// The broker unblocked a connection.
    Unblocked {
        /// The connection slot.
        connection: ConnectionId,
    },
    /// A publish ended, exactly once: confirmed, returned, or an error.
    PublishResolved {
        /// The publish.
        id: PublishId,
        /// How it ended.
        result: Result<Confirmation, PublishError>,
    },
    /// Every message accepted before a [`Supervisor::flush`](crate::Supervisor::flush)
    /// has resolved.
    Flushed {
        /// The flush.
        flush: FlushId,
        /// How many of those messages resolved other than
        /// [`Confirmation::Confirmed`] (returned, nacked, timed out, rejected,
        /// closed).
        not_confirmed: u64,
    },
    /// A topology request of the application ended. `Ok` carries the queue's real
    /// name for a queue declaration.
    TopologyResolved {
        /// The request.
        op: OpId,
        /// How it ended.
        result: Result<Option<String>, TopologyError>,
    },
    /// A server-named queue was re-created under a new name during recovery;
    /// bindings and consumers follow the new name.
    QueueRenamed {
        /// The queue's stable handle.
        queue: QueueHandle,
        /// The name it had.
        old: String,
        /// The name it has now.
        new: String,
    },
    /// A topology replay step failed; the channel reopens after its backoff and
    /// the replay starts over (a binding or an exchange declaration refused
    /// again and again, or a queue declaration refused with 406 "inequivalent
    /// arg", is then
    /// dropped: [`Event::ReplayAbandoned`]).
    ReplayFailed {
        /// The channel it ran on.
        channel: ChannelId,
        /// What the step was.
        step: String,
        /// The broker's answer.
        error: TransportError,
    },
    /// A binding or an exchange declaration the broker refused to replay
    /// [`MAX_REPLAY_REFUSALS`](crate::supervisor::MAX_REPLAY_REFUSALS) times in
    /// a row is dropped from the topology the client replays (the replay goes
    /// on without it). So is the declaration of a fixed-name queue refused
    /// with 406 PRECONDITION_FAILED "inequivalent arg" that many times in a
    /// row (another application declared the queue again with other
    /// arguments; a 406 for the vhost's queue limit does not count): the
    /// queue is no longer declared, but its bindings and consumers are still
    /// replayed against the queue the broker has; a declaration of it the
    /// broker takes (the application's) is replayed again.
    ReplayAbandoned {
        /// What the step was.
        step: String,
        /// The broker's last answer.
        error: TransportError,
    },
    /// A delivery to a consumer. Ack it with its `channel` and `generation`.
    Delivery {
        /// The consumer.
        consumer: ConsumerId,
        /// The channel it came on.
        channel: ChannelId,
        /// The channel generation it came on.
        generation: u64,
        /// The delivery (boxed: it is much larger than the other events).
        delivery: Box<Delivery>,
    },
    /// The broker cancelled a consumer (e.g. its queue was deleted).
    ConsumerCancelled {
        /// The consumer.
        consumer: ConsumerId,
        /// Whether its queue is re-declared and the consumer re-subscribed.
        resubscribing: bool,
    },
    /// The first basic.consume of a consumer the application started was
    /// answered: `Ok` once the broker accepted it, or why not (the consumer is
    /// then gone).
    ConsumeResolved {
        /// The consumer.
        consumer: ConsumerId,
        /// The broker's first answer.
        result: Result<(), ConsumeError>,
    },
    /// The client's first contact with the brokers ended: `Ok` when a channel
    /// was Ready for the first time, or the error of a connection slot's first
    /// round of dials over every host that all failed (the client keeps
    /// dialling). At most one `Ok`; an `Err` at most once, before it.
    FirstContact {
        /// How it went.
        result: Result<(), TransportError>,
    },
    /// A consumer ended for good (it will receive nothing more): the broker
    /// cancelled it and its queue is not this client's to declare again
    /// ([`ConsumeError::CancelledByBroker`]),
    /// or it refused to subscribe it again after a recovery
    /// [`MAX_CONSUME_REFUSALS`](crate::supervisor::MAX_CONSUME_REFUSALS) times in
    /// a row, or, as "in exclusive use", for
    /// [`EXCLUSIVE_USE_GRACE`](crate::supervisor::EXCLUSIVE_USE_GRACE).
    ConsumerEnded {
        /// The consumer.
        consumer: ConsumerId,
        /// Why.
        error: ConsumeError,
    },
    /// Only in a [`Client::watch`](crate::Client::watch) stream (never from
    /// [`Supervisor::poll_event`](crate::Supervisor::poll_event)): the watcher
    /// fell more than its capacity behind, and the oldest `missed` events were
    /// dropped. The events kept follow, in order.
    Lagged {
        /// How many events this watcher lost since it last heard of a loss.
        missed: u64,
    },
}

/// Why a state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The first dial of a new client.
    Start,
    /// A backoff delay elapsed.
    RetryDue,
    /// The transport finished a dial.
    Connected,
    /// A dial failed.
    DialFailed(ErrorClass),
    /// A dial did not finish within the connect timeout.
    ConnectTimeout,
    /// An established connection failed.
    ConnectionLost(ErrorClass),
    /// The channel's connection is not (or no longer) Ready.
    ConnectionDown,
    /// The channel's connection is Ready, so the channel opens.
    ConnectionUp,
    /// The channel is open and its topology replayed.
    ChannelOpened,
    /// The channel failed (with the broker's reply code, if any).
    ChannelFailed(Option<u16>),
    /// The application asked to close.
    CloseRequested,
    /// The transport reported the connection closed, or the close timed out.
    CloseFinished,
}
