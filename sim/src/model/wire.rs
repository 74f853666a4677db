//! The wire: frames between a client and the broker, and what each method does.
//!
//! Every connection has two FIFO queues, stamped with the virtual time each item is
//! due at the other end: `up` (client to broker: requests) and `down` (broker to
//! client: replies, deliveries, confirms, returns, cancels, closes). An item is due
//! one latency after it was sent, and never before the item ahead of it, so each
//! direction keeps its order like a TCP stream. A clock action per item flushes the
//! queue when it falls due. While the connection's host is partitioned both queues
//! stall; when it heals they drain. A publish at the head of `up` stalls while the
//! connection is blocked (RabbitMQ stops reading from a blocked publisher's socket).
//!
//! A connection is closed on the broker side ([`State::close_conn_broker`]: channels
//! closed, unacked messages requeued, exclusive queues deleted) possibly before the
//! client learns of it ([`State::notify_client_closed`]: the `Closed` events, pending
//! calls fail, both queues dropped). A kill does both at once; a broker close queues
//! its `Closed` behind the frames already in flight; a partition tells the client only
//! at the heartbeat timeout.

use std::collections::{BTreeMap, BTreeSet};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::topology::{ConsumeOptions, TopologyOp};
use amqp_rebound_core::transport::{ChannelEvent, ConnectionEvent, TopologyOutcome};
use futures::channel::{mpsc, oneshot};

use super::{Action, Chan, Fail, Settle, State, reply, reply_code_command_invalid};

/// A request from a client, as it travels up the wire.
pub(crate) struct Request {
    pub(crate) chan: Option<u64>,
    pub(crate) op: Op,
    pub(crate) reply: Option<ReplyTx>,
}

/// Where a call's answer goes.
pub(crate) type ReplyTx = oneshot::Sender<Result<Reply, TransportError>>;

/// One AMQP method from the client.
pub(crate) enum Op {
    OpenChannel,
    CloseConnection,
    CloseChannel,
    ConfirmSelect,
    Qos(u16),
    /// A declare, delete, bind or unbind.
    Topology(Box<TopologyOp>),
    Publish(Box<Message>),
    Consume {
        queue: String,
        consumer_tag: String,
        options: Box<ConsumeOptions>,
    },
    Cancel(String),
    Ack {
        delivery_tag: u64,
        multiple: bool,
    },
    Nack {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        delivery_tag: u64,
        requeue: bool,
    },
}

/// A successful answer to a call.
pub(crate) enum Reply {
    Done,
    Channel {
        key: u64,
        number: u16,
        events: mpsc::UnboundedReceiver<ChannelEvent>,
    },
    Topology(TopologyOutcome),
}

/// One item travelling down the wire.
pub(super) enum Down {
    Reply(ReplyTx, Result<Reply, TransportError>),
    Conn(ConnectionEvent),
    Chan(u64, Box<ChannelEvent>),
}

impl Down {
    pub(super) fn chan(chan: u64, event: ChannelEvent) -> Down {
        Down::Chan(chan, Box::new(event))
    }
}

impl State {
    // ---- the wire --------------------------------------------------------------

