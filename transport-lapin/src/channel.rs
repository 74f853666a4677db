//! [`LapinChannel`]: one lapin channel, and the bookkeeping that turns its confirms,
//! returns, deliveries and closure into one [`ChannelEvent`] stream.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::topology::{ConsumeOptions, TopologyOp};
use amqp_rebound_core::transport::{Channel, ChannelEvent, QueueInfo, TopologyOutcome};
use async_trait::async_trait;
use futures::future::{self, BoxFuture};
use futures::stream::{self, BoxStream, FuturesUnordered, SelectAll, Stream};
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::ShortString;
use lapin::{ChannelStatus, Confirmation};

use crate::convert::{self, check_table, is_state_error, map_error, short};

/// One AMQP channel over lapin; implements core's [`Channel`].
///
/// Made by [`LapinConnection::open_channel`](crate::LapinConnection).
/// [`Channel::events`] does the channel's bookkeeping as it is polled: it takes
/// the confirms lapin resolved, the deliveries of its consumers and the closure,
/// so lapin wakes the reader of the stream directly (no task in between: a
/// hand-over through a task cost a wake-up per confirm). Until it is polled,
/// confirms and deliveries wait in lapin; take the stream right away and keep
/// polling it, as the contract says. It ends with the channel, or when this value
/// is dropped (lapin then closes the channel); a second call to `events` gets an
/// empty stream.
///
/// `publish` returns once lapin has queued the message's frames (in call order,
/// numbered for its confirm); the events stream waits for lapin to write them and
/// for the broker's confirm, and reports a failed write as the channel's end.
/// lapin holds its writes while the broker has the connection blocked; the core
/// sends nothing on a blocked connection.
pub struct LapinChannel {
    // In an Arc: each publish's write is awaited by a 'static future that holds
    // the channel (cloning a lapin::Channel costs a dozen reference counts).
    channel: Arc<lapin::Channel>,
    shared: Arc<ChannelShared>,
    // Publishes are numbered in the order they reach lapin; the lock keeps that order
    // equal to lapin's (and so the broker's) even if calls overlap.
    publish_seq: futures::lock::Mutex<u64>,
    /// `events` was called: the stream (its bookkeeping made then) is out.
    events_taken: AtomicBool,
}

impl std::fmt::Debug for LapinChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapinChannel")
            .field("id", &self.channel.id())
            .field("status", self.channel.status())
            .finish()
    }
}

/// What the channel's owner and its connection share with its events stream.
pub(crate) struct ChannelShared {
    status: ChannelStatus,
    /// The closure and the consumers, under one lock (none of them is on the
    /// publish path).
    control: Mutex<Control>,
    /// `close()` was called here or on the connection: whatever lapin reports next
    /// is the consequence, so it is reported as `ClosedByClient`.
    client_closing: AtomicBool,
    /// Confirms of publishes the events stream has not taken yet.
    incoming: Mutex<Incoming>,
    /// The `LapinChannel` was dropped: nobody is listening for the rest.
    owner_gone: AtomicBool,
    /// The events stream was dropped: nothing takes the commands.
    pump_gone: AtomicBool,
    waker: AtomicWaker,
}

/// What [`ChannelShared::control`] guards. Everything in it is empty on an idle
/// channel, so it holds no allocation.
#[derive(Default)]
struct Control {
    /// Whether a closure is due or done, and why.
    closure: Closure,
    /// Consumer tags we cancelled: the end of their streams is not a broker
    /// cancel. A handful at most, so a `Vec`.
    cancelled: Vec<String>,
    /// Consumers started and not yet taken by the events stream (a `Vec` here,
    /// not a channel: an idle channel then holds nothing for them).
    commands: Vec<Command>,
}

/// The channel's closure, as the events stream sees it.
#[derive(Default)]
enum Closure {
    #[default]
    Open,
    /// The channel must report `Closed` with this error (set by the connection's
    /// task, or by our own close; the first request wins). The events stream
    /// reports it after draining what lapin already resolved, so no ack that
    /// arrived before the close is lost.
    Requested(TransportError),
    /// Reported; returned by calls made after that.
    Reported(TransportError),
}

