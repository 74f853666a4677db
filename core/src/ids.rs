//! Identifiers of the objects the machines own.

use std::fmt;

/// A connection slot in the pool, `0..connections`.
///
/// A slot keeps its id across reconnects; each dial of the slot gets a fresh
/// *epoch* (see [`Command::Dial`](crate::Command::Dial)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u16);

/// A channel slot: the connection it lives on and its index there.
///
/// A slot keeps its id across reopens; each open gets a higher *generation*.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId {
    /// The connection slot this channel lives on.
    pub connection: ConnectionId,
    /// Index of the channel on that connection, `0..channels_per_connection`.
    pub index: u16,
}

/// An object whose state the machines track: a connection or a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Object {
    /// A connection slot.
    Connection(ConnectionId),
    /// A channel slot.
    Channel(ChannelId),
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chan-{}.{}", self.connection.0, self.index)
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Connection(c) => c.fmt(f),
            Object::Channel(c) => c.fmt(f),
        }
    }
}
