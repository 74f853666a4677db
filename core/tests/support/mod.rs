//! An in-memory transport that answers at once, and a manual clock, for driving
//! the real Driver without a broker and without a runtime.
//!
//! The broker model is minimal on purpose (the simulator crate has the full
//! one): queues by name on the default exchange, confirms for every publish,
//! deliveries to consumers, and fault switches (refuse dials, kill connections,
//! close a channel, block).

#![allow(dead_code)] // each test binary uses a different part

pub mod capture;
pub mod scenario;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, QueueInfo, Sleep, Timer,
    TopologyOutcome, Transport,
};
use amqp_rebound_core::{ConsumeOptions, Delivery, Endpoint, Message, TopologyOp, TransportError};
use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::BoxStream;

// ----- the clock -----

#[derive(Default)]
struct ClockInner {
    now: Option<Instant>,
    sleepers: Vec<(Instant, Waker)>,
}

/// A clock that moves only when the test says so.
#[derive(Clone)]
pub struct ManualClock(Arc<Mutex<ClockInner>>);

impl ManualClock {
    pub fn new() -> Self {
        #[allow(clippy::disallowed_methods)] // the test owns the clock
        let start = Instant::now();
        ManualClock(Arc::new(Mutex::new(ClockInner {
            now: Some(start),
            sleepers: Vec::new(),
        })))
    }

    pub fn advance(&self, d: Duration) {
        let mut inner = self.0.lock().unwrap();
        let now = inner.now.unwrap() + d;
        inner.now = Some(now);
        let (due, rest): (Vec<_>, Vec<_>) =
            inner.sleepers.drain(..).partition(|(at, _)| *at <= now);
        inner.sleepers = rest;
        drop(inner);
        for (_, w) in due {
            w.wake();
        }
    }

    /// The earliest armed sleep, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .sleepers
            .iter()
            .map(|(at, _)| *at)
            .min()
    }

    pub fn advance_to_next(&self) -> bool {
        let Some(at) = self.next_deadline() else {
            return false;
        };
        let now = self.now();
        self.advance(at.saturating_duration_since(now));
        true
    }
}

struct ManualSleep {
    clock: ManualClock,
    at: Instant,
}

impl Future for ManualSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.clock.0.lock().unwrap();
        if inner.now.unwrap() >= self.at {
            return Poll::Ready(());
        }
        inner.sleepers.push((self.at, cx.waker().clone()));
        Poll::Pending
    }
}

impl Timer for ManualClock {
    fn now(&self) -> Instant {
        self.0.lock().unwrap().now.unwrap()
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(ManualSleep {
            clock: self.clone(),
            at: deadline,
        })
    }
}

// ----- the broker -----

#[derive(Default)]
pub struct Broker {
    /// Dials fail while set.
    pub refuse: Option<TransportError>,
    pub dials: usize,
    next_conn: u64,
    conns: BTreeMap<u64, mpsc::UnboundedSender<ConnectionEvent>>,
    chans: BTreeMap<(u64, u64), ChanState>,
    next_chan: u64,
    /// Messages per queue.
    pub queues: BTreeMap<String, VecDeque<Message>>,
    /// Every payload published, in arrival order.
    pub received: Vec<String>,
    /// Publish calls fail with this (once) — simulates a broken channel.
    pub fail_next_publish: Option<TransportError>,
    /// Do not confirm publishes (they stay pending).
    pub hold_confirms: bool,
    /// The channel_max connections report (`None`: no limit).
    pub channel_max: Option<u16>,
    /// Channels opened beyond `channel_max` (a real client would panic or fail).
    pub over_channel_max: usize,
    held: Vec<(u64, u64, u64)>,
    server_named: u64,
    /// The next this many dials hang until [`MemoryTransport::release_dials`]
    /// (a broker that accepts TCP and says nothing).
    pub hang_dials: usize,
    hung: Vec<Waker>,
    released: bool,
    /// Acks (and nacks, rejects) wait until [`MemoryTransport::release_acks`].
    pub hold_acks: bool,
    held_acks: Vec<Waker>,
    /// Acks written, channel and connection closes, in the order they happened.
    pub log: Vec<String>,
}

struct ChanState {
    events: mpsc::UnboundedSender<ChannelEvent>,
    seq: u64,
    delivery_tag: u64,
    consumers: Vec<(String, String)>,
}