impl Control {
    /// Takes a requested closure, leaving the others.
    fn take_request(&mut self) -> Option<TransportError> {
        match std::mem::take(&mut self.closure) {
            Closure::Requested(error) => Some(error),
            other => {
                self.closure = other;
                None
            }
        }
    }

    /// Forgets `tag` as cancelled by us; whether it was.
    fn uncancel(&mut self, tag: &str) -> bool {
        let at = self.cancelled.iter().position(|t| t == tag);
        if let Some(at) = at {
            self.cancelled.swap_remove(at);
        }
        at.is_some()
    }
}

/// Confirms handed from `publish` to the events stream without waking it: the
/// publish polls lapin's future once with the stream's waker, so lapin wakes the
/// task when its write is done; the stream takes the list on every turn. Only a
/// confirm already resolved, or a task that has not run yet, costs a wake-up.
/// Waking the task once per publish was the adapter's largest cost against raw
/// lapin (about twice its CPU per message).
#[derive(Default)]
struct Incoming {
    confirms: Vec<ConfirmFuture>,
    /// The waker of the events stream's reader, from its last turn.
    task: Option<std::task::Waker>,
}

type ConfirmFuture = BoxFuture<'static, Resolved>;

impl ChannelShared {
    /// Asks the events stream to report `Closed(error)` (first request wins).
    pub(crate) fn request_close(&self, error: TransportError) {
        let mut control = lock(&self.control);
        if matches!(control.closure, Closure::Open) {
            control.closure = Closure::Requested(error);
        }
        drop(control);
        self.waker.wake();
    }

    /// Marks the channel as closing on our request.
    pub(crate) fn client_closing(&self) {
        self.client_closing.store(true, Ordering::SeqCst);
    }

    /// Whether lapin still considers the channel open.
    pub(crate) fn is_open(&self) -> bool {
        self.status.connected()
    }

    fn closed_error(&self) -> Option<TransportError> {
        match &lock(&self.control).closure {
            Closure::Reported(error) => Some(error.clone()),
            _ => None,
        }
    }
}

enum Command {
    Consume(String, lapin::Consumer),
}

