//! The contract between a [`Client`](crate::Client) handle and its
//! [`Driver`](crate::Driver): the requests a handle sends, what they share, the
//! replies and consumer items the driver sends back, and the results both name.
//! Neither side imports the other's internals; both import this.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use slotmap::{Key, KeyData, SlotMap};

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
    /// The broker's message size limit once a refusal told it
    /// ([`NO_SIZE_LIMIT`] until then), for the checks a publish gets on its
    /// caller's thread when the driver takes it.
    pub(crate) max_message_size: AtomicUsize,
    /// Every publish's reply, from its call until its future reads or drops it.
    pub(crate) replies: Replies,
    /// Who is woken when a channel has events: a publisher waiting for its
    /// confirm, or the driver.
    pub(crate) relay: Arc<Relay>,
}

/// [`Shared::max_message_size`] while the broker told no limit.
pub(crate) const NO_SIZE_LIMIT: usize = usize::MAX;

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
        /// Its slot in [`Shared::replies`]: whoever takes the request resolves it.
        reply: ReplyKey,
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
    /// How many of the messages accepted before the flush (since the client was
    /// built) resolved other than
    /// [`Confirmation::Confirmed`](crate::Confirmation::Confirmed) (returned, nacked, timed out, rejected,
    /// closed), whether they resolved before the flush was called or while it
    /// waited. Zero: every one of them is confirmed by the broker.
    pub not_confirmed: u64,
}

slotmap::new_key_type! {
    /// A publish's slot in [`Replies`]. Versioned: once the slot is freed the
    /// key finds nothing, even after the slot is reused.
    pub(crate) struct ReplyKey;
}

impl ReplyKey {
    /// The key as the outbox carries it. 0 names slot 0 at version 0, which
    /// the slot map never hands out, so it stands for "no reply".
    pub(crate) fn to_u64(self) -> u64 {
        self.data().as_ffi()
    }

    pub(crate) fn from_u64(key: u64) -> ReplyKey {
        ReplyKey::from(KeyData::from_ffi(key))
    }
}

/// The results of publishes, shared by the driver, which resolves them, and
/// each [`PublishFuture`](crate::PublishFuture), which reads its own once, or
/// gives it up when dropped: one small slot per publish, allocated when it is
/// called and freed when the result is read (or resolves after its future was
/// dropped). A slot resolves at most once; the usual results take no
/// allocation.
#[derive(Default)]
pub(crate) struct Replies {
    slots: Mutex<SlotMap<ReplyKey, ReplyState>>,
}

enum ReplyState {
    /// Unresolved; the waker of its future's last poll.
    Waiting(Option<Waker>),
    /// Unresolved, and its future is gone: the resolution frees the slot.
    Abandoned,
    /// Resolved, not read yet.
    Done(Outcome),
}

/// A publish's result, the usual ones inline.
enum Outcome {
    Confirmed,
    TimedOut,
    Closed,
    Other(Box<Result<Confirmation, PublishError>>),
}

impl Outcome {
    fn of(result: Result<Confirmation, PublishError>) -> Outcome {
        match result {
            Ok(Confirmation::Confirmed) => Outcome::Confirmed,
            Err(PublishError::TimedOut) => Outcome::TimedOut,
            Err(PublishError::Closed) => Outcome::Closed,
            other => Outcome::Other(Box::new(other)),
        }
    }

    fn into_result(self) -> Result<Confirmation, PublishError> {
        match self {
            Outcome::Confirmed => Ok(Confirmation::Confirmed),
            Outcome::TimedOut => Err(PublishError::TimedOut),
            Outcome::Closed => Err(PublishError::Closed),
            Outcome::Other(result) => *result,
        }
    }
}

impl Replies {
    /// A slot for a new publish.
    pub(crate) fn open(&self) -> ReplyKey {
        lock(&self.slots).insert(ReplyState::Waiting(None))
    }