#[derive(Clone, Default)]
pub struct MemoryTransport(pub Arc<Mutex<Broker>>);

impl MemoryTransport {
    pub fn broker(&self) -> std::sync::MutexGuard<'_, Broker> {
        self.0.lock().unwrap()
    }

    /// Dials hanging since [`Broker::hang_dials`] complete now.
    pub fn release_dials(&self) {
        let mut b = self.broker();
        b.released = true;
        for w in b.hung.drain(..) {
            w.wake();
        }
    }

    /// The broker drops every connection (as `close_all_connections`).
    pub fn kill_all(&self) {
        let mut b = self.broker();
        let error = TransportError::Reply {
            code: 320,
            text: "CONNECTION_FORCED".into(),
        };
        for (_, chan) in std::mem::take(&mut b.chans) {
            let _ = chan
                .events
                .unbounded_send(ChannelEvent::Closed(error.clone()));
        }
        for (_, conn) in std::mem::take(&mut b.conns) {
            let _ = conn.unbounded_send(ConnectionEvent::Closed(error.clone()));
        }
    }

    /// The broker closes one channel (the `n`-th open one) with a reply code.
    pub fn close_channel(&self, n: usize, code: u16) {
        self.close_channel_with(n, code, "channel error");
    }

    /// As [`close_channel`](Self::close_channel), with the reply's text.
    pub fn close_channel_with(&self, n: usize, code: u16, text: &str) {
        let mut b = self.broker();
        if let Some(key) = b.chans.keys().nth(n).copied()
            && let Some(chan) = b.chans.remove(&key)
        {
            let _ = chan
                .events
                .unbounded_send(ChannelEvent::Closed(TransportError::Reply {
                    code,
                    text: text.into(),
                }));
        }
    }

    /// The broker cancels consumer `tag` (its queue was deleted, say): a
    /// basic.cancel on the channel it lives on.
    pub fn cancel_consumer(&self, tag: &str) {
        let mut b = self.broker();
        for chan in b.chans.values_mut() {
            let before = chan.consumers.len();
            chan.consumers.retain(|(_, t)| t != tag);
            if chan.consumers.len() != before {
                let _ = chan.events.unbounded_send(ChannelEvent::ConsumerCancelled {
                    consumer_tag: tag.to_string(),
                });
            }
        }
    }

    pub fn block_all(&self, blocked: bool) {
        let b = self.broker();
        for conn in b.conns.values() {
            let _ = conn.unbounded_send(if blocked {
                ConnectionEvent::Blocked("low on memory".into())
            } else {
                ConnectionEvent::Unblocked
            });
        }
    }

    /// Acks held since [`Broker::hold_acks`] complete now.
    pub fn release_acks(&self) {
        let mut b = self.broker();
        b.hold_acks = false;
        for w in b.held_acks.drain(..) {
            w.wake();
        }
    }

    /// Confirms every held publish.
    pub fn release_confirms(&self) {
        let mut b = self.broker();
        b.hold_confirms = false;
        for (conn, chan, seq) in std::mem::take(&mut b.held) {
            if let Some(c) = b.chans.get(&(conn, chan)) {
                let _ = c.events.unbounded_send(ChannelEvent::Ack {
                    delivery_tag: seq,
                    multiple: false,
                });
            }
        }
    }

    pub fn open_channels(&self) -> usize {
        self.broker().chans.len()
    }

    pub fn open_connections(&self) -> usize {
        self.broker().conns.len()
    }
}

pub struct MemConnection {
    id: u64,
    broker: Arc<Mutex<Broker>>,
    events: Mutex<Option<mpsc::UnboundedReceiver<ConnectionEvent>>>,
}

pub struct MemChannel {
    key: (u64, u64),
    broker: Arc<Mutex<Broker>>,
    events: Mutex<Option<mpsc::UnboundedReceiver<ChannelEvent>>>,
}

