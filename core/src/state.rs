//! The lifecycle states of connections and channels.
//!
//! Per-state data lives inside the variant. States change in exactly one place
//! (the supervisor's `set_*_state` functions), which records `old -> new` with a
//! [`Reason`](crate::Reason) and emits [`Event::StateChanged`](crate::Event::StateChanged).

use std::time::Instant;

use crate::error::TransportError;

/// Lifecycle of one connection slot.
///
/// `Connecting -> Ready -> Reconnecting -> Connecting -> ... -> Closing -> Closed`.
/// `Closed` is terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// A dial is in flight.
    Connecting {
        /// Delays handed out by the backoff since it last reset.
        attempt: u32,
        /// Index of the endpoint being dialled, in the client's shuffled host list.
        endpoint: usize,
        /// When the dial counts as failed if it has not finished.
        deadline: Instant,
    },
    /// Connected. Channels open on it.
    Ready {
        /// The broker sent `connection.blocked` (resource alarm): nothing new is
        /// published on this connection until `connection.unblocked`.
        blocked: bool,
        /// When it became Ready (the backoff resets after it stays Ready long enough).
        since: Instant,
    },
    /// Lost or failed to connect; waiting for the backoff delay before the next dial.
    Reconnecting {
        /// Delays handed out by the backoff since it last reset.
        attempt: u32,
        /// When the next dial starts.
        retry_at: Instant,
        /// Why the last connection or dial failed.
        last_error: TransportError,
    },
    /// `close()` was called; waiting for the transport to finish closing.
    Closing {
        /// When it counts as closed even without the transport's word.
        deadline: Instant,
    },
    /// Terminal: nothing is dialled again.
    Closed,
}

/// Lifecycle of one channel slot: each state is named for what the channel waits for.
///
/// `Idle -> AwaitingOpenOk -> [AwaitingTopology ->] Replaying -> Ready -> Reopening ->
/// AwaitingOpenOk -> ... -> Closed`. `Closed` is terminal. Every open gets a higher
/// generation number; what a generation carries (messages awaiting confirms,
/// unacked deliveries, topology steps) is dropped with it.
///
/// The states from `Idle` to `Replaying` are all [`Phase::Opening`]: moving between
/// them is progress within the open, not a state change the application is told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Not opened yet: waiting for its connection to be Ready the first time.
    Idle,
    /// `channel.open` (and `confirm.select`) sent: waiting for the broker's answers.
    AwaitingOpenOk,
    /// Open, but waiting for its connection's first channel to declare the
    /// connection's entities again (its consumers need their queues).
    AwaitingTopology,
    /// Open, replaying its topology (the connection's entities on the first channel,
    /// then the consumers that live on this one): `done` of `total` steps answered.
    Replaying {
        /// Steps answered.
        done: u32,
        /// Steps in this replay so far (consumers started meanwhile add to it).
        total: u32,
    },
    /// Open and usable: the only state in which the pool hands the channel out.
    Ready,
    /// Lost; waiting for its connection (`retry_at: None`) or for its own backoff
    /// after a channel-level error (`retry_at: Some`).
    Reopening {
        /// When the reopen starts, if it waits for a delay rather than the connection.
        retry_at: Option<Instant>,
    },
    /// Terminal.
    Closed,
}

/// The name of a state, without its data: what [`Event::StateChanged`] reports.
///
/// [`Event::StateChanged`]: crate::Event::StateChanged
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// [`ConnectionState::Connecting`].
    Connecting,
    /// [`ConnectionState::Ready`] or [`ChannelState::Ready`].
    Ready,
    /// [`ConnectionState::Reconnecting`].
    Reconnecting,
    /// [`ChannelState::Idle`], [`AwaitingOpenOk`](ChannelState::AwaitingOpenOk),
    /// [`AwaitingTopology`](ChannelState::AwaitingTopology) or
    /// [`Replaying`](ChannelState::Replaying).
    Opening,
    /// [`ChannelState::Reopening`].
    Reopening,
    /// [`ConnectionState::Closing`].
    Closing,
    /// [`ConnectionState::Closed`] or [`ChannelState::Closed`].
    Closed,
}

impl ConnectionState {
    /// The state's name.
    pub fn phase(&self) -> Phase {
        match self {
            ConnectionState::Connecting { .. } => Phase::Connecting,
            ConnectionState::Ready { .. } => Phase::Ready,
            ConnectionState::Reconnecting { .. } => Phase::Reconnecting,
            ConnectionState::Closing { .. } => Phase::Closing,
            ConnectionState::Closed => Phase::Closed,
        }
    }

    /// Ready, blocked or not.
    pub fn is_ready(&self) -> bool {
        matches!(self, ConnectionState::Ready { .. })
    }

    /// Ready and not blocked: new publishes may go out on it.
    pub fn is_sendable(&self) -> bool {
        matches!(self, ConnectionState::Ready { blocked: false, .. })
    }

    /// Closing or Closed.
    pub fn is_closing(&self) -> bool {
        matches!(
            self,
            ConnectionState::Closing { .. } | ConnectionState::Closed
        )
    }
}

impl ChannelState {
    /// The state's name.
    pub fn phase(&self) -> Phase {
        match self {
            ChannelState::Idle
            | ChannelState::AwaitingOpenOk
            | ChannelState::AwaitingTopology
            | ChannelState::Replaying { .. } => Phase::Opening,
            ChannelState::Ready => Phase::Ready,
            ChannelState::Reopening { .. } => Phase::Reopening,
            ChannelState::Closed => Phase::Closed,
        }
    }

    /// Open and usable.
    pub fn is_ready(&self) -> bool {
        matches!(self, ChannelState::Ready)
    }

    /// Open on the broker (its open-ok came): deliveries and topology answers
    /// may arrive on it.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            ChannelState::AwaitingTopology | ChannelState::Replaying { .. } | ChannelState::Ready
        )
    }

    /// Open or being opened: its failure is news (later ones are not).
    pub fn is_live(&self) -> bool {
        *self == ChannelState::AwaitingOpenOk || self.is_open()
    }

    /// Runs topology steps: replaying or Ready.
    pub fn runs_steps(&self) -> bool {
        matches!(self, ChannelState::Replaying { .. } | ChannelState::Ready)
    }
}