impl LapinChannel {
    /// Wraps a freshly opened lapin channel; its events are turned into
    /// [`ChannelEvent`]s as the driver polls `events` (no task of its own).
    pub(crate) fn start(channel: lapin::Channel) -> LapinChannel {
        let shared = Arc::new(ChannelShared {
            status: channel.status().clone(),
            control: Mutex::new(Control::default()),
            client_closing: AtomicBool::new(false),
            incoming: Mutex::new(Incoming::default()),
            owner_gone: AtomicBool::new(false),
            pump_gone: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        LapinChannel {
            channel: Arc::new(channel),
            shared,
            publish_seq: futures::lock::Mutex::new(0),
            events_taken: AtomicBool::new(false),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<ChannelShared> {
        &self.shared
    }

    /// The lapin channel, for what this adapter does not cover.
    ///
    /// Closing it, consuming or publishing through it bypasses the event stream:
    /// use it for reads (status, id) and extensions only.
    pub fn lapin(&self) -> &lapin::Channel {
        &self.channel
    }

    /// Maps a lapin error from a call on this channel. A call on a channel that is
    /// already closed reports why it closed, not lapin's "invalid state".
    fn error(&self, error: lapin::Error) -> TransportError {
        if is_state_error(&error)
            && let Some(closed) = self.shared.closed_error()
        {
            return closed;
        }
        map_error(&error)
    }

    fn send(&self, command: Command) -> Result<(), TransportError> {
        if self.shared.pump_gone.load(Ordering::SeqCst) {
            return Err(self.shared.closed_error().unwrap_or_else(|| {
                TransportError::Protocol("the channel's event task has stopped".into())
            }));
        }
        lock(&self.shared.control).commands.push(command);
        self.shared.waker.wake();
        Ok(())
    }
    /// Numbers and queues a publish on a channel in confirm mode (`seq` is the
    /// held sequence lock): the frames are queued by lapin's first poll, the rest
    /// of the write and the confirm go to the events stream.
    fn publish_confirmed(
        &self,
        seq: &mut u64,
        parts: PublishParts,
        message: &Message,
    ) -> Result<(), TransportError> {
        let channel = Arc::clone(&self.channel);
        let payload = message.payload.clone();
        let number = *seq + 1;
        // One boxed future per publish: the write, then the confirm. lapin's
        // first poll of basic_publish queues the frames and numbers the confirm;
        // the rest of it waits until lapin's I/O loop has written them. That
        // wait goes to the events stream with the confirm, so the next publish
        // need not wait for it: one wake-up of the caller per written frame was
        // the 1x1 client's largest cost against raw lapin.
        let mut confirm: ConfirmFuture = Box::pin(async move {
            match channel
                .basic_publish(
                    parts.exchange,
                    parts.routing_key,
                    parts.options,
                    &payload,
                    PublishParts::properties(parts.properties),
                )
                .await
            {
                Ok(confirm) => Resolved {
                    seq: number,
                    queued: true,
                    result: confirm.await,
                },
                Err(e) => Resolved {
                    seq: number,
                    queued: false,
                    result: Err(e),
                },
            }
        });
        // The first poll is made with the stream's waker, so that lapin wakes
        // the stream's reader when the write (then the confirm) is done. The
        // task takes the list on every turn; only a confirm already resolved,
        // or a task that has not run yet, costs it a wake-up.
        let mut incoming = lock(&self.shared.incoming);
        let first = match &incoming.task {
            Some(task) => confirm.poll_unpin(&mut Context::from_waker(task)),
            None => confirm.poll_unpin(&mut Context::from_waker(futures::task::noop_waker_ref())),
        };
        let wake = match first {
            // not queued: nothing was numbered
            Poll::Ready(Resolved {
                queued: false,
                result: Err(e),
                ..
            }) => {
                drop(incoming);
                return Err(self.error(e));
            }
            Poll::Ready(resolved) => {
                *seq = number;
                incoming.confirms.push(Box::pin(future::ready(resolved)));
                true
            }
            Poll::Pending => {
                *seq = number;
                incoming.confirms.push(confirm);
                incoming.task.is_none()
            }
        };
        drop(incoming);
        if wake {
            self.shared.waker.wake();
        }
        Ok(())
    }
}

/// A publish's end: its number, whether lapin queued it, and its confirm (or
/// why there is none).
struct Resolved {
    seq: u64,
    queued: bool,
    result: lapin::Result<Confirmation>,
}

impl Drop for LapinChannel {
    fn drop(&mut self) {
        self.shared.owner_gone.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.shared.pump_gone.store(true, Ordering::SeqCst);
    }
}

/// What lapin's `basic_publish` takes for a message; names and properties checked.
///
/// The properties are boxed, and only when set: the parts are moved into the
/// boxed write-then-confirm future of every publish, where an inline
/// `BasicProperties` (~300 bytes, mostly `None`s) would be copied and carried
/// beside lapin's own copies for the life of the publish.
struct PublishParts {
    exchange: ShortString,
    routing_key: ShortString,
    options: BasicPublishOptions,
    properties: Option<Box<lapin::BasicProperties>>,
}

impl PublishParts {
    fn of(message: &Message) -> Result<PublishParts, TransportError> {
        Ok(PublishParts {
            exchange: short("exchange name", &message.exchange)?,
            routing_key: short("routing key", &message.routing_key)?,
            options: BasicPublishOptions {
                mandatory: message.mandatory,
                immediate: false,
            },
            // most messages set no property: nothing to convert or check
            properties: if message.properties.is_set() {
                Some(Box::new(convert::to_lapin_properties(&message.properties)?))
            } else {
                None
            },
        })
    }

    fn properties(properties: Option<Box<lapin::BasicProperties>>) -> lapin::BasicProperties {
        properties.map_or_else(lapin::BasicProperties::default, |boxed| *boxed)
    }
}

#[async_trait]
impl Channel for LapinChannel {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        if self.events_taken.swap(true, Ordering::SeqCst) {
            return stream::empty().boxed();
        }
        Box::pin(Pump {
            shared: Arc::clone(&self.shared),
            confirms: None,
            resolved: Vec::new(),
            consumers: None,
            ready: VecDeque::new(),
            ended: false,
            confirm_events: ConfirmEvents::default(),
        })
    }

    async fn confirm_select(&self) -> Result<(), TransportError> {
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.error(e))
    }

    async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError> {
        self.channel
            .basic_qos(prefetch_count, BasicQosOptions { global: false })
            .await
            .map_err(|e| self.error(e))
    }

    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        match op {
            TopologyOp::DeclareExchange(decl) => {
                let name = short("exchange name", &decl.name)?;
                let kind = convert::exchange_kind(&decl.kind)?;
                check_table("an exchange argument", &decl.arguments)?;
                let options = ExchangeDeclareOptions {
                    passive: false,
                    durable: decl.durable,
                    auto_delete: decl.auto_delete,
                    internal: decl.internal,
                    nowait: false,
                };
                self.channel
                    .exchange_declare(name, kind, options, decl.arguments.clone())
                    .await
                    .map_err(|e| self.error(e))?;
            }
            TopologyOp::DeleteExchange { name } => {
                let name = short("exchange name", name)?;
                self.channel
                    .exchange_delete(name, ExchangeDeleteOptions::default())
                    .await
                    .map_err(|e| self.error(e))?;
            }
            TopologyOp::DeclareQueue(decl) => {
                let name = short("queue name", &decl.name)?;
                check_table("a queue argument", &decl.arguments)?;
                let options = QueueDeclareOptions {
                    passive: false,
                    durable: decl.durable,
                    exclusive: decl.exclusive,
                    auto_delete: decl.auto_delete,
                    nowait: false,
                };
                let queue = self
                    .channel
                    .queue_declare(name, options, decl.arguments.clone())
                    .await
                    .map_err(|e| self.error(e))?;
                return Ok(TopologyOutcome::Queue(QueueInfo {
                    name: queue.name().to_string(),
                    message_count: queue.message_count(),
                    consumer_count: queue.consumer_count(),
                }));
            }
            TopologyOp::DeleteQueue { name } => {
                let name = short("queue name", name)?;
                let message_count = self
                    .channel
                    .queue_delete(name, QueueDeleteOptions::default())
                    .await
                    .map_err(|e| self.error(e))?;
                return Ok(TopologyOutcome::QueueDeleted { message_count });
            }
            TopologyOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let (queue, exchange) = (
                    short("queue name", queue)?,
                    short("exchange name", exchange)?,
                );
                let routing_key = short("routing key", routing_key)?;
                check_table("a binding argument", arguments)?;
                self.channel
                    .queue_bind(
                        queue,
                        exchange,
                        routing_key,
                        QueueBindOptions::default(),
                        arguments.clone(),
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
            TopologyOp::UnbindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let (queue, exchange) = (
                    short("queue name", queue)?,
                    short("exchange name", exchange)?,
                );
                let routing_key = short("routing key", routing_key)?;
                check_table("a binding argument", arguments)?;
                self.channel
                    .queue_unbind(queue, exchange, routing_key, arguments.clone())
                    .await
                    .map_err(|e| self.error(e))?;
            }
            TopologyOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let destination = short("exchange name", destination)?;
                let source = short("exchange name", source)?;
                let routing_key = short("routing key", routing_key)?;
                check_table("a binding argument", arguments)?;
                self.channel
                    .exchange_bind(
                        destination,
                        source,
                        routing_key,
                        ExchangeBindOptions::default(),
                        arguments.clone(),
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
            TopologyOp::UnbindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let destination = short("exchange name", destination)?;
                let source = short("exchange name", source)?;
                let routing_key = short("routing key", routing_key)?;
                check_table("a binding argument", arguments)?;
                self.channel
                    .exchange_unbind(
                        destination,
                        source,
                        routing_key,
                        ExchangeUnbindOptions::default(),
                        arguments.clone(),
                    )
                    .await
                    .map_err(|e| self.error(e))?;
            }
            op => return Err(op.unsupported()),
        }
        Ok(TopologyOutcome::Done)
    }

    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let parts = PublishParts::of(message)?;
        let mut seq = self.publish_seq.lock().await;
        if !self.channel.status().confirm() {
            // not the core's way (it always selects confirms): no confirm to hand over
            self.channel
                .basic_publish(
                    parts.exchange,
                    parts.routing_key,
                    parts.options,
                    &message.payload,
                    PublishParts::properties(parts.properties),
                )
                .await
                .map_err(|e| self.error(e))?;
            return Ok(());
        }
        self.publish_confirmed(&mut seq, parts, message)
    }

