//! Connections and channels as the broker sees them: dials, opening, and the two
//! halves of a close (broker side, then client side).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::transport::{ChannelEvent, ConnectOptions, ConnectionEvent};
use futures::channel::mpsc;

use super::{Down, HostCheck, Request, State, Unacked};

/// A connection's identity in the simulated broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimConnectionId(pub u64);

impl fmt::Display for SimConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Counters of one connection, as the broker saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Channels opened.
    pub channels_opened: u64,
    /// Messages published (that reached the broker).
    pub published: u64,
    /// Publisher confirms sent as acks (or due, when delayed).
    pub confirms_acked: u64,
    /// Publisher confirms sent as nacks.
    pub confirms_nacked: u64,
    /// Publisher confirms withheld by [`ConfirmMode::Drop`](super::ConfirmMode::Drop).
    pub confirms_dropped: u64,
    /// Mandatory messages returned.
    pub returned: u64,
    /// Deliveries sent.
    pub delivered: u64,
    /// Deliveries acked by the client.
    pub acked: u64,
    /// Deliveries nacked or rejected by the client.
    pub rejected: u64,
    /// ack / nack / reject with a delivery tag the channel did not know (each one
    /// closed a channel with 406). Zero in a good run.
    pub unknown_tag_acks: u64,
}

pub(super) struct Chan {
    pub(super) conn: u64,
    pub(super) number: u16,
    pub(super) broker_open: bool,
    pub(super) close_reason: Option<TransportError>,
    pub(super) client_closed: Option<TransportError>,
    pub(super) events: Option<mpsc::UnboundedSender<ChannelEvent>>,
    pub(super) confirm: bool,
    pub(super) next_publish_seq: u64,
    pub(super) prefetch: u16,
    pub(super) next_delivery_tag: u64,
    pub(super) unacked: BTreeMap<u64, Unacked>,
    pub(super) consumers: BTreeSet<String>,
}

pub(super) struct Conn {
    pub(super) host: String,
    pub(super) user: String,
    pub(super) name: Option<String>,
    pub(super) heartbeat: Option<Duration>,
    pub(super) latency: Duration,
    pub(super) broker_open: bool,
    pub(super) close_reason: Option<TransportError>,
    pub(super) client_closed: Option<TransportError>,
    pub(super) events: Option<mpsc::UnboundedSender<ConnectionEvent>>,
    pub(super) up: VecDeque<(Instant, Request)>,
    pub(super) down: VecDeque<(Instant, Down)>,
    pub(super) up_tail: Instant,
    pub(super) down_tail: Instant,
    /// Broker-open channels: number -> key.
    pub(super) channels: BTreeMap<u16, u64>,
    /// Every channel ever opened on it, in order (the client may not know yet
    /// that some are closed).
    pub(super) all_channels: Vec<u64>,
    pub(super) blocked: Option<String>,
    pub(super) told_blocked: bool,
    pub(super) stats: ConnectionStats,
}

/// The result of checking a dial against the broker's and the host's state.
pub(crate) enum DialCheck {
    /// A blackholed host: the dial never completes.
    Hang,
    Refused,
    Auth,
    Accept,
}

impl State {
    pub(crate) fn dial_check(&mut self, host: &str, endpoint: &Endpoint) -> DialCheck {
        match self.hosts.check_dial(host, self.now()) {
            HostCheck::Unknown => return DialCheck::Refused,
            HostCheck::Blackholed => return DialCheck::Hang,
            HostCheck::Refusing => {
                self.stats.dials_refused += 1;
                self.log(|| format!("dial {host}: refused"));
                return DialCheck::Refused;
            }
            HostCheck::Open => {}
        }
        if endpoint.username() != self.config.username
            || endpoint.password() != self.config.password
        {
            self.stats.dials_refused += 1;
            self.log(|| format!("dial {host}: bad credentials"));
            return DialCheck::Auth;
        }
        DialCheck::Accept
    }

