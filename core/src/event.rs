//! What the machines tell the application: [`Event`]s.

use std::time::Duration;

use crate::error::{ErrorClass, TransportError};
use crate::ids::{ConnectionId, Object};
use crate::state::Phase;

/// Something the application (or an operator) may want to know about.
///
/// Drained with [`Supervisor::poll_event`](crate::Supervisor::poll_event).
#[derive(Debug, Clone, PartialEq, Eq)]
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
