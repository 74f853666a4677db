//! Consumers: registration, round-robin dispatch under prefetch, and settling
//! deliveries (ack, nack, reject, requeue).

use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::message::Delivery;
use amqp_rebound_core::topology::ConsumeOptions;
use amqp_rebound_core::transport::ChannelEvent;

use super::{
    Down, DropCause, Fail, State, StoredMessage, channel_fail, locked, not_found_queue,
    random_suffix, reply,
};

pub(super) struct Consumer {
    pub(super) queue: String,
    pub(super) queue_id: u64,
    pub(super) no_ack: bool,
    pub(super) exclusive: bool,
    pub(super) prefetch: u16,
    pub(super) unacked: u32,
}

pub(super) struct Unacked {
    pub(super) queue: String,
    pub(super) queue_id: u64,
    pub(super) consumer_tag: String,
    pub(super) message: StoredMessage,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    Ack,
    Reject { requeue: bool },
}

impl State {
    /// Puts unacked messages back at the head of their queues, in delivery order.
    pub(super) fn requeue(&mut self, entries: Vec<Unacked>) {
        for entry in entries.into_iter().rev() {
            match self.entities.queues.get_mut(&entry.queue) {
                Some(q) if q.id == entry.queue_id => {
                    let mut message = entry.message;
                    message.redelivered = true;
                    q.ready.push_front(message);
                    self.stats.requeued += 1;
                    self.dirty.insert(entry.queue);
                }
                _ => {
                    self.ledger.dropped(entry.message.id, 1);
                    match self.drop_cause() {
                        DropCause::Delete => self.stats.dropped_by_delete += 1,
                        DropCause::Restart => self.stats.dropped_by_restart += 1,
                    }
                }
            }
        }
    }

    // ---- consuming -------------------------------------------------------------