    /// Resolves `key` with `result`, under the lock: whether it was unresolved,
    /// and the waker to wake once the lock is released.
    fn settle(
        slots: &mut SlotMap<ReplyKey, ReplyState>,
        key: ReplyKey,
        result: Result<Confirmation, PublishError>,
    ) -> (bool, Option<Waker>) {
        let Some(state) = slots.get_mut(key) else {
            return (false, None);
        };
        match state {
            ReplyState::Waiting(waker) => {
                let waker = waker.take();
                *state = ReplyState::Done(Outcome::of(result));
                (true, waker)
            }
            ReplyState::Abandoned => {
                slots.remove(key);
                (true, None)
            }
            ReplyState::Done(_) => (false, None),
        }
    }

    /// Resolves `key` with `result` (nothing if it already resolved); whether
    /// it was unresolved.
    pub(crate) fn resolve(
        &self,
        key: ReplyKey,
        result: Result<Confirmation, PublishError>,
    ) -> bool {
        let (unresolved, waker) = Self::settle(&mut lock(&self.slots), key, result);
        if let Some(waker) = waker {
            waker.wake();
        }
        unresolved
    }

    /// Resolves each key with its result, under one lock, then wakes their
    /// futures; how many were unresolved.
    pub(crate) fn resolve_all(
        &self,
        results: impl IntoIterator<Item = (ReplyKey, Result<Confirmation, PublishError>)>,
    ) -> usize {
        let results = results.into_iter();
        let mut unresolved = 0;
        let mut wakers = Vec::with_capacity(results.size_hint().0);
        {
            let mut slots = lock(&self.slots);
            for (key, result) in results {
                let (was, waker) = Self::settle(&mut slots, key, result);
                unresolved += usize::from(was);
                wakers.extend(waker);
            }
        }
        for waker in wakers {
            waker.wake();
        }
        unresolved
    }