    pub(crate) fn open_connection(
        &mut self,
        host: &str,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> (u64, mpsc::UnboundedReceiver<ConnectionEvent>) {
        let id = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::unbounded();
        let heartbeat = match endpoint.heartbeat() {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(u64::from(secs))),
            None => Some(self.config.default_heartbeat).filter(|d| !d.is_zero()),
        };
        let now = self.now();
        self.conns.insert(
            id,
            Conn {
                host: host.to_owned(),
                user: endpoint.username().to_owned(),
                name: options.connection_name.clone(),
                heartbeat,
                latency: self.config.latency,
                broker_open: true,
                close_reason: None,
                client_closed: None,
                events: Some(tx),
                up: VecDeque::new(),
                down: VecDeque::new(),
                up_tail: now,
                down_tail: now,
                channels: BTreeMap::new(),
                all_channels: Vec::new(),
                blocked: None,
                told_blocked: false,
                stats: ConnectionStats::default(),
            },
        );
        self.stats.connections_opened += 1;
        self.log(|| format!("{} open on {host}", SimConnectionId(id)));
        self.update_blocked(id);
        (id, rx)
    }

    /// Tells the client its connection is gone: `Closed` on the connection and on
    /// every channel it still thinks open, and every pending call fails with `err`.
    pub(crate) fn notify_client_closed(&mut self, conn_id: u64, err: TransportError) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.client_closed.is_some() {
            return;
        }
        conn.client_closed = Some(err.clone());
        let up = std::mem::take(&mut conn.up);
        let down = std::mem::take(&mut conn.down);
        for (_, request) in up {
            if let Some(tx) = request.reply {
                let _ = tx.send(Err(err.clone()));
            }
        }
        for (_, item) in down {
            if let Down::Reply(tx, _) = item {
                let _ = tx.send(Err(err.clone()));
            }
        }
        if let Some(tx) = conn.events.take() {
            let _ = tx.unbounded_send(ConnectionEvent::Closed(err.clone()));
        }
        let chans = std::mem::take(&mut conn.all_channels);
        for key in chans {
            let Some(chan) = self.chans.get_mut(&key) else {
                continue;
            };
            if chan.client_closed.is_none() {
                chan.client_closed = Some(err.clone());
                if let Some(tx) = chan.events.take() {
                    let _ = tx.unbounded_send(ChannelEvent::Closed(err.clone()));
                }
            }
        }
        self.log(|| format!("{} closed for the client: {err}", SimConnectionId(conn_id)));
    }

    /// Closes a connection on the broker side: its channels close (unacked messages
    /// are requeued, consumers go), its exclusive queues are deleted.
    pub(crate) fn close_conn_broker(&mut self, conn_id: u64, err: TransportError) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.broker_open {
            return;
        }
        conn.broker_open = false;
        conn.close_reason = Some(err.clone());
        let chans: Vec<u64> = conn.channels.values().copied().collect();
        for chan in chans {
            self.close_chan_broker(chan, err.clone());
        }
        let owned: Vec<String> = self
            .entities
            .queues
            .iter()
            .filter(|(_, q)| q.owner == Some(conn_id))
            .map(|(name, _)| name.clone())
            .collect();
        let cause = self.drop_cause();
        for name in owned {
            self.delete_queue_internal(&name, cause);
        }
        self.log(|| format!("{} closed by the broker: {err}", SimConnectionId(conn_id)));
    }

    /// Closes a channel on the broker side: unacked messages go back to their queues
    /// (redelivered), its consumers are removed.
    pub(super) fn close_chan_broker(&mut self, chan_id: u64, err: TransportError) {
        let Some(chan) = self.chans.get_mut(&chan_id) else {
            return;
        };
        if !chan.broker_open {
            return;
        }
        chan.broker_open = false;
        chan.close_reason = Some(err);
        let unacked = std::mem::take(&mut chan.unacked);
        let tags: Vec<String> = std::mem::take(&mut chan.consumers).into_iter().collect();
        let (conn_id, number) = (chan.conn, chan.number);
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.channels.remove(&number);
        }
        // Consumers go before the requeue so the messages are not handed straight
        // back to this channel.
        for tag in tags {
            self.remove_consumer(chan_id, &tag, false);
        }
        self.requeue(unacked.into_values().collect());
    }
}