#[async_trait]
impl Transport for MemoryTransport {
    type Connection = MemConnection;
    async fn connect(
        &self,
        _endpoint: &Endpoint,
        _options: &ConnectOptions,
    ) -> Result<MemConnection, TransportError> {
        let hang = {
            let mut b = self.broker();
            b.dials += 1;
            let hang = b.hang_dials > 0;
            b.hang_dials = b.hang_dials.saturating_sub(1);
            hang
        };
        if hang {
            let broker = Arc::clone(&self.0);
            std::future::poll_fn(move |cx| {
                let mut b = broker.lock().unwrap();
                if b.released {
                    Poll::Ready(())
                } else {
                    b.hung.push(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
        }
        let mut b = self.broker();
        if let Some(e) = b.refuse.clone() {
            return Err(e);
        }
        b.next_conn += 1;
        let id = b.next_conn;
        let (tx, rx) = mpsc::unbounded();
        b.conns.insert(id, tx);
        Ok(MemConnection {
            id,
            broker: Arc::clone(&self.0),
            events: Mutex::new(Some(rx)),
        })
    }
}

fn closed() -> TransportError {
    TransportError::Io("closed".into())
}

#[async_trait]
impl Connection for MemConnection {
    type Channel = MemChannel;
    fn channel_max(&self) -> u16 {
        self.broker.lock().unwrap().channel_max.unwrap_or(u16::MAX)
    }
    async fn open_channel(&self) -> Result<MemChannel, TransportError> {
        let mut b = self.broker.lock().unwrap();
        let open_here = b.chans.keys().filter(|(c, _)| *c == self.id).count();
        if b.channel_max
            .is_some_and(|max| open_here >= usize::from(max))
        {
            b.over_channel_max += 1;
        }
        if !b.conns.contains_key(&self.id) {
            return Err(closed());
        }
        b.next_chan += 1;
        let key = (self.id, b.next_chan);
        let (tx, rx) = mpsc::unbounded();
        b.chans.insert(
            key,
            ChanState {
                events: tx,
                seq: 0,
                delivery_tag: 0,
                consumers: Vec::new(),
            },
        );
        Ok(MemChannel {
            key,
            broker: Arc::clone(&self.broker),
            events: Mutex::new(Some(rx)),
        })
    }
    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        match self.events.lock().unwrap().take() {
            Some(rx) => rx.boxed(),
            None => futures::stream::empty().boxed(),
        }
    }
    async fn close(&self) -> Result<(), TransportError> {
        let mut b = self.broker.lock().unwrap();
        b.log.push("connection close".into());
        b.conns.remove(&self.id);
        b.chans.retain(|(c, _), _| *c != self.id);
        Ok(())
    }
}

impl MemChannel {
    fn publish_now(&self, message: &Message) -> Result<(), TransportError> {
        let key = self.key;
        self.with(|b| {
            if let Some(e) = b.fail_next_publish.take() {
                return Err(e);
            }
            b.received
                .push(String::from_utf8_lossy(&message.payload).into_owned());
            if message.exchange.is_empty() {
                b.queues
                    .entry(message.routing_key.clone())
                    .or_default()
                    .push_back(message.clone());
            }
            let hold = b.hold_confirms;
            let chan = b.chans.get_mut(&key).expect("checked by with()");
            chan.seq += 1;
            let seq = chan.seq;
            if hold {
                b.held.push((key.0, key.1, seq));
            } else {
                let _ = chan.events.unbounded_send(ChannelEvent::Ack {
                    delivery_tag: seq,
                    multiple: false,
                });
            }
            let queue = message.routing_key.clone();
            dispatch(b, &queue);
            Ok(())
        })
    }
    fn with<R>(
        &self,
        f: impl FnOnce(&mut Broker) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let mut b = self.broker.lock().unwrap();
        if !b.chans.contains_key(&self.key) {
            return Err(closed());
        }
        f(&mut b)
    }
}

/// Delivers what waits in `queue` to its consumers (round-robin by arrival).
fn dispatch(b: &mut Broker, queue: &str) {
    loop {
        let target = b.chans.iter().find_map(|(k, c)| {
            c.consumers
                .iter()
                .find(|(q, _)| q == queue)
                .map(|(_, tag)| (*k, tag.clone()))
        });
        let Some((key, tag)) = target else { return };
        let Some(message) = b.queues.get_mut(queue).and_then(|q| q.pop_front()) else {
            return;
        };
        let chan = b.chans.get_mut(&key).expect("found above");
        chan.delivery_tag += 1;
        let _ = chan
            .events
            .unbounded_send(ChannelEvent::Delivery(Box::new(Delivery {
                consumer_tag: tag,
                delivery_tag: chan.delivery_tag,
                redelivered: false,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                properties: message.properties.clone(),
                payload: message.payload.clone(),
            })));
    }
}

#[async_trait]
impl Channel for MemChannel {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        match self.events.lock().unwrap().take() {
            Some(rx) => rx.boxed(),
            None => futures::stream::empty().boxed(),
        }
    }
    async fn confirm_select(&self) -> Result<(), TransportError> {
        self.with(|_| Ok(()))
    }
    async fn qos(&self, _prefetch_count: u16) -> Result<(), TransportError> {
        self.with(|_| Ok(()))
    }
    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        match op {
            TopologyOp::DeclareQueue(decl) => self.with(|b| {
                let name = if decl.name.is_empty() {
                    b.server_named += 1;
                    format!("amq.gen-{}", b.server_named)
                } else {
                    decl.name.clone()
                };
                let len = b.queues.entry(name.clone()).or_default().len() as u32;
                Ok(TopologyOutcome::Queue(QueueInfo {
                    name,
                    message_count: len,
                    consumer_count: 0,
                }))
            }),
            TopologyOp::DeleteQueue { name } => self.with(|b| {
                let message_count = b.queues.remove(name).map_or(0, |q| q.len() as u32);
                Ok(TopologyOutcome::QueueDeleted { message_count })
            }),
            TopologyOp::DeclareExchange(_)
            | TopologyOp::DeleteExchange { .. }
            | TopologyOp::BindQueue { .. }
            | TopologyOp::UnbindQueue { .. }
            | TopologyOp::BindExchange { .. }
            | TopologyOp::UnbindExchange { .. } => self.with(|_| Ok(TopologyOutcome::Done)),
            op => Err(op.unsupported()),
        }
    }
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        self.publish_now(message)
    }
    /// Every third message (by the channel's count) says it would have to wait,
    /// so the tests run both of the driver's ways to publish, mixed.
    fn try_publish(&self, message: &Message) -> Option<Result<(), TransportError>> {
        let asynchronous = {
            let broker = self.broker.lock().unwrap();
            broker
                .chans
                .get(&self.key)
                .is_none_or(|chan| chan.seq % 3 == 2)
        };
        (!asynchronous).then(|| self.publish_now(message))
    }
    async fn consume(
        &self,
        queue: &str,
        tag: &str,
        _options: &ConsumeOptions,
    ) -> Result<(), TransportError> {
        let key = self.key;
        self.with(|b| {
            b.chans
                .get_mut(&key)
                .expect("checked by with()")
                .consumers
                .push((queue.to_string(), tag.to_string()));
            dispatch(b, queue);
            Ok(())
        })
    }
    async fn cancel(&self, tag: &str) -> Result<(), TransportError> {
        let key = self.key;
        self.with(|b| {
            b.chans
                .get_mut(&key)
                .expect("checked by with()")
                .consumers
                .retain(|(_, t)| t != tag);
            Ok(())
        })
    }
    async fn ack(&self, tag: u64, _multiple: bool) -> Result<(), TransportError> {
        let broker = Arc::clone(&self.broker);
        std::future::poll_fn(move |cx| {
            let mut b = broker.lock().unwrap();
            if b.hold_acks {
                b.held_acks.push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        self.with(|b| {
            b.log.push(format!("ack {tag}"));
            Ok(())
        })
    }
    async fn nack(&self, _tag: u64, _multiple: bool, _requeue: bool) -> Result<(), TransportError> {
        self.with(|_| Ok(()))
    }
    async fn reject(&self, _tag: u64, _requeue: bool) -> Result<(), TransportError> {
        self.with(|_| Ok(()))
    }
    async fn close(&self) -> Result<(), TransportError> {
        let mut b = self.broker.lock().unwrap();
        b.log.push("channel close".into());
        b.chans.remove(&self.key);
        Ok(())
    }
}

// ----- running it without a runtime -----

/// Runs `pool` until nothing can progress, moving the manual clock to the next
/// armed deadline each time, until `done()` or `limit` of virtual time passes.
pub fn drive(
    pool: &mut futures::executor::LocalPool,
    clock: &ManualClock,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let end = clock.now() + limit;
    loop {
        pool.run_until_stalled();
        if done() {
            return true;
        }
        match clock.next_deadline() {
            Some(at) if at <= end => {
                let now = clock.now();
                clock.advance(at.saturating_duration_since(now));
            }
            _ => return done(),
        }
    }
}

pub fn counts(items: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i.clone()).or_insert(0) += 1;
    }
    m
}