    /// `publish` without its boxed future: everything after the sequence lock is
    /// synchronous already (lapin queues the frames on the first poll).
    fn try_publish(&self, message: &Message) -> Option<Result<(), TransportError>> {
        let parts = PublishParts::of(message).ok()?;
        let mut seq = self.publish_seq.try_lock()?;
        if !self.channel.status().confirm() {
            return None;
        }
        Some(self.publish_confirmed(&mut seq, parts, message))
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: &ConsumeOptions,
    ) -> Result<(), TransportError> {
        let queue = short("queue name", queue)?;
        let tag = short("consumer tag", consumer_tag)?;
        check_table("a consumer argument", &options.arguments)?;
        if let Some(prefetch) = options.prefetch {
            self.qos(prefetch).await?;
        }
        let lapin_options = BasicConsumeOptions {
            no_local: false,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            nowait: false,
        };
        // A tag we cancelled before may be reused: its new stream's end is news again.
        lock(&self.shared.control).uncancel(consumer_tag);
        let consumer = self
            .channel
            .basic_consume(queue, tag, lapin_options, options.arguments.clone())
            .await
            .map_err(|e| self.error(e))?;
        self.send(Command::Consume(consumer.tag().to_string(), consumer))
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError> {
        let tag = short("consumer tag", consumer_tag)?;
        {
            let mut control = lock(&self.shared.control);
            if !control.cancelled.iter().any(|t| t == consumer_tag) {
                control.cancelled.push(consumer_tag.to_owned());
            }
        }
        let result = self
            .channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
        result.map_err(|e| {
            lock(&self.shared.control).uncancel(consumer_tag);
            self.error(e)
        })
    }

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| self.error(e))
    }

    async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TransportError> {
        self.channel
            .basic_nack(delivery_tag, BasicNackOptions { multiple, requeue })
            .await
            .map_err(|e| self.error(e))
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError> {
        self.channel
            .basic_reject(delivery_tag, BasicRejectOptions { requeue })
            .await
            .map_err(|e| self.error(e))
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.shared.client_closing();
        let result = self.channel.close(200, "OK".into()).await;
        self.shared.request_close(TransportError::ClosedByClient);
        match result {
            Ok(()) => Ok(()),
            // Already closed (by the broker, or with its connection): nothing to do.
            Err(e) if is_state_error(&e) => Ok(()),
            Err(e) => Err(map_error(&e)),
        }
    }
}

