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

/// Lifecycle of one channel slot.
///
/// `Opening -> Ready -> Reopening -> Opening -> ... -> Closed`. `Closed` is terminal.
/// Every open gets a higher generation number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Being opened (channel.open, confirm.select, topology replay), or waiting for
    /// its connection to be Ready before that.
    Opening,
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
    /// [`ChannelState::Opening`].
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
            ChannelState::Opening => Phase::Opening,
            ChannelState::Ready => Phase::Ready,
            ChannelState::Reopening { .. } => Phase::Reopening,
            ChannelState::Closed => Phase::Closed,
        }
    }

    /// Open and usable.
    pub fn is_ready(&self) -> bool {
        matches!(self, ChannelState::Ready)
    }
}