    pub(super) fn consume(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        queue: String,
        consumer_tag: String,
        options: &ConsumeOptions,
    ) -> Result<(), Fail> {
        let Some(q) = self.entities.queues.get(&queue) else {
            return Err(not_found_queue(&queue));
        };
        if q.owner.is_some_and(|o| o != conn_id) {
            return Err(locked(&queue));
        }
        let in_exclusive_use = q
            .consumers
            .iter()
            .any(|key| self.consumers.get(key).is_some_and(|c| c.exclusive));
        if in_exclusive_use || (options.exclusive && !q.consumers.is_empty()) {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use"),
            ));
        }
        let queue_id = q.id;
        let tag = if consumer_tag.is_empty() {
            format!("amq.ctag-{}", random_suffix(&mut self.rng))
        } else {
            consumer_tag
        };
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return Err(not_found_queue(&queue));
        };
        if chan.consumers.contains(&tag) {
            return Err(Fail::Connection(reply(
                reply_code::NOT_ALLOWED,
                format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
            )));
        }
        if let Some(prefetch) = options.prefetch {
            // What an adapter does: basic.qos, then basic.consume.
            chan.prefetch = prefetch;
        }
        let prefetch = chan.prefetch;
        chan.consumers.insert(tag.clone());
        self.consumers.insert(
            (chan_id, tag.clone()),
            Consumer {
                queue: queue.clone(),
                queue_id,
                no_ack: options.no_ack,
                exclusive: options.exclusive,
                prefetch,
                unacked: 0,
            },
        );
        if let Some(q) = self.entities.queues.get_mut(&queue) {
            q.consumers.push((chan_id, tag));
            q.had_consumer = true;
        }
        self.dirty.insert(queue);
        Ok(())
    }

    /// Removes a consumer; with `notify`, its channel gets a `basic.cancel`. An
    /// auto-delete queue that loses its last consumer is deleted.
    pub(crate) fn remove_consumer(&mut self, chan_id: u64, tag: &str, notify: bool) {
        let Some(consumer) = self.consumers.remove(&(chan_id, tag.to_owned())) else {
            return;
        };
        let mut conn = None;
        if let Some(chan) = self.chans.get_mut(&chan_id) {
            chan.consumers.remove(tag);
            conn = Some(chan.conn);
        }
        if notify && let Some(conn) = conn {
            self.send_down(
                conn,
                Down::chan(
                    chan_id,
                    ChannelEvent::ConsumerCancelled {
                        consumer_tag: tag.to_owned(),
                    },
                ),
            );
        }
        let mut delete = false;
        if let Some(q) = self.entities.queues.get_mut(&consumer.queue)
            && q.id == consumer.queue_id
        {
            q.consumers.retain(|(c, t)| !(*c == chan_id && t == tag));
            if q.next_consumer >= q.consumers.len() {
                q.next_consumer = 0;
            }
            delete = q.auto_delete && q.consumers.is_empty() && q.had_consumer;
        }
        if delete {
            let cause = self.drop_cause();
            self.delete_queue_internal(&consumer.queue, cause);
        }
    }

    /// Broker-initiated cancel of every consumer with this tag.
    pub(crate) fn cancel_consumers_tagged(&mut self, tag: &str) -> usize {
        let keys: Vec<u64> = self
            .consumers
            .keys()
            .filter(|(_, t)| t == tag)
            .map(|(c, _)| *c)
            .collect();
        for chan in &keys {
            self.remove_consumer(*chan, tag, true);
        }
        keys.len()
    }

    pub(super) fn settle(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        delivery_tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), Fail> {
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return Ok(());
        };
        let tags: Vec<u64> = if multiple && delivery_tag == 0 {
            chan.unacked.keys().copied().collect()
        } else if !chan.unacked.contains_key(&delivery_tag) {
            self.stats.unknown_tag_acks += 1;
            if let Some(conn) = self.conns.get_mut(&conn_id) {
                conn.stats.unknown_tag_acks += 1;
            }
            return Err(channel_fail(
                reply_code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"),
            ));
        } else if multiple {
            chan.unacked
                .range(..=delivery_tag)
                .map(|(t, _)| *t)
                .collect()
        } else {
            vec![delivery_tag]
        };
        let entries: Vec<Unacked> = tags.iter().filter_map(|t| chan.unacked.remove(t)).collect();
        let count = entries.len() as u64;
        for entry in &entries {
            if let Some(c) = self
                .consumers
                .get_mut(&(chan_id, entry.consumer_tag.clone()))
            {
                c.unacked = c.unacked.saturating_sub(1);
                self.dirty.insert(c.queue.clone());
            }
        }
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            match how {
                Settle::Ack => conn.stats.acked += count,
                Settle::Reject { .. } => conn.stats.rejected += count,
            }
        }
        for entry in &entries {
            match how {
                Settle::Ack => self.ledger.acked(entry.message.id),
                Settle::Reject { requeue: false } => self.ledger.discarded(entry.message.id),
                Settle::Reject { requeue: true } => {}
            }
        }
        match how {
            Settle::Ack => self.stats.acked += count,
            Settle::Reject { requeue: true } => self.requeue(entries),
            Settle::Reject { requeue: false } => self.stats.discarded += count,
        }
        Ok(())
    }

    /// Hands ready messages to consumers with room, round-robin per queue.
    pub(super) fn dispatch(&mut self) {
        while let Some(name) = self.dirty.pop_first() {
            while let Some(q) = self.entities.queues.get_mut(&name) {
                if q.ready.is_empty() || q.consumers.is_empty() {
                    break;
                }
                let n = q.consumers.len();
                let start = q.next_consumer % n;
                let pick = (0..n).map(|i| (start + i) % n).find(|&i| {
                    self.consumers.get(&q.consumers[i]).is_some_and(|c| {
                        c.no_ack || c.prefetch == 0 || c.unacked < u32::from(c.prefetch)
                    })
                });
                let Some(i) = pick else {
                    break;
                };
                q.next_consumer = (i + 1) % n;
                let key = q.consumers[i].clone();
                let Some(message) = q.ready.pop_front() else {
                    break;
                };
                self.deliver(&key, &name, message);
            }
        }
    }

    pub(super) fn deliver(&mut self, key: &(u64, String), queue: &str, message: StoredMessage) {
        let (chan_id, tag) = key;
        let Some(consumer) = self.consumers.get_mut(key) else {
            return;
        };
        let Some(chan) = self.chans.get_mut(chan_id) else {
            return;
        };
        let delivery_tag = chan.next_delivery_tag;
        chan.next_delivery_tag += 1;
        let delivery = Delivery {
            consumer_tag: tag.clone(),
            delivery_tag,
            redelivered: message.redelivered,
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            properties: message.properties.clone(),
            payload: message.payload.clone(),
        };
        self.stats.delivered += 1;
        if message.redelivered {
            self.stats.redelivered += 1;
        }
        if consumer.no_ack {
            self.stats.acked += 1;
            self.ledger.acked(message.id);
        } else {
            consumer.unacked += 1;
            chan.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue.to_owned(),
                    queue_id: consumer.queue_id,
                    consumer_tag: tag.clone(),
                    message,
                },
            );
        }
        let conn = chan.conn;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.stats.delivered += 1;
        }
        self.send_down(
            conn,
            Down::chan(*chan_id, ChannelEvent::Delivery(Box::new(delivery))),
        );
    }
}