    /// The result of `key`, taken (the slot is freed), or `Pending` with `cx`'s
    /// waker kept. A key with no slot reads `Closed` (it never happens: a slot
    /// is freed only by its reading or by its dropped future).
    pub(crate) fn poll(
        &self,
        key: ReplyKey,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Confirmation, PublishError>> {
        let mut slots = lock(&self.slots);
        match slots.get_mut(key) {
            Some(ReplyState::Waiting(waker)) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Some(ReplyState::Done(_)) => match slots.remove(key) {
                Some(ReplyState::Done(outcome)) => Poll::Ready(outcome.into_result()),
                _ => Poll::Ready(Err(PublishError::Closed)),
            },
            Some(ReplyState::Abandoned) | None => Poll::Ready(Err(PublishError::Closed)),
        }
    }

    /// The future of `key` is not to be woken by its resolution (it is about
    /// to look for itself).
    pub(crate) fn unregister(&self, key: ReplyKey) {
        if let Some(ReplyState::Waiting(waker)) = lock(&self.slots).get_mut(key) {
            *waker = None;
        }
    }

    /// The future of `key` is gone: its slot is freed now if resolved, else
    /// when it resolves.
    pub(crate) fn forget(&self, key: ReplyKey) {
        let mut slots = lock(&self.slots);
        match slots.get_mut(key) {
            Some(state @ ReplyState::Waiting(_)) => *state = ReplyState::Abandoned,
            Some(ReplyState::Done(_)) => {
                slots.remove(key);
            }
            Some(ReplyState::Abandoned) | None => {}
        }
    }

    /// Slots in use.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.slots).len()
    }
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut f = f.debug_struct("Replies");
        if let Ok(slots) = self.slots.try_lock() {
            f.field("slots", &slots.len());
        }
        f.finish_non_exhaustive()
    }
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
/// `acks`: the consumer acks its deliveries (it is not `no_ack`), so those it
/// holds when the client ends are the broker's again
/// ([`ConsumerSender::end`]).
///
/// [`Consumer`]: crate::Consumer
pub(crate) fn consumer_stream(
    bound: Option<usize>,
    acks: bool,
) -> (ConsumerSender, ConsumerReceiver) {
    let shared = Arc::new(Mutex::new(StreamInner {
        items: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
        acks,
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
    /// Not `no_ack`: its deliveries wait for the application's ack. (Here,
    /// not in the sender, which travels in a `Request` kept small.)
    acks: bool,
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

/// The [`Consumer`](crate::Consumer) was dropped: nobody takes the items. Holds
/// the item that was not taken.
#[derive(Debug)]
pub(crate) struct ReceiverGone(pub(crate) ConsumerItem);

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
            return Err(ReceiverGone(item));
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

    /// The client ended: the stream ends with `error`. An acking consumer's
    /// deliveries not handed out go first: their acks would be refused
    /// (`Closed`) and the broker, whose they are again once their channel
    /// closed, delivers them again, so handed out they would only be worked on
    /// twice. An auto-ack consumer's are the application's alone, and stay.
    pub(crate) fn end(&self, error: ConsumeError) {
        let mut inner = lock(&self.shared);
        if inner.acks {
            inner
                .items
                .retain(|item| !matches!(item, ConsumerItem::Delivery { .. }));
        }
        drop(inner);
        let _ = self.send(ConsumerItem::Ended(error), |_, _| false);
    }

    /// The items the application never took, once it dropped its end (none
    /// before).
    pub(crate) fn take_unread(&self) -> VecDeque<ConsumerItem> {
        let mut inner = lock(&self.shared);
        if inner.receiver_gone {
            std::mem::take(&mut inner.items)
        } else {
            VecDeque::new()
        }
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
    /// `client_ended`: the client's driver has finished. An acking consumer's
    /// deliveries not handed out then go (see [`ConsumerSender::end`]), those
    /// of one that had ended before too (its sender was gone by then).
    pub(crate) fn poll_next(
        &self,
        cx: &mut Context<'_>,
        client_ended: bool,
    ) -> Poll<Option<ConsumerItem>> {
        let mut inner = lock(&self.shared);
        if client_ended && inner.acks {
            inner
                .items
                .retain(|item| !matches!(item, ConsumerItem::Delivery { .. }));
        }
        if let Some(item) = inner.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if inner.sender_gone {
            return Poll::Ready(None);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Takes nothing more: the items left stay for the driver, which gives the
    /// deliveries back (`take_unread`) when it hears of it.
    pub(crate) fn close(&self) {
        lock(&self.shared).receiver_gone = true;
    }
}

impl Drop for ConsumerReceiver {
    fn drop(&mut self) {
        self.close();
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
    /// The channels' events taken on a publisher's task (see [`Relay`]), if
    /// the state is free and the driver has polled and not finished; whether
    /// it ran. Nothing else of the driver's runs there: no timer, dial or
    /// request.
    fn poll_here(&self) -> bool;
    /// The driver was dropped: everything pending resolves `Closed`.
    fn abandon(&self);
    /// The supervisor's counters now.
    fn stats(&self) -> Stats;
}

/// Who runs the engine when a channel's events (confirms, returns, deliveries,
/// closures) are ready: a publisher waiting for its confirm, on its own task,
/// or else the driver.
///
/// The driver polls the channels' event streams with this relay's waker. A
/// waking stream then wakes the publisher that last registered here as
/// waiting (and marks the run as owed to it) instead of the driver; that
/// publisher's next poll takes the channels' events on its own task, as
/// [`Engine::poll_here`] (the channels' events only: never the driver's
/// timer, dials or requests), and finds its confirm resolved there. A confirm
/// thus reaches the publisher that last began waiting in one wake-up, as with
/// the raw client, and the others through that publisher's run: never through
/// the driver's task as well. With no publisher waiting (or when the
/// state is busy, or the owed publisher is dropped or resolved first) the
/// wake-up goes to the driver, as every other source's does.
///
/// A woken publisher may not be polled soon: its task may be busy elsewhere, or
/// hold the future without polling it (polled once by hand, then kept). So the
/// run is not its alone: any publisher's next poll takes it, any run of the
/// engine settles it, and the driver guards the hand-offs: the first hand-off
/// while no guard is armed also wakes the driver, whose timer then looks at
/// the channels every [`RELAY_GRACE`] for as long as hand-offs go on (one look
/// after the last one). A publisher that is never polled again delays the
/// channels' events (other callers' confirms, consumers' deliveries) by at most
/// that; without hand-offs (no confirms coming, as in an outage) the guard
/// costs nothing.
#[derive(Default)]
pub(crate) struct Relay {
    state: Mutex<RelayState>,
    /// The engine, to run on a publisher's task; weak: a pending future does
    /// not keep a finished client's state alive.
    engine: OnceLock<Weak<dyn Engine>>,
}

#[derive(Default)]
struct RelayState {
    /// The driver task's waker, as of its last poll.
    driver: Option<Waker>,
    /// The publisher waiting for its confirm that a channel's wake-up goes to.
    waiting: Option<(ReplyKey, Waker)>,
    /// The publisher woken in the driver's place that has not run the engine
    /// yet.
    owed: Option<ReplyKey>,
    /// The driver's timer is armed to look at the channels within
    /// [`RELAY_GRACE`], or the driver was woken to arm it (see
    /// [`Relay::engaged`]).
    guarded: bool,
    /// A wake-up was handed to a publisher since the guard last looked.
    handed: bool,
}

/// How long a wake-up handed to a publisher that is not polled can hold the
/// channels' events: the driver's timer looks at them this often while
/// wake-ups are handed to publishers.
pub(crate) const RELAY_GRACE: Duration = Duration::from_millis(10);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("Relay")
            .field("waiting", &state.waiting.as_ref().map(|(key, _)| *key))
            .field("owed", &state.owed)
            .finish_non_exhaustive()
    }
}

impl futures::task::ArcWake for Relay {
    fn wake_by_ref(relay: &Arc<Self>) {
        let mut state = lock(&relay.state);
        let (waker, driver) = match state.waiting.take() {
            Some((key, waker)) => {
                state.owed = Some(key);
                state.handed = true;
                // unguarded: the driver arms its guard
                let arm = !std::mem::replace(&mut state.guarded, true);
                (Some(waker), arm.then(|| state.driver.clone()).flatten())
            }
            None => (None, state.driver.clone()),
        };
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

impl Relay {
    /// The engine the relay's publishers run; set once, when it is made.
    pub(crate) fn set_engine(&self, engine: Weak<dyn Engine>) {
        let _ = self.engine.set(engine);
    }

    /// The driver polls with `waker`.
    pub(crate) fn set_driver(&self, waker: &Waker) {
        let mut state = lock(&self.state);
        if !state.driver.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.driver = Some(waker.clone());
        }
    }

    /// The publisher of `key` waits for its confirm with `waker`: a channel's
    /// next wake-up goes to it.
    pub(crate) fn wait(&self, key: ReplyKey, waker: &Waker) {
        let mut state = lock(&self.state);
        let replaced = match &state.waiting {
            Some((k, w)) if *k == key && w.will_wake(waker) => None,
            _ => state.waiting.replace((key, waker.clone())),
        };
        drop(state);
        // dropped unlocked: the last reference to a task may go with it
        drop(replaced);
    }

    /// Whether a channel's wake-up was handed to a publisher (this one or
    /// another) that has not run the engine yet; taken: the caller runs it
    /// ([`Relay::run`]).
    pub(crate) fn take_owed(&self) -> bool {
        lock(&self.state).owed.take().is_some()
    }

    /// The engine is about to take the channels' events: a run handed to a
    /// publisher is moot.
    pub(crate) fn settled(&self) {
        lock(&self.state).owed = None;
    }

    /// For the driver, as its guard's time comes: whether a wake-up was
    /// handed to a publisher since the last look, or is still owed (the guard
    /// stays armed), or not (it is disarmed until the next hand-off).
    pub(crate) fn engaged(&self) -> bool {
        let mut state = lock(&self.state);
        state.guarded = state.handed || state.owed.is_some();
        state.handed = false;
        state.guarded
    }

    /// The publisher of `key` waits no more (resolved, or dropped): a wake-up
    /// handed to it and not acted on goes to the driver.
    pub(crate) fn leave(&self, key: ReplyKey) {
        let mut state = lock(&self.state);
        let waiting = state.waiting.take_if(|(w, _)| *w == key);
        let driver = if state.owed == Some(key) {
            state.owed = None;
            state.driver.clone()
        } else {
            None
        };
        drop(state);
        // dropped unlocked, as in `wait`
        drop(waiting);
        if let Some(waker) = driver {
            waker.wake();
        }
    }

    /// Takes the channels' events on this task, or wakes the driver to, when
    /// its state is busy or finished.
    pub(crate) fn run(&self) {
        let ran = self
            .engine
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|engine| engine.poll_here());
        if !ran {
            let driver = lock(&self.state).driver.clone();
            if let Some(waker) = driver {
                waker.wake();
            }
        }
    }
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
        let (tx, rx) = consumer_stream(Some(3), true);
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
            rx.poll_next(&mut cx, false)
        {
            generations.push(generation);
        }
        assert_eq!(generations, vec![2, 2, 2, 2]);
        drop(tx);
        assert!(matches!(rx.poll_next(&mut cx, false), Poll::Ready(None)));
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Waker, Arc<std::sync::atomic::AtomicUsize>) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(Arc::clone(&count)))), count)
    }

    #[test]
    fn a_reply_resolves_once_wakes_its_future_and_is_freed_when_read() {
        let replies = Replies::default();
        let key = replies.open();
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(replies.poll(key, &mut cx).is_pending());
        assert!(replies.resolve(key, Ok(Confirmation::Confirmed)));
        assert!(
            !replies.resolve(key, Err(PublishError::Nacked)),
            "a second resolution is refused"
        );
        assert_eq!(wakes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            replies.poll(key, &mut cx),
            Poll::Ready(Ok(Confirmation::Confirmed))
        );
        assert_eq!(replies.len(), 0, "read: freed");
        // a stale key finds nothing, not the slot's next publish
        let next = replies.open();
        assert!(!replies.resolve(key, Err(PublishError::Nacked)));
        assert!(replies.poll(next, &mut cx).is_pending());
        let rejected = Err(PublishError::Rejected {
            code: 404,
            text: "no exchange".into(),
        });
        assert_eq!(replies.resolve_all([(next, rejected.clone())]), 1);
        assert_eq!(replies.poll(next, &mut cx), Poll::Ready(rejected));
        assert_eq!(replies.len(), 0);
    }

    #[test]
    fn a_dropped_future_frees_its_reply_whenever_it_resolves() {
        let replies = Replies::default();
        // dropped before its resolution: freed by it
        let early = replies.open();
        replies.forget(early);
        assert_eq!(replies.len(), 1);
        assert!(replies.resolve(early, Err(PublishError::TimedOut)));
        assert_eq!(replies.len(), 0);
        // dropped after it: freed at once
        let late = replies.open();
        assert!(replies.resolve(late, Err(PublishError::Closed)));
        replies.forget(late);
        assert_eq!(replies.len(), 0);
        // forgetting twice, or a stale key, changes nothing
        replies.forget(late);
        let live = replies.open();
        replies.forget(early);
        assert_eq!(replies.len(), 1);
        replies.forget(live);
        assert_eq!(
            replies.resolve_all([(live, Ok(Confirmation::Confirmed))]),
            1
        );
        assert_eq!(replies.len(), 0);
    }

    /// One per publish waiting for its confirm.
    #[test]
    fn a_reply_slot_stays_small() {
        assert!(std::mem::size_of::<ReplyState>() <= 24);
    }

    #[test]
    fn a_dropped_receiver_is_reported_and_an_unbounded_stream_takes_everything() {
        let (tx, rx) = consumer_stream(None, true);
        for _ in 0..100 {
            tx.send(delivery(1), |_, _| true).unwrap();
        }
        assert_eq!(tx.len(), 100);
        drop(rx);
        assert!(tx.send(delivery(1), |_, _| true).is_err());
    }
}