/// What a consumer's stream yields, tagged with the consumer.
enum ConsumerItem {
    Delivery(String, Box<lapin::Result<lapin::message::Delivery>>),
    End(String),
}

/// The channel's bookkeeping, run by whoever polls its events stream: the
/// stream itself, made by `events`.
struct Pump {
    shared: Arc<ChannelShared>,
    /// Every publish not resolved yet. Polled as a set: the broker may confirm
    /// a channel's publishes out of order (a message held by a quorum queue
    /// whose node is down must not hold the confirms of later ones). Made with
    /// the first publish (an empty `FuturesUnordered` allocates: an idle
    /// channel needs none), then kept.
    confirms: Option<FuturesUnordered<ConfirmFuture>>,
    /// The confirms of a turn, kept for their capacity.
    resolved: Vec<(u64, bool)>,
    /// Made with the first consumer (an empty `SelectAll` allocates: a
    /// publishing channel needs none).
    consumers: Option<SelectAll<BoxStream<'static, ConsumerItem>>>,
    /// Events taken from lapin, not yet yielded.
    ready: VecDeque<ChannelEvent>,
    /// `Closed` is queued (or the owner is gone): nothing more comes.
    ended: bool,
    confirm_events: ConfirmEvents,
}

/// Turns confirms, as lapin resolves them, into the fewest events. lapin resolves
/// each publish's confirm on its own, also for the broker's multiple acks: a run
/// of acks that continues everything emitted so far goes out as one multiple ack
/// (as the broker sent it), one event for the client instead of one per message.
/// Nacks, and acks that come out of order, go out one by one.
#[derive(Debug, Default)]
struct ConfirmEvents {
    /// Every confirm numbered up to this one has been emitted.
    upto: u64,
    /// Confirms emitted above `upto` (resolved out of order).
    ahead: BTreeSet<u64>,
}

