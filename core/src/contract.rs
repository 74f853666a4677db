//! The contract between a [`Client`](crate::Client) handle and its
//! [`Driver`](crate::Driver): the requests a handle sends, what they share, the
//! replies and consumer items the driver sends back, and the results both name.
//! Neither side imports the other's internals; both import this.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use crate::error::TransportError;
use crate::ids::ChannelId;
use crate::message::{Delivery, Message};
use crate::outbox::{Confirmation, PublishError};
use crate::state::Phase;
use crate::supervisor::{Stats, Supervisor};
use crate::topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerId, OpId, QueueDecl, QueueHandle,
    QueueRef, TopologyError,
};

/// What the driver and every client handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<ClientState>,
    pub(crate) queue_names: Mutex<HashMap<QueueHandle, String>>,
    pub(crate) closed: AtomicBool,
}

/// A snapshot of the pool's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientState {
    /// Each connection slot's state.
    pub connections: Vec<Phase>,
    /// Channels Ready now.
    pub ready_channels: usize,
    /// Channels in the pool.
    pub channels: usize,
    /// `close()` was called (or every handle dropped).
    pub closed: bool,
}

impl ClientState {
    pub(crate) fn of(sup: &Supervisor) -> ClientState {
        ClientState {
            connections: sup
                .connection_ids()
                .filter_map(|id| sup.connection_state(id).map(|s| s.phase()))
                .collect(),
            ready_channels: sup.ready_channels(),
            channels: sup.channel_ids().count(),
            closed: sup.is_closing(),
        }
    }

    /// Every connection and channel is Ready.
    pub fn is_ready(&self) -> bool {
        !self.closed && self.ready_channels == self.channels
    }
}

pub(crate) type TopologyOpFn =
    Box<dyn FnOnce(&mut Supervisor, Instant) -> Result<OpId, TopologyError> + Send + 'static>;

/// What a client handle asks of the driver.
pub(crate) enum Request {
    Publish {
        message: Arc<Message>,
        /// Measured from when the driver accepts it, on the driver's clock.
        timeout: Option<Duration>,
        wait: bool,
        reply: oneshot::Sender<Result<Confirmation, PublishError>>,
    },
    Topology {
        op: TopologyOpFn,
        reply: TopologyReply,
    },
    DeclareQueue {
        decl: QueueDecl,
        reply: oneshot::Sender<Result<(QueueHandle, String), TopologyError>>,
    },
    Consume {
        queue: QueueRef,
        tag: Option<String>,
        options: ConsumeOptions,
        items: ConsumerSender,
        reply: oneshot::Sender<Result<ConsumerId, ConsumeError>>,
    },
    Cancel {
        consumer: ConsumerId,
    },
    Ack {
        channel: ChannelId,
        generation: u64,
        delivery_tag: u64,
        kind: AckKind,
        reply: oneshot::Sender<Result<(), AckError>>,
    },
    Watch {
        events: crate::watch::Sender,
    },
    Close {
        /// Discard what was not sent instead of draining.
        discard: bool,
        done: oneshot::Sender<CloseSummary>,
    },
    Flush {
        reply: oneshot::Sender<Flushed>,
    },
    Connected {
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
}

/// How a [`Client::close`](crate::Client::close) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CloseSummary {
    /// Publishes the close resolved [`PublishError::Closed`]: not confirmed
    /// when the close timeout ran out (or discarded by
    /// [`Client::close_discarding`](crate::Client::close_discarding)). Zero: everything accepted was confirmed
    /// (or had resolved otherwise) before the connections closed.
    pub unresolved: u64,
}

/// What [`Client::flush`](crate::Client::flush) waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Flushed {
    /// How many of the messages accepted before the flush resolved other than
    /// [`Confirmation::Confirmed`](crate::Confirmation::Confirmed) (returned, nacked, timed out, rejected,
    /// closed). Zero: every one of them is confirmed by the broker.
    pub not_confirmed: u64,
}