    /// Queues a request from the client. Fails at once if the client already knows
    /// its connection or channel is closed.
    pub(crate) fn send_up(&mut self, conn_id: u64, request: Request) -> Result<(), TransportError> {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return Err(TransportError::Io("no such connection".into()));
        };
        if let Some(err) = &conn.client_closed {
            return Err(err.clone());
        }
        if let Some(chan) = request.chan.and_then(|c| self.chans.get(&c))
            && let Some(err) = &chan.client_closed
        {
            return Err(err.clone());
        }
        let due = (now + conn.latency).max(conn.up_tail);
        conn.up_tail = due;
        conn.up.push_back((due, request));
        self.schedule(due, Action::FlushUp(conn_id));
        Ok(())
    }

    pub(super) fn send_down(&mut self, conn_id: u64, item: Down) {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.client_closed.is_some() {
            if let Down::Reply(tx, _) = item {
                let err = conn
                    .client_closed
                    .clone()
                    .unwrap_or(TransportError::ClosedByClient);
                let _ = tx.send(Err(err));
            }
            return;
        }
        let due = (now + conn.latency).max(conn.down_tail);
        conn.down_tail = due;
        conn.down.push_back((due, item));
        self.schedule(due, Action::FlushDown(conn_id));
    }

    pub(super) fn partitioned(&self, conn_id: u64) -> bool {
        self.conns
            .get(&conn_id)
            .is_some_and(|c| self.hosts.is_partitioned(&c.host))
    }

    pub(super) fn blocked(&self, conn_id: u64) -> Option<String> {
        let conn = self.conns.get(&conn_id)?;
        conn.blocked.clone().or_else(|| self.alarm.clone())
    }

    pub(super) fn flush_up(&mut self, conn_id: u64) {
        loop {
            let now = self.now();
            if self.partitioned(conn_id) {
                return;
            }
            let blocked = self.blocked(conn_id).is_some();
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                return;
            };
            if !conn.broker_open {
                return;
            }
            match conn.up.front() {
                Some((due, _)) if *due <= now => {}
                _ => return,
            }
            if blocked
                && matches!(
                    conn.up.front(),
                    Some((
                        _,
                        Request {
                            op: Op::Publish(_),
                            ..
                        }
                    ))
                )
            {
                return;
            }
            let Some((_, request)) = conn.up.pop_front() else {
                return;
            };
            self.process(conn_id, request);
            self.dispatch();
        }
    }

    pub(super) fn flush_down(&mut self, conn_id: u64) {
        loop {
            let now = self.now();
            if self.partitioned(conn_id) {
                return;
            }
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                return;
            };
            if conn.client_closed.is_some() {
                return;
            }
            match conn.down.front() {
                Some((due, _)) if *due <= now => {}
                _ => return,
            }
            let Some((_, item)) = conn.down.pop_front() else {
                return;
            };
            match item {
                Down::Reply(tx, result) => {
                    let _ = tx.send(result);
                }
                Down::Conn(ConnectionEvent::Closed(err)) => {
                    self.notify_client_closed(conn_id, err);
                    return;
                }
                Down::Conn(event) => {
                    if let Some(tx) = &conn.events {
                        let _ = tx.unbounded_send(event);
                    }
                }
                Down::Chan(chan_id, event) => {
                    let event = *event;
                    let Some(chan) = self.chans.get_mut(&chan_id) else {
                        continue;
                    };
                    if chan.client_closed.is_some() {
                        continue;
                    }
                    if let ChannelEvent::Closed(err) = &event {
                        chan.client_closed = Some(err.clone());
                    }
                    let closing = matches!(event, ChannelEvent::Closed(_));
                    if let Some(tx) = &chan.events {
                        let _ = tx.unbounded_send(event);
                    }
                    if closing {
                        chan.events = None;
                    }
                }
            }
        }
    }

    // ---- processing ------------------------------------------------------------

    pub(super) fn process(&mut self, conn_id: u64, request: Request) {
        let Request { chan, op, reply } = request;
        if let Some(chan_id) = chan {
            let closed = self
                .chans
                .get(&chan_id)
                .filter(|c| !c.broker_open)
                .map(|c| {
                    c.close_reason
                        .clone()
                        .unwrap_or(TransportError::ClosedByClient)
                });
            if let Some(err) = closed {
                // AMQP: after channel.close the broker discards the channel's frames.
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Err(err)));
                }
                return;
            }
        }
        match (chan, op) {
            (None, Op::CloseConnection) => {
                self.close_conn_broker(conn_id, TransportError::ClosedByClient);
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Ok(Reply::Done)));
                }
                self.send_down(
                    conn_id,
                    Down::Conn(ConnectionEvent::Closed(TransportError::ClosedByClient)),
                );
            }
            (Some(chan_id), Op::CloseChannel) => {
                self.close_chan_broker(chan_id, TransportError::ClosedByClient);
                if let Some(tx) = reply {
                    self.send_down(conn_id, Down::Reply(tx, Ok(Reply::Done)));
                }
                self.send_down(
                    conn_id,
                    Down::chan(
                        chan_id,
                        ChannelEvent::Closed(TransportError::ClosedByClient),
                    ),
                );
            }
            (chan, op) => {
                let result = match chan {
                    None => self.apply_connection(conn_id, op),
                    Some(chan_id) => self.apply_channel(conn_id, chan_id, op),
                };
                match result {
                    Ok(value) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Ok(value)));
                        }
                    }
                    Err(Fail::Channel(err)) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Err(err.clone())));
                        }
                        if let Some(chan_id) = chan {
                            self.log(|| format!("channel {chan_id} closed by the broker: {err}"));
                            self.close_chan_broker(chan_id, err.clone());
                            self.send_down(conn_id, Down::chan(chan_id, ChannelEvent::Closed(err)));
                        }
                    }
                    Err(Fail::Connection(err)) => {
                        if let Some(tx) = reply {
                            self.send_down(conn_id, Down::Reply(tx, Err(err.clone())));
                        }
                        self.close_conn_broker(conn_id, err.clone());
                        self.send_down(conn_id, Down::Conn(ConnectionEvent::Closed(err)));
                    }
                }
            }
        }
    }

    pub(super) fn apply_connection(&mut self, conn_id: u64, op: Op) -> Result<Reply, Fail> {
        match op {
            Op::OpenChannel => {
                let max = self.config.channel_max;
                let Some(conn) = self.conns.get_mut(&conn_id) else {
                    return Err(Fail::Connection(TransportError::Io("no connection".into())));
                };
                let Some(number) = (1..=max).find(|n| !conn.channels.contains_key(n)) else {
                    return Err(Fail::Connection(reply(
                        reply_code::NOT_ALLOWED,
                        format!(
                            "NOT_ALLOWED - number of channels opened ({max}) has reached the \
                             negotiated channel_max ({max})"
                        ),
                    )));
                };
                let key = self.next_chan;
                self.next_chan += 1;
                conn.channels.insert(number, key);
                conn.all_channels.push(key);
                conn.stats.channels_opened += 1;
                let (tx, rx) = mpsc::unbounded();
                self.chans.insert(
                    key,
                    Chan {
                        conn: conn_id,
                        number,
                        broker_open: true,
                        close_reason: None,
                        client_closed: None,
                        events: Some(tx),
                        confirm: false,
                        next_publish_seq: 1,
                        prefetch: 0,
                        next_delivery_tag: 1,
                        unacked: BTreeMap::new(),
                        consumers: BTreeSet::new(),
                    },
                );
                Ok(Reply::Channel {
                    key,
                    number,
                    events: rx,
                })
            }
            _ => Err(Fail::Connection(reply(
                reply_code_command_invalid(),
                "COMMAND_INVALID - channel method on channel 0",
            ))),
        }
    }

    pub(super) fn apply_channel(
        &mut self,
        conn_id: u64,
        chan_id: u64,
        op: Op,
    ) -> Result<Reply, Fail> {
        match op {
            Op::ConfirmSelect => {
                if let Some(chan) = self.chans.get_mut(&chan_id) {
                    chan.confirm = true;
                }
                Ok(Reply::Done)
            }
            Op::Qos(prefetch) => {
                if let Some(chan) = self.chans.get_mut(&chan_id) {
                    chan.prefetch = prefetch;
                }
                Ok(Reply::Done)
            }
            Op::Topology(op) => self.run_topology(conn_id, *op).map(Reply::Topology),
            Op::Publish(message) => self
                .publish(conn_id, chan_id, *message)
                .map(|()| Reply::Done),
            Op::Consume {
                queue,
                consumer_tag,
                options,
            } => self
                .consume(conn_id, chan_id, queue, consumer_tag, &options)
                .map(|()| Reply::Done),
            Op::Cancel(tag) => {
                let exists = self.consumers.contains_key(&(chan_id, tag.clone()));
                if exists {
                    self.remove_consumer(chan_id, &tag, false);
                }
                Ok(Reply::Done)
            }
            Op::Ack {
                delivery_tag,
                multiple,
            } => self
                .settle(conn_id, chan_id, delivery_tag, multiple, Settle::Ack)
                .map(|()| Reply::Done),
            Op::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => self
                .settle(
                    conn_id,
                    chan_id,
                    delivery_tag,
                    multiple,
                    Settle::Reject { requeue },
                )
                .map(|()| Reply::Done),
            Op::Reject {
                delivery_tag,
                requeue,
            } => self
                .settle(
                    conn_id,
                    chan_id,
                    delivery_tag,
                    false,
                    Settle::Reject { requeue },
                )
                .map(|()| Reply::Done),
            Op::OpenChannel | Op::CloseConnection | Op::CloseChannel => {
                Err(Fail::Connection(reply(
                    reply_code_command_invalid(),
                    "COMMAND_INVALID - unexpected method",
                )))
            }
        }
    }
}