impl ConfirmEvents {
    /// Appends to `out` the events for `confirms` (sequence number, ack?),
    /// sorted by number.
    fn events(&mut self, confirms: &[(u64, bool)], out: &mut VecDeque<ChannelEvent>) {
        // acks first..=last, everything below them emitted before
        let mut run: Option<(u64, u64)> = None;
        for &(seq, ack) in confirms {
            if ack && seq == self.upto + 1 {
                self.advance(seq);
                run = Some((run.map_or(seq, |(first, _)| first), seq));
                continue;
            }
            if let Some((first, last)) = run.take() {
                out.push_back(ack_event(last, first < last));
            }
            out.push_back(if ack {
                ack_event(seq, false)
            } else {
                ChannelEvent::Nack {
                    delivery_tag: seq,
                    multiple: false,
                }
            });
            if seq == self.upto + 1 {
                self.advance(seq);
            } else if seq > self.upto {
                self.ahead.insert(seq);
            }
        }
        if let Some((first, last)) = run {
            out.push_back(ack_event(last, first < last));
        }
    }

    /// `seq` follows `upto`: moves it on, over what was emitted ahead.
    fn advance(&mut self, seq: u64) {
        self.upto = seq;
        while self.ahead.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }
}

/// Sorts a turn's confirms by number. lapin resolves the confirms one multiple
/// ack covers in no particular order, and a turn's confirms are most often one
/// run of numbers: a run is put in order in one pass (a number's place is its
/// distance from the least), anything else is sorted (a run of ~100 confirms
/// cost ~150 instructions per message to sort).
fn order_confirms(confirms: &mut [(u64, bool)]) {
    let mut numbers = confirms.iter().map(|&(seq, _)| seq);
    let Some(first) = numbers.next() else {
        return;
    };
    let (least, most) = numbers.fold((first, first), |(lo, hi), seq| (lo.min(seq), hi.max(seq)));
    if most - least != confirms.len() as u64 - 1 {
        confirms.sort_unstable();
        return;
    }
    for i in 0..confirms.len() {
        loop {
            let at = (confirms[i].0 - least) as usize;
            if at == i {
                break;
            }
            // a number twice (never from lapin): not a run after all
            if confirms[at].0 == confirms[i].0 {
                confirms.sort_unstable();
                return;
            }
            // each swap puts one confirm in its place for good
            confirms.swap(i, at);
        }
    }
}

fn ack_event(delivery_tag: u64, multiple: bool) -> ChannelEvent {
    ChannelEvent::Ack {
        delivery_tag,
        multiple,
    }
}

impl Stream for Pump {
    type Item = ChannelEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChannelEvent>> {
        self.get_mut().next_event(cx)
    }
}

