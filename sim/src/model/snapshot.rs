//! What tests can see of the broker: snapshots of queues, exchanges, bindings and
//! connections, and the counters.

use amqp_rebound_core::TransportError;
use amqp_rebound_core::message::FieldTable;
use amqp_rebound_core::topology::ExchangeKind;

use super::{BindingDestination, ConnectionStats, Queue, SimConnectionId, State, StoredMessage};

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
    /// Messages refused under [`ConfirmMode::Nack`](super::ConfirmMode::Nack) (never routed).
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
    /// The name from [`ConnectOptions`](amqp_rebound_core::transport::ConnectOptions).
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

impl State {
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

    pub(super) fn snapshot_queue(&self, name: &str, q: &Queue) -> QueueSnapshot {
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
        self.entities
            .queues
            .get(name)
            .map(|q| self.snapshot_queue(name, q))
    }

    pub(crate) fn queues(&self) -> Vec<QueueSnapshot> {
        self.entities
            .queues
            .iter()
            .map(|(n, q)| self.snapshot_queue(n, q))
            .collect()
    }

    pub(crate) fn exchanges(&self) -> Vec<ExchangeSnapshot> {
        self.entities
            .exchanges
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
        self.entities
            .bindings
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
        stats.ready = self
            .entities
            .queues
            .values()
            .map(|q| q.ready.len() as u64)
            .sum();
        stats.unacked = self.chans.values().map(|c| c.unacked.len() as u64).sum();
        stats.consumers = self.consumers.len() as u64;
        stats.open_connections = self.conns.values().filter(|c| c.broker_open).count() as u64;
        stats
    }
}
