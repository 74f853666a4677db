//! Publishing: routing into queues, publisher confirms, returns, and the ledger of
//! what became of every routed message.

use std::collections::BTreeMap;
use std::time::Instant;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::message::{Message, Returned};
use amqp_rebound_core::transport::ChannelEvent;
use bytes::Bytes;

use super::{
    Action, ConfirmMode, Down, Fail, State, StoredMessage, channel_fail, count_u32,
    not_found_exchange,
};

/// What became of one message the broker routed, for loss accounting (see
/// [`SimBroker::ledger`](crate::SimBroker::ledger)). Every routed copy ends up in exactly one place: still in
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

/// What became of every message routed so far, by the broker's number for it.
pub(super) struct Ledger {
    entries: BTreeMap<u64, LedgerEntry>,
    next_id: u64,
}

impl Ledger {
    pub(super) fn new() -> Ledger {
        Ledger {
            entries: BTreeMap::new(),
            next_id: 1,
        }
    }

    /// The number for the next message that reaches the broker.
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn record(&mut self, entry: LedgerEntry) {
        self.entries.insert(entry.id, entry);
    }

    /// `n` copies of message `id` were lost with their queue.
    pub(super) fn dropped(&mut self, id: u64, n: u32) {
        if let Some(l) = self.entries.get_mut(&id) {
            l.dropped += n;
        }
    }

    /// A copy of message `id` was acked (or delivered with `no_ack`).
    pub(super) fn acked(&mut self, id: u64) {
        if let Some(l) = self.entries.get_mut(&id) {
            l.acked += 1;
        }
    }

    /// A copy of message `id` was nacked or rejected without requeue.
    pub(super) fn discarded(&mut self, id: u64) {
        if let Some(l) = self.entries.get_mut(&id) {
            l.discarded += 1;
        }
    }
}

impl State {
    /// Routes a message into its queues; returns how many took it.
    pub(super) fn enqueue(&mut self, message: &Message) -> usize {
        let queues = self.entities.route(
            &message.exchange,
            &message.routing_key,
            message.properties.headers.as_ref(),
        );
        let id = self.ledger.next_id();
        self.stats.published += 1;
        for name in &queues {
            if let Some(q) = self.entities.queues.get_mut(name) {
                q.ready.push_back(StoredMessage {
                    id,
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                    properties: message.properties.clone(),
                    payload: message.payload.clone(),
                    redelivered: false,
                });
                self.dirty.insert(name.clone());
            }
        }
        self.stats.routed += queues.len() as u64;
        if queues.is_empty() {
            self.stats.unroutable += 1;
        }
        self.ledger.record(LedgerEntry {
            id,
            payload: message.payload.clone(),
            at: self.clock.now(),
            routed: count_u32(queues.len()),
            acked: 0,
            discarded: 0,
            dropped: 0,
        });
        queues.len()
    }

    pub(crate) fn ledger(&self) -> Vec<LedgerEntry> {
        self.ledger.entries.values().cloned().collect()
    }

    pub(super) fn check_publish(&self, message: &Message) -> Result<(), Fail> {
        let Some(ex) = self.entities.exchanges.get(&message.exchange) else {
            return Err(not_found_exchange(&message.exchange));
        };
        if ex.internal {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - cannot publish to internal exchange '{}' in vhost '/'",
                    message.exchange
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn publish(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        message: Message,
    ) -> Result<(), Fail> {
        if !self.entities.exchanges.contains_key(&message.exchange) {
            self.stats.publishes_to_missing_exchange += 1;
        }
        if self.chans.get(&chan_id).is_some_and(|c| !c.confirm) {
            self.stats.publishes_outside_confirm_mode += 1;
        }
        self.check_publish(&message)?;
        let user = self
            .conns
            .get(&conn_id)
            .map(|c| c.user.clone())
            .unwrap_or_default();
        if let Some(claimed) = &message.properties.user_id
            && *claimed != user
        {
            return Err(channel_fail(
                reply_code::PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - user_id property set to '{claimed}' but \
                         authenticated user was '{user}'"
                ),
            ));
        }
        let seq = match self.chans.get_mut(&chan_id) {
            Some(chan) if chan.confirm => {
                let seq = chan.next_publish_seq;
                chan.next_publish_seq += 1;
                Some(seq)
            }
            _ => None,
        };
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.stats.published += 1;
        }
        let mode = self.confirm_mode;
        if mode == ConfirmMode::Nack {
            // The broker refuses the message (as with reject-publish overflow).
            self.stats.published += 1;
            self.stats.nacked_publishes += 1;
            if let Some(seq) = seq {
                self.stats.confirms_nacked += 1;
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.stats.confirms_nacked += 1;
                }
                self.send_down(
                    conn_id,
                    Down::chan(
                        chan_id,
                        ChannelEvent::Nack {
                            delivery_tag: seq,
                            multiple: false,
                        },
                    ),
                );
            }
            return Ok(());
        }
        let routed = self.enqueue(&message);
        if routed == 0 && message.mandatory {
            self.stats.returned += 1;
            if let Some(conn) = self.conns.get_mut(&conn_id) {
                conn.stats.returned += 1;
            }
            self.send_down(
                conn_id,
                Down::chan(
                    chan_id,
                    ChannelEvent::Return(Box::new(Returned {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".to_owned(),
                        exchange: message.exchange.clone(),
                        routing_key: message.routing_key.clone(),
                        properties: message.properties.clone(),
                        payload: message.payload.clone(),
                    })),
                ),
            );
        }
        let Some(seq) = seq else {
            return Ok(());
        };
        let ack = ChannelEvent::Ack {
            delivery_tag: seq,
            multiple: false,
        };
        match mode {
            ConfirmMode::Drop => {
                self.stats.confirms_dropped += 1;
                if let Some(conn) = self.conns.get_mut(&conn_id) {
                    conn.stats.confirms_dropped += 1;
                }
            }
            ConfirmMode::Delay(delay) => {
                self.count_ack(conn_id);
                let at = self.now() + delay;
                self.schedule(
                    at,
                    Action::DelayedConfirm {
                        conn: conn_id,
                        chan: chan_id,
                        delivery_tag: seq,
                    },
                );
            }
            ConfirmMode::Normal | ConfirmMode::Nack => {
                self.count_ack(conn_id);
                self.send_down(conn_id, Down::chan(chan_id, ack));
            }
        }
        Ok(())
    }

    pub(super) fn count_ack(&mut self, conn_id: u64) {
        self.stats.confirms_acked += 1;
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.stats.confirms_acked += 1;
        }
    }

    /// Publishes from outside any connection (like the management UI). Returns how
    /// many queues took the message.
    pub(crate) fn inject(&mut self, message: &Message) -> Result<usize, TransportError> {
        match self.check_publish(message) {
            Ok(()) => {}
            Err(Fail::Channel(err) | Fail::Connection(err)) => return Err(err),
        }
        let routed = self.enqueue(message);
        self.dispatch();
        Ok(routed)
    }
}