impl Pump {
    fn next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<ChannelEvent>> {
        if self.ready.is_empty() && !self.ended && self.poll_lapin(cx).is_ready() {
            self.ended = true;
        }
        match self.ready.pop_front() {
            Some(event) => Poll::Ready(Some(event)),
            None if self.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// Drains commands, confirms and deliveries, then reports a closure if one is
    /// due. Ready once the channel's last event is queued (or its owner is gone).
    fn poll_lapin(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.waker.register(cx.waker());
        let commands = std::mem::take(&mut lock(&self.shared.control).commands);
        for command in commands {
            self.add(command);
        }
        // The LapinChannel was dropped: nobody is listening for the rest.
        if self.shared.owner_gone.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.take_incoming(cx);
        let mut failure = self.drain_confirms(cx);
        while let Some(Poll::Ready(Some(item))) =
            self.consumers.as_mut().map(|c| c.poll_next_unpin(cx))
        {
            match item {
                ConsumerItem::Delivery(tag, result) => match *result {
                    Ok(d) => self.emit(ChannelEvent::Delivery(Box::new(convert::delivery(tag, d)))),
                    // lapin errors a consumer only when its channel or connection dies.
                    Err(e) => {
                        failure.get_or_insert(map_error(&e));
                    }
                },
                ConsumerItem::End(tag) => self.consumer_ended(tag),
            }
        }
        let close = failure.or_else(|| lock(&self.shared.control).take_request());
        match close {
            Some(error) => {
                let error = if self.shared.client_closing.load(Ordering::SeqCst) {
                    TransportError::ClosedByClient
                } else {
                    error
                };
                lock(&self.shared.control).closure = Closure::Reported(error.clone());
                self.emit(ChannelEvent::Closed(error));
                Poll::Ready(())
            }
            None => Poll::Pending,
        }
    }

    /// Takes the confirms `publish` handed over since the last turn, and leaves
    /// the reader's waker for the next ones.
    fn take_incoming(&mut self, cx: &Context<'_>) {
        let confirms = {
            let mut incoming = lock(&self.shared.incoming);
            if !incoming
                .task
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                incoming.task = Some(cx.waker().clone());
            }
            std::mem::take(&mut incoming.confirms)
        };
        if !confirms.is_empty() {
            self.confirms
                .get_or_insert_with(FuturesUnordered::new)
                .extend(confirms);
        }
    }

    fn add(&mut self, command: Command) {
        match command {
            Command::Consume(tag, consumer) => {
                let end = tag.clone();
                let items = consumer
                    .map(move |r| ConsumerItem::Delivery(tag.clone(), Box::new(r)))
                    .chain(stream::once(async move { ConsumerItem::End(end) }));
                self.consumers
                    .get_or_insert_with(SelectAll::new)
                    .push(items.boxed());
            }
        }
    }

    /// Emits every confirm lapin has resolved, oldest first: returns first, then
    /// acks and nacks in sequence order. Returns the error that failed a
    /// confirm, if any (lapin fails pending confirms only when the channel or
    /// connection dies).
    ///
    /// Every resolved publish is taken, in the order lapin resolved them (the
    /// broker's, which is not always publish order); `ConfirmEvents` sorts
    /// what one turn took.
    ///
    /// lapin hands a returned message to the first confirm it resolves after the
    /// `basic.return`; with a multiple ack that may be any of the covered numbers.
    /// Draining everything ready before emitting keeps the `Return` ahead of all the
    /// acks resolved by the same frame.
    fn drain_confirms(&mut self, cx: &mut Context<'_>) -> Option<TransportError> {
        let mut failure = None;
        let mut returns = Vec::new();
        let Some(pending) = self.confirms.as_mut() else {
            return failure;
        };
        let mut confirms = std::mem::take(&mut self.resolved);
        while let Poll::Ready(Some(Resolved { seq, result, .. })) = pending.poll_next_unpin(cx) {
            match result {
                Ok(Confirmation::Ack(returned)) => {
                    returns.extend(returned);
                    confirms.push((seq, true));
                }
                Ok(Confirmation::Nack(returned)) => {
                    returns.extend(returned);
                    confirms.push((seq, false));
                }
                Ok(Confirmation::NotRequested) => {}
                Err(e) => {
                    failure.get_or_insert(map_error(&e));
                }
            }
        }
        for r in returns {
            self.emit(ChannelEvent::Return(Box::new(convert::returned(r))));
        }
        order_confirms(&mut confirms);
        self.confirm_events.events(&confirms, &mut self.ready);
        confirms.clear();
        self.resolved = confirms;
        failure
    }

    /// A consumer's stream ended. lapin ends it without an error when the broker
    /// cancels the consumer (its queue was deleted), when we cancel it, and when
    /// the channel closes: only the first is news.
    fn consumer_ended(&mut self, tag: String) {
        if lock(&self.shared.control).uncancel(&tag) {
            return;
        }
        if self.shared.is_open() && !self.shared.client_closing.load(Ordering::SeqCst) {
            self.emit(ChannelEvent::ConsumerCancelled { consumer_tag: tag });
        }
    }

    fn emit(&mut self, event: ChannelEvent) {
        self.ready.push_back(event);
    }
}

/// Locks a mutex, ignoring poisoning: every value guarded here stays valid even if
/// a holder panicked.
pub(crate) use amqp_rebound_core::transport::support::lock;

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(delivery_tag: u64, multiple: bool) -> ChannelEvent {
        ack_event(delivery_tag, multiple)
    }