/// The stream of one consumer's items, from the driver to its [`Consumer`].
///
/// Bounded by the consumer's prefetch (when it acks and has one): the broker sends
/// no more unacked deliveries than that on the consumer's current channel, and
/// the stream holds only deliveries the application has not taken (so not acked).
/// What can push it past the bound is deliveries of a channel generation that is
/// gone: the broker requeued them when the channel closed and delivers them
/// again, and their acks would be refused as stale, so the oldest of them is
/// dropped to make room. Without a prefetch (or with `no_ack`) the broker bounds
/// nothing and neither does the stream.
///
/// [`Consumer`]: crate::Consumer
pub(crate) fn consumer_stream(bound: Option<usize>) -> (ConsumerSender, ConsumerReceiver) {
    let shared = Arc::new(Mutex::new(StreamInner {
        items: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (
        ConsumerSender {
            shared: Arc::clone(&shared),
            bound,
        },
        ConsumerReceiver { shared },
    )
}

#[derive(Debug)]
struct StreamInner {
    items: VecDeque<ConsumerItem>,
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

/// The driver's end of a consumer's stream.
#[derive(Debug)]
pub(crate) struct ConsumerSender {
    shared: Arc<Mutex<StreamInner>>,
    bound: Option<usize>,
}

/// The application's end of a consumer's stream.
#[derive(Debug)]
pub(crate) struct ConsumerReceiver {
    shared: Arc<Mutex<StreamInner>>,
}

/// The [`Consumer`](crate::Consumer) was dropped: nobody takes the items.
#[derive(Debug)]
pub(crate) struct ReceiverGone;

impl ConsumerSender {
    /// Queues `item`. At the bound, the oldest delivery for which `stale` is
    /// true makes room; an `Ended` item always goes in.
    pub(crate) fn send(
        &self,
        item: ConsumerItem,
        stale: impl Fn(ChannelId, u64) -> bool,
    ) -> Result<(), ReceiverGone> {
        let mut inner = lock(&self.shared);
        if inner.receiver_gone {
            return Err(ReceiverGone);
        }
        if let (Some(bound), ConsumerItem::Delivery { .. }) = (self.bound, &item)
            && inner.items.len() >= bound
            && let Some(at) = inner.items.iter().position(|i| {
                matches!(i, ConsumerItem::Delivery { channel, generation, .. }
                    if stale(*channel, *generation))
            })
        {
            inner.items.remove(at);
        }
        inner.items.push_back(item);
        if let Some(waker) = inner.waker.take() {
            drop(inner);
            waker.wake();
        }
        Ok(())
    }

    /// Items waiting for the application.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.shared).items.len()
    }
}

impl Drop for ConsumerSender {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared);
        inner.sender_gone = true;
        if let Some(waker) = inner.waker.take() {
            drop(inner);
            waker.wake();
        }
    }
}

impl ConsumerReceiver {
    /// The next item; `None` once the driver's end is gone and nothing is left.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<ConsumerItem>> {
        let mut inner = lock(&self.shared);
        if let Some(item) = inner.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if inner.sender_gone {
            return Poll::Ready(None);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ConsumerReceiver {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared);
        inner.receiver_gone = true;
        inner.items.clear();
    }
}

/// What the driver sends a consumer.
#[derive(Debug)]
pub(crate) enum ConsumerItem {
    /// A delivery, and the channel generation it came on (for its ack).
    Delivery {
        delivery: Box<Delivery>,
        channel: ChannelId,
        generation: u64,
    },
    Ended(ConsumeError),
}

pub(crate) type Reply<T> = oneshot::Sender<T>;

pub(crate) enum TopologyReply {
    Unit(Reply<Result<(), TopologyError>>),
    Queue(
        QueueHandle,
        Reply<Result<(QueueHandle, String), TopologyError>>,
    ),
}

/// The client's state as the driver and the client handles see it, without its
/// transport's types.
pub(crate) trait Engine: Send + Sync + 'static {
    /// One poll of the driver.
    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()>;
    /// Runs a publish request on the caller's thread, if the state is free;
    /// gives it back otherwise (the caller then sends it as a request).
    fn try_publish(&self, request: Request) -> Result<(), Request>;
    /// The driver was dropped: everything pending resolves `Closed`.
    fn abandon(&self);
    /// The supervisor's counters now.
    fn stats(&self) -> Stats;
}

pub(crate) use crate::transport::support::lock;

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(generation: u64) -> ConsumerItem {
        ConsumerItem::Delivery {
            delivery: Box::new(Delivery {
                consumer_tag: "c".into(),
                delivery_tag: 1,
                redelivered: false,
                exchange: String::new(),
                routing_key: "q".into(),
                properties: Default::default(),
                payload: Default::default(),
            }),
            channel: ChannelId {
                connection: crate::ids::ConnectionId(0),
                index: 0,
            },
            generation,
        }
    }

    /// At the bound, a delivery of a lost generation makes room (the broker
    /// delivers it again); deliveries of the live one never go.
    #[test]
    fn the_stream_stays_at_the_prefetch_by_dropping_stale_deliveries() {
        let (tx, rx) = consumer_stream(Some(3));
        let stale = |_: ChannelId, generation: u64| generation < 2;
        for generation in [1, 1, 1] {
            tx.send(delivery(generation), stale).unwrap();
        }
        for _ in 0..3 {
            tx.send(delivery(2), stale).unwrap();
        }
        assert_eq!(tx.len(), 3, "bounded by the prefetch");
        tx.send(delivery(2), stale).unwrap();
        assert_eq!(tx.len(), 4, "live deliveries are never dropped");
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut generations = Vec::new();
        while let Poll::Ready(Some(ConsumerItem::Delivery { generation, .. })) =
            rx.poll_next(&mut cx)
        {
            generations.push(generation);
        }
        assert_eq!(generations, vec![2, 2, 2, 2]);
        drop(tx);
        assert!(matches!(rx.poll_next(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_dropped_receiver_is_reported_and_an_unbounded_stream_takes_everything() {
        let (tx, rx) = consumer_stream(None);
        for _ in 0..100 {
            tx.send(delivery(1), |_, _| true).unwrap();
        }
        assert_eq!(tx.len(), 100);
        drop(rx);
        assert!(tx.send(delivery(1), |_, _| true).is_err());
    }
}
