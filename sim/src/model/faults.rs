//! Faults: hosts that refuse or partition, kills and broker closes, restarts,
//! confirm trouble, flow control, administrative deletes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::transport::{ChannelEvent, ConnectionEvent};

use super::{Action, ConfirmMode, Down, DropCause, State, reply};

/// The addresses the broker answers on, and what the tests did to them.
pub(super) struct Hosts {
    by_key: BTreeMap<String, HostState>,
    next_partition_epoch: u64,
    /// Every dial is refused before this (a restart's downtime).
    down_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct HostState {
    refuse_until: Option<Instant>,
    refuse_forever: bool,
    /// The epoch of the partition in force, if any: a heartbeat check scheduled
    /// in one partition must not fire in a later one.
    partition: Option<u64>,
}

/// What a dial to a host meets, before any credential is checked.
pub(super) enum HostCheck {
    /// Not one of this broker's hosts.
    Unknown,
    /// Partitioned: the dial never completes.
    Blackholed,
    /// Refusing dials, or the broker is down.
    Refusing,
    Open,
}

impl Hosts {
    pub(super) fn new() -> Hosts {
        Hosts {
            by_key: BTreeMap::new(),
            next_partition_epoch: 1,
            down_until: None,
        }
    }

    pub(super) fn check_dial(&self, host: &str, now: Instant) -> HostCheck {
        let Some(h) = self.by_key.get(host) else {
            return HostCheck::Unknown;
        };
        if h.partition.is_some() {
            return HostCheck::Blackholed;
        }
        let refused = h.refuse_forever
            || h.refuse_until.is_some_and(|t| now < t)
            || self.down_until.is_some_and(|t| now < t);
        if refused {
            HostCheck::Refusing
        } else {
            HostCheck::Open
        }
    }

    pub(super) fn is_partitioned(&self, host: &str) -> bool {
        self.partition_epoch(host).is_some()
    }

    pub(super) fn partition_epoch(&self, host: &str) -> Option<u64> {
        self.by_key.get(host).and_then(|h| h.partition)
    }

    /// Starts a partition of a served host: its epoch, or `None` if one is in
    /// force already.
    fn partition(&mut self, host: &str) -> Option<u64> {
        let h = self.by_key.get_mut(host)?;
        if h.partition.is_some() {
            return None;
        }
        let epoch = self.next_partition_epoch;
        self.next_partition_epoch += 1;
        h.partition = Some(epoch);
        Some(epoch)
    }

    /// Ends the partition of a host; whether there was one.
    fn heal(&mut self, host: &str) -> bool {
        self.by_key
            .get_mut(host)
            .is_some_and(|h| h.partition.take().is_some())
    }
}

impl State {
    // ---- hosts and dials -------------------------------------------------------

    pub(crate) fn add_host(&mut self, host: String) {
        self.hosts.by_key.entry(host).or_default();
    }

    pub(crate) fn serves(&self, host: &str) -> bool {
        self.hosts.by_key.contains_key(host)
    }

    pub(crate) fn hosts(&self) -> Vec<String> {
        self.hosts.by_key.keys().cloned().collect()
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
        let Some(h) = self.hosts.by_key.get_mut(host) else {
            return false;
        };
        match until {
            Some(t) => h.refuse_until = Some(t),
            None => h.refuse_forever = true,
        }
        true
    }

    pub(crate) fn accept_dials(&mut self, host: &str) -> bool {
        let Some(h) = self.hosts.by_key.get_mut(host) else {
            return false;
        };
        h.refuse_until = None;
        h.refuse_forever = false;
        true
    }

    pub(crate) fn partition(&mut self, host: &str) -> bool {
        if !self.serves(host) {
            return false;
        }
        let Some(epoch) = self.hosts.partition(host) else {
            return true;
        };
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
        if !self.serves(host) {
            return false;
        }
        if !self.hosts.heal(host) {
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
            .entities
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
            for q in self.entities.queues.values_mut() {
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
                self.ledger.dropped(id, 1);
            }
            self.stats.dropped_by_restart += dropped;
        }
        let transient: Vec<String> = self
            .entities
            .exchanges
            .iter()
            .filter(|(_, e)| !e.durable && !e.builtin)
            .map(|(n, _)| n.clone())
            .collect();
        for name in transient {
            let _ = self.entities.delete_exchange(&name);
        }
        for q in self.entities.queues.values_mut() {
            q.consumers.clear();
            q.next_consumer = 0;
        }
        self.alarm = None;
        self.restarting = false;
        self.stats.restarts += 1;
        let now = self.now();
        self.hosts.down_until = Some(now + downtime);
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
    pub(super) fn update_blocked(&mut self, conn_id: u64) {
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
        self.entities
            .queues
            .contains_key(name)
            .then(|| self.delete_queue_internal(name, DropCause::Delete))
    }

    pub(crate) fn delete_exchange_by_name(&mut self, name: &str) -> bool {
        self.entities.exchanges.contains_key(name) && self.entities.delete_exchange(name).is_ok()
    }
}