    impl ConfirmEvents {
        fn all(&mut self, confirms: &[(u64, bool)]) -> Vec<ChannelEvent> {
            let mut out = VecDeque::new();
            self.events(confirms, &mut out);
            out.into()
        }
    }

    #[test]
    fn confirms_are_put_in_order_whether_or_not_they_are_a_run() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for case in 0..2_000 {
            let len = next(40) as usize;
            let start = 1 + next(1_000);
            let mut confirms: Vec<(u64, bool)> =
                (0..len as u64).map(|k| (start + k, next(5) != 0)).collect();
            match case % 3 {
                // a gap: no longer a run
                1 if len > 1 => confirms[0].0 += len as u64 + next(3),
                // a number twice
                2 if len > 1 => confirms[0].0 = confirms[len - 1].0,
                _ => {}
            }
            for i in (1..len).rev() {
                confirms.swap(i, next(i as u64 + 1) as usize);
            }
            let mut expected = confirms.clone();
            expected.sort_unstable();
            let mut ordered = confirms.clone();
            order_confirms(&mut ordered);
            assert_eq!(
                ordered.iter().map(|c| c.0).collect::<Vec<_>>(),
                expected.iter().map(|c| c.0).collect::<Vec<_>>(),
                "case {case}: {confirms:?}"
            );
            let mut pairs = ordered.clone();
            pairs.sort_unstable();
            assert_eq!(pairs, expected, "case {case}: the same confirms");
        }
    }

    #[test]
    fn a_run_of_acks_in_order_is_one_multiple_ack() {
        let mut c = ConfirmEvents::default();
        assert_eq!(
            c.all(&[(1, true), (2, true), (3, true)]),
            vec![ack(3, true)]
        );
        assert_eq!(c.all(&[(4, true)]), vec![ack(4, false)]);
        assert_eq!(c.all(&[(5, true), (6, true)]), vec![ack(6, true)]);
    }

    #[test]
    fn a_gap_a_nack_or_an_ack_out_of_order_goes_alone() {
        let mut c = ConfirmEvents::default();
        // 2 is not resolved yet: 3 and 4 cannot be covered by a multiple ack
        assert_eq!(
            c.all(&[(1, true), (3, true), (4, true)]),
            vec![ack(1, false), ack(3, false), ack(4, false)]
        );
        // 2 arrives: a single ack (3 and 4 went out already)
        assert_eq!(c.all(&[(2, true)]), vec![ack(2, false)]);
        // everything up to 4 is out: 5..6 is a run again; a nack breaks it
        assert_eq!(
            c.all(&[(5, true), (6, true), (7, false), (8, true), (9, true)]),
            vec![
                ack(6, true),
                ChannelEvent::Nack {
                    delivery_tag: 7,
                    multiple: false
                },
                ack(9, true)
            ]
        );
    }

    #[test]
    fn a_multiple_ack_never_covers_an_unresolved_number() {
        // every order of 1..=6 in two batches: replaying the events as the core
        // reads them (a multiple ack covers every number up to its tag) must
        // confirm exactly the numbers resolved so far
        let orders = [
            [3, 1, 2, 6, 4, 5],
            [6, 5, 4, 3, 2, 1],
            [2, 4, 6, 1, 3, 5],
            [1, 2, 3, 4, 5, 6],
        ];
        for order in orders {
            for split in 0..=order.len() {
                let mut c = ConfirmEvents::default();
                let mut confirmed = BTreeSet::new();
                let mut resolved = BTreeSet::new();
                for batch in [&order[..split], &order[split..]] {
                    let mut sorted: Vec<(u64, bool)> = batch.iter().map(|&s| (s, true)).collect();
                    sorted.sort_unstable();
                    resolved.extend(batch.iter().copied());
                    for event in c.all(&sorted) {
                        let ChannelEvent::Ack {
                            delivery_tag,
                            multiple,
                        } = event
                        else {
                            panic!("only acks here");
                        };
                        let first = if multiple { 1 } else { delivery_tag };
                        confirmed.extend(first..=delivery_tag);
                    }
                    assert_eq!(confirmed, resolved, "order {order:?} split {split}");
                }
            }
        }
    }
}
