//! [`AmqprsChannel`]: one amqprs channel, its [`ChannelCallback`] (which passes
//! confirms and returns straight to the [`ChannelEvent`] stream), and the task that
//! adds cancels, deliveries and the channel's end to it.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use amqp_rebound_core::TransportError;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::topology::{ConsumeOptions, TopologyOp};
use amqp_rebound_core::transport::{Channel, ChannelEvent, QueueInfo, TopologyOutcome};
use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel as AmqprsChan,
    ConfirmSelectArguments, ConsumerMessage, ExchangeBindArguments, ExchangeDeclareArguments,
    ExchangeDeleteArguments, ExchangeUnbindArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments, QueueUnbindArguments,
};
use amqprs::error::Error as AmqprsError;
use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::{self, BoxStream};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc as tokio_mpsc, watch};

use crate::connection::{ConnectionShared, InRuntime, lock, run_to_end};
use crate::convert::{self, checked, map_error, short, to_table};

/// One AMQP channel over amqprs; implements core's [`Channel`].
///
/// Made by [`AmqprsConnection::open_channel`](crate::AmqprsConnection). The
/// channel's callback feeds [`Channel::events`] with confirms and returns, a task on
/// the tokio runtime with deliveries, cancels and the channel's end (after every
/// confirm); it ends with the channel. Events wait in an
/// unbounded queue until they are read, so take the stream right away, as the
/// contract says; a second call to `events` gets an empty stream.
///
/// `publish` returns once amqprs has queued the message for its writer task (a
/// bounded queue shared by the connection): while the broker does not read from
/// the socket, publishes wait.
pub struct AmqprsChannel {
    channel: InRuntime<AmqprsChan>,
    shared: Arc<ChannelShared>,
    commands: mpsc::UnboundedSender<Command>,
    events: Mutex<Option<tokio_mpsc::UnboundedReceiver<ChannelEvent>>>,
}

impl std::fmt::Debug for AmqprsChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqprsChannel")
            .field("id", &self.channel.get().channel_id())
            .field("open", &self.channel.get().is_open())
            .finish()
    }
}

/// What the channel, its callback and its event task share.
struct ChannelShared {
    /// The broker's `channel.close`, recorded by the callback before amqprs fails
    /// the calls waiting on the channel.
    broker_close: Mutex<Option<TransportError>>,
    /// `close()` was called (here, or the value was dropped).
    client_closing: AtomicBool,
    /// Set after `broker_close` or `closed` got a value: the check before every
    /// write reads this one atomic while the channel is open, not two locks.
    ended: AtomicBool,
    /// Orders this channel's fire-and-forget writes (publish, ack, nack, reject)
    /// with the broker's `channel.close`. A write counts itself in before its
    /// open check and out once amqprs has queued the frame; the close callback
    /// records the close (and `ended`), then waits until no write is counted in,
    /// and amqprs queues `close-ok` only after the callback has returned. So a
    /// write that passed the check is queued before `close-ok` (the broker
    /// discards it: the channel is closing), and none is queued after it (the
    /// broker would close the whole connection with 504 CHANNEL_ERROR): every
    /// access is `SeqCst`, so a write that missed `ended` was counted in before
    /// the callback looked. (A `tokio::sync::RwLock` did this before; its release
    /// takes a mutex, on every publish.)
    writes: AtomicUsize,
    /// Told when the last counted write leaves after the channel `ended`.
    writes_drained: Notify,
    /// Why the channel closed, once the event task has decided.
    closed: watch::Sender<Option<TransportError>>,
    connection: Arc<ConnectionShared>,
}

impl ChannelShared {
    /// Why the channel is closed or closing, if anything says so yet.
    fn known_reason(&self) -> Option<TransportError> {
        if !self.ended.load(Ordering::SeqCst) {
            return self
                .client_closing
                .load(Ordering::SeqCst)
                .then_some(TransportError::ClosedByClient);
        }
        if let Some(closed) = self.closed.borrow().clone() {
            return Some(closed);
        }
        if let Some(error) = lock(&self.broker_close).clone() {
            return Some(error);
        }
        if self.client_closing.load(Ordering::SeqCst) {
            return Some(TransportError::ClosedByClient);
        }
        None
    }

    /// Waits until the event task has decided why the channel closed. Only called
    /// once amqprs has given up on the channel, so the wait is short.
    async fn wait_closed(&self) -> TransportError {
        let mut closed = self.closed.subscribe();
        match closed.wait_for(Option::is_some).await {
            Ok(error) => error.clone().unwrap_or_else(task_stopped),
            Err(_) => task_stopped(),
        }
    }

    /// Counts a write in until the pass is dropped (see [`ChannelShared::writes`]).
    fn pass(&self) -> WritePass<'_> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        WritePass(self)
    }

    /// Waits until no write that may have missed `ended` is left.
    async fn writes_drained(&self) {
        loop {
            let drained = self.writes_drained.notified();
            let mut drained = std::pin::pin!(drained);
            // registered before the count is read: a last write leaving after
            // the read is heard
            drained.as_mut().enable();
            if self.writes.load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }

    fn decide(&self, error: TransportError) {
        self.closed.send_if_modified(|closed| {
            if closed.is_some() {
                return false;
            }
            *closed = Some(error);
            true
        });
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// One write between its open check and amqprs queueing its frame.
struct WritePass<'a>(&'a ChannelShared);

impl Drop for WritePass<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        if shared.writes.fetch_sub(1, Ordering::SeqCst) == 1 && shared.ended.load(Ordering::SeqCst)
        {
            shared.writes_drained.notify_waiters();
        }
    }
}

fn task_stopped() -> TransportError {
    TransportError::Protocol("the channel's event task has stopped".into())
}

enum Command {
    /// A consumer's deliveries, from `basic_consume_rx`.
    Consumer(String, tokio_mpsc::UnboundedReceiver<ConsumerMessage>),
}

impl AmqprsChannel {
    /// Wraps a freshly opened amqprs channel: registers the callback and starts the
    /// event task on `handle`.
    pub(crate) async fn start(
        channel: AmqprsChan,
        handle: Handle,
        connection: Arc<ConnectionShared>,
    ) -> Result<AmqprsChannel, TransportError> {
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(ChannelShared {
            broker_close: Mutex::new(None),
            client_closing: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            writes_drained: Notify::new(),
            closed,
            connection,
        });
        let channel = InRuntime::new(channel, handle.clone());
        let (raw_tx, raw_rx) = mpsc::unbounded();
        // tokio's queue allocates a block per 32 events; futures' a node per event
        let (event_tx, event_rx) = tokio_mpsc::unbounded_channel();
        let callback = Callback {
            shared: shared.clone(),
            raw: raw_tx,
            events: event_tx.clone(),
        };
        if channel.get().register_callback(callback).await.is_err() {
            // The dispatcher is already gone.
            return Err(match shared.connection.closed() {
                Some(closed) => closed,
                None if shared.connection.reader_ended() => shared.connection.wait_closed().await,
                None => TransportError::Protocol(
                    "amqprs stopped the channel as soon as it opened".into(),
                ),
            });
        }
        let (command_tx, command_rx) = mpsc::unbounded();
        let pump = Pump {
            shared: shared.clone(),
            raw: raw_rx,
            commands: command_rx,
            consumers: Vec::new(),
            events: Some(event_tx),
        };
        handle.spawn(pump.run());
        Ok(AmqprsChannel {
            channel,
            shared,
            commands: command_tx,
            events: Mutex::new(Some(event_rx)),
        })
    }

    /// The amqprs channel, for what this adapter does not cover.
    ///
    /// Closing it, consuming or publishing through it bypasses the event stream:
    /// use it for reads (id, state) and extensions only.
    pub fn amqprs(&self) -> &AmqprsChan {
        self.channel.get()
    }

    fn channel(&self) -> &AmqprsChan {
        self.channel.get()
    }

    /// Fails fast on a channel that is closed or closing. amqprs does not check
    /// before writing, and a frame on a channel the broker has closed is a
    /// connection error (504) that would take every other channel down too.
    async fn check_open(&self) -> Result<(), TransportError> {
        if let Some(reason) = self.shared.known_reason() {
            return Err(reason);
        }
        if !self.channel().is_open() {
            return Err(self.shared.wait_closed().await);
        }
        Ok(())
    }

    /// Runs an amqprs request on this channel: refused at once when the channel is
    /// closed or closing ([`check_open`](Self::check_open)), its error mapped by
    /// [`error`](Self::error). (`request` makes the request from a handle of the
    /// channel: nothing is sent before the check passes.) It runs to its end in a
    /// task of its own ([`run_to_end`]).
    async fn call<T, F>(&self, request: impl FnOnce(AmqprsChan) -> F) -> Result<T, TransportError>
    where
        F: std::future::Future<Output = Result<T, AmqprsError>> + Send + 'static,
        T: Send + 'static,
    {
        self.check_open().await?;
        let task = request(self.channel().clone());
        match run_to_end(self.channel.handle(), "running a request", task).await? {
            Ok(value) => Ok(value),
            Err(e) => Err(self.error(e).await),
        }
    }

    /// [`check_open`](Self::check_open) for a fire-and-forget write: also holds
    /// off the broker's `channel.close` (see [`ChannelShared::writes`]) until the
    /// returned pass is dropped, right after amqprs has queued the frame.
    async fn writing(&self) -> Result<WritePass<'_>, TransportError> {
        let writing = self.shared.pass();
        if let Some(reason) = self.shared.known_reason() {
            return Err(reason);
        }
        if !self.channel().is_open() {
            // Not holding the pass while waiting for the channel's end: its
            // dispatcher may be waiting for it in the close callback.
            drop(writing);
            return Err(self.shared.wait_closed().await);
        }
        Ok(writing)
    }

    /// Maps an error from an amqprs call on this channel. A call cut short by the
    /// channel's end (amqprs reports an internal-channel error: its dispatcher or
    /// writer is gone) reports why the channel ended.
    async fn error(&self, error: AmqprsError) -> TransportError {
        if let Some(reason) = self.shared.known_reason() {
            return reason;
        }
        match error {
            AmqprsError::InternalChannelError(_) => self.shared.wait_closed().await,
            other => map_error(&other),
        }
    }
}

/// What amqprs's `basic_publish` takes for `message`; names and properties checked.
fn publish_parts(
    message: &Message,
) -> Result<(amqprs::BasicProperties, Vec<u8>, BasicPublishArguments), TransportError> {
    let mut args = BasicPublishArguments::new(
        checked("exchange name", &message.exchange)?,
        checked("routing key", &message.routing_key)?,
    );
    args.mandatory = message.mandatory;
    let properties = convert::to_properties(&message.properties)?;
    Ok((properties, message.payload.to_vec(), args))
}

impl Drop for AmqprsChannel {
    fn drop(&mut self) {
        // amqprs closes the channel when its last handle goes (see InRuntime).
        self.shared.client_closing.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Channel for AmqprsChannel {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        match lock(&self.events).take() {
            Some(mut events) => stream::poll_fn(move |cx| events.poll_recv(cx)).boxed(),
            None => stream::empty().boxed(),
        }
    }

    async fn confirm_select(&self) -> Result<(), TransportError> {
        self.call(|channel| async move {
            channel
                .confirm_select(ConfirmSelectArguments::new(false))
                .await
        })
        .await
    }

    async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError> {
        let args = BasicQosArguments::new(0, prefetch_count, false);
        self.call(|channel| async move { channel.basic_qos(args).await })
            .await
    }

    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        match op {
            TopologyOp::DeclareExchange(decl) => {
                let args = ExchangeDeclareArguments {
                    exchange: short("exchange name", &decl.name)?,
                    exchange_type: convert::exchange_kind(&decl.kind)?,
                    passive: false,
                    durable: decl.durable,
                    auto_delete: decl.auto_delete,
                    internal: decl.internal,
                    no_wait: false,
                    arguments: to_table("an exchange argument", &decl.arguments)?,
                };
                self.call(|channel| async move { channel.exchange_declare(args).await })
                    .await?;
            }
            TopologyOp::DeleteExchange { name } => {
                let args = ExchangeDeleteArguments::new(checked("exchange name", name)?);
                self.call(|channel| async move { channel.exchange_delete(args).await })
                    .await?;
            }
            TopologyOp::DeclareQueue(decl) => {
                let name = short("queue name", &decl.name)?;
                let arguments = to_table("a queue argument", &decl.arguments)?;
                let args = QueueDeclareArguments::new(&name)
                    .durable(decl.durable)
                    .exclusive(decl.exclusive)
                    .auto_delete(decl.auto_delete)
                    .arguments(arguments)
                    .finish();
                return match self
                    .call(|channel| async move { channel.queue_declare(args).await })
                    .await?
                {
                    Some((name, message_count, consumer_count)) => {
                        Ok(TopologyOutcome::Queue(QueueInfo {
                            name,
                            message_count,
                            consumer_count,
                        }))
                    }
                    // Only with no-wait, which this adapter never asks for.
                    None => Err(TransportError::Protocol(
                        "amqprs returned no queue.declare-ok".into(),
                    )),
                };
            }
            TopologyOp::DeleteQueue { name } => {
                let args = QueueDeleteArguments::new(checked("queue name", name)?);
                let message_count = self
                    .call(|channel| async move { channel.queue_delete(args).await })
                    .await?
                    .ok_or_else(|| {
                        TransportError::Protocol("amqprs returned no queue.delete-ok".into())
                    })?;
                return Ok(TopologyOutcome::QueueDeleted { message_count });
            }
            TopologyOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let args = QueueBindArguments {
                    queue: short("queue name", queue)?,
                    exchange: short("exchange name", exchange)?,
                    routing_key: short("routing key", routing_key)?,
                    no_wait: false,
                    arguments: to_table("a binding argument", arguments)?,
                };
                self.call(|channel| async move { channel.queue_bind(args).await })
                    .await?;
            }
            TopologyOp::UnbindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let args = QueueUnbindArguments {
                    queue: short("queue name", queue)?,
                    exchange: short("exchange name", exchange)?,
                    routing_key: short("routing key", routing_key)?,
                    arguments: to_table("a binding argument", arguments)?,
                };
                self.call(|channel| async move { channel.queue_unbind(args).await })
                    .await?;
            }
            TopologyOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let args = ExchangeBindArguments {
                    destination: short("exchange name", destination)?,
                    source: short("exchange name", source)?,
                    routing_key: short("routing key", routing_key)?,
                    no_wait: false,
                    arguments: to_table("a binding argument", arguments)?,
                };
                self.call(|channel| async move { channel.exchange_bind(args).await })
                    .await?;
            }
            TopologyOp::UnbindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let args = ExchangeUnbindArguments {
                    destination: short("exchange name", destination)?,
                    source: short("exchange name", source)?,
                    routing_key: short("routing key", routing_key)?,
                    no_wait: false,
                    arguments: to_table("a binding argument", arguments)?,
                };
                self.call(|channel| async move { channel.exchange_unbind(args).await })
                    .await?;
            }
            op => return Err(op.unsupported()),
        }
        Ok(TopologyOutcome::Done)
    }

    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let (properties, payload, args) = publish_parts(message)?;
        let writing = self.writing().await?;
        let sent = self
            .channel()
            .basic_publish(properties, payload, args)
            .await;
        drop(writing);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error(e).await),
        }
    }

    /// The synchronous path of `publish`: the same checks and write pass, and
    /// amqprs's `basic_publish` polled once. Its only
    /// wait is tokio's `mpsc::Sender::send` into the connection's writer, which
    /// sends nothing when dropped before it completes; so a `Pending` poll is
    /// dropped and answered `None` (nothing sent), as is anything unusual: the
    /// async path then does it, and reports it.
    fn try_publish(&self, message: &Message) -> Option<Result<(), TransportError>> {
        let (properties, payload, args) = publish_parts(message).ok()?;
        let writing = self.shared.pass();
        if self.shared.known_reason().is_some() || !self.channel().is_open() {
            return None;
        }
        let publish = self.channel().basic_publish(properties, payload, args);
        let mut publish = std::pin::pin!(publish);
        let polled = publish
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
        drop(writing);
        match polled {
            Poll::Ready(Ok(())) => Some(Ok(())),
            Poll::Ready(Err(_)) | Poll::Pending => None,
        }
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: &ConsumeOptions,
    ) -> Result<(), TransportError> {
        let mut args = BasicConsumeArguments::new(
            checked("queue name", queue)?,
            checked("consumer tag", consumer_tag)?,
        );
        args.no_ack = options.no_ack;
        args.exclusive = options.exclusive;
        args.arguments = to_table("a consumer argument", &options.arguments)?;
        if let Some(prefetch) = options.prefetch {
            self.qos(prefetch).await?;
        }
        let (tag, deliveries) = self
            .call(|channel| async move { channel.basic_consume_rx(args).await })
            .await?;
        self.commands
            .unbounded_send(Command::Consumer(tag, deliveries))
            .map_err(|_| task_stopped())
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError> {
        let args = BasicCancelArguments::new(checked("consumer tag", consumer_tag)?);
        self.call(|channel| async move { channel.basic_cancel(args).await })
            .await?;
        Ok(())
    }

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError> {
        let args = BasicAckArguments::new(delivery_tag, multiple);
        let writing = self.writing().await?;
        let sent = self.channel().basic_ack(args).await;
        drop(writing);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error(e).await),
        }
    }

    async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TransportError> {
        let args = BasicNackArguments::new(delivery_tag, multiple, requeue);
        let writing = self.writing().await?;
        let sent = self.channel().basic_nack(args).await;
        drop(writing);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error(e).await),
        }
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError> {
        let args = BasicRejectArguments::new(delivery_tag, requeue);
        let writing = self.writing().await?;
        let sent = self.channel().basic_reject(args).await;
        drop(writing);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error(e).await),
        }
    }

    async fn close(&self) -> Result<(), TransportError> {
        if self.shared.closed.borrow().is_some() {
            return Ok(());
        }
        self.shared.client_closing.store(true, Ordering::SeqCst);
        // amqprs's `close` takes the channel by value; a clone shares its state. It
        // does nothing on a channel that the broker (or the connection's end)
        // already closed. It runs to its end, like every request ([`run_to_end`]).
        let channel = self.channel().clone();
        match run_to_end(self.channel.handle(), "closing a channel", channel.close()).await? {
            Ok(()) => Ok(()),
            // The channel or its connection ended on the way: nothing is left.
            Err(AmqprsError::InternalChannelError(_)) => Ok(()),
            Err(e) => Err(map_error(&e)),
        }
    }
}

/// The channel's callback: runs on amqprs's dispatcher task for the channel.
struct Callback {
    shared: Arc<ChannelShared>,
    raw: mpsc::UnboundedSender<Raw>,
    /// Confirms and returns go straight to the events stream, in the order of
    /// the broker's frames (a return before its ack): no hand-over through the
    /// event task, which cost a wake-up per confirm. They are all sent before
    /// `Closed`: the event task emits it only after amqprs has dropped this
    /// callback.
    events: tokio_mpsc::UnboundedSender<ChannelEvent>,
}

/// What the callback passes to the event task.
enum Raw {
    Cancel(String),
}

impl Callback {
    fn send(&self, raw: Raw) {
        // The event task may be gone (the channel was dropped); then nobody listens.
        let _ = self.raw.unbounded_send(raw);
    }

    fn emit(&self, event: ChannelEvent) {
        // Nobody may listen any more (the channel was dropped).
        let _ = self.events.send(event);
    }
}

#[async_trait]
impl ChannelCallback for Callback {
    async fn close(
        &mut self,
        _channel: &AmqprsChan,
        close: amqprs::CloseChannel,
    ) -> Result<(), AmqprsError> {
        let error = TransportError::Reply {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        };
        // Recorded here, before this returns: amqprs fails the calls waiting on
        // the channel, and queues close-ok, only after that. A write that passed
        // its open check is queued first (see `ChannelShared::writes`).
        lock(&self.shared.broker_close).get_or_insert(error);
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared.writes_drained().await;
        // Ok: amqprs answers with close-ok.
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &AmqprsChan,
        cancel: amqprs::Cancel,
    ) -> Result<(), AmqprsError> {
        self.send(Raw::Cancel(cancel.consumer_tag().clone()));
        // Ok: amqprs drops the consumer and answers with cancel-ok.
        Ok(())
    }

    async fn flow(&mut self, _channel: &AmqprsChan, active: bool) -> Result<bool, AmqprsError> {
        // RabbitMQ does not send channel.flow; acknowledge what was asked.
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &AmqprsChan, ack: amqprs::Ack) {
        self.emit(ChannelEvent::Ack {
            delivery_tag: ack.delivery_tag(),
            // sic: amqprs 2.1 spells it `mutiple`.
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _channel: &AmqprsChan, nack: amqprs::Nack) {
        self.emit(ChannelEvent::Nack {
            delivery_tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }

    async fn publish_return(
        &mut self,
        _channel: &AmqprsChan,
        ret: amqprs::Return,
        basic_properties: amqprs::BasicProperties,
        content: Vec<u8>,
    ) {
        let returned = convert::returned(&ret, &basic_properties, content);
        self.emit(ChannelEvent::Return(Box::new(returned)));
    }
}

/// The channel's event task: one per channel, no task per message or consumer.
struct Pump {
    shared: Arc<ChannelShared>,
    /// From the callback; ends when amqprs drops it, i.e. when the channel's
    /// dispatcher has stopped (channel closed, connection gone, or a panic).
    raw: mpsc::UnboundedReceiver<Raw>,
    commands: mpsc::UnboundedReceiver<Command>,
    consumers: Vec<(String, tokio_mpsc::UnboundedReceiver<ConsumerMessage>)>,
    /// `None` once `Closed` is sent: the stream then ends (the callback's sender
    /// is gone already).
    events: Option<tokio_mpsc::UnboundedSender<ChannelEvent>>,
}

/// How many deliveries one consumer may hand over before the others get a turn.
const CONSUMER_BUDGET: usize = 64;

impl Pump {
    async fn run(mut self) {
        let _guard = DecideOnDrop(self.shared.clone());
        // Until the dispatcher stops (or the AmqprsChannel is dropped).
        if !poll_fn(|cx| self.poll_open(cx)).await {
            return;
        }
        // amqprs dropped every consumer's sender before the callback: what is left
        // in their queues is all there will be. Deliver it before `Closed`.
        while let Ok(Command::Consumer(tag, deliveries)) = self.commands.try_recv() {
            self.consumers.push((tag, deliveries));
        }
        let consumers = std::mem::take(&mut self.consumers);
        for (_, mut deliveries) in consumers {
            while let Ok(message) = deliveries.try_recv() {
                self.deliver(message);
            }
        }
        let error = self.reason().await;
        self.shared.decide(error.clone());
        self.emit(ChannelEvent::Closed(error));
        self.events = None;
    }

    /// Why the channel ended, in order of precedence: the broker's
    /// `channel.close`, our own `close()`, then the connection's end.
    async fn reason(&self) -> TransportError {
        if let Some(error) = lock(&self.shared.broker_close).clone() {
            return error;
        }
        if self.shared.client_closing.load(Ordering::SeqCst) {
            return TransportError::ClosedByClient;
        }
        let connection = &self.shared.connection;
        if let Some(error) = connection.closed() {
            return error;
        }
        if connection.reader_ended() {
            return connection.wait_closed().await;
        }
        TransportError::Protocol("amqprs stopped the channel's dispatcher without a reason".into())
    }

    /// Forwards everything ready. `Ready(true)`: the dispatcher has stopped;
    /// `Ready(false)`: the AmqprsChannel is gone.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            match self.commands.poll_next_unpin(cx) {
                Poll::Ready(Some(Command::Consumer(tag, deliveries))) => {
                    self.consumers.push((tag, deliveries));
                }
                Poll::Ready(None) => return Poll::Ready(false),
                Poll::Pending => break,
            }
        }
        let mut more = false;
        let mut i = 0;
        while i < self.consumers.len() {
            let mut budget = CONSUMER_BUDGET;
            let mut ended = false;
            while budget > 0 {
                match self.consumers[i].1.poll_recv(cx) {
                    Poll::Ready(Some(message)) => {
                        self.deliver(message);
                        budget -= 1;
                    }
                    // Cancelled (by us or the broker): amqprs dropped its sender.
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            more |= budget == 0;
            if ended {
                self.consumers.swap_remove(i);
            } else {
                i += 1;
            }
        }
        loop {
            match self.raw.poll_next_unpin(cx) {
                Poll::Ready(Some(raw)) => self.handle(raw),
                Poll::Ready(None) => return Poll::Ready(true),
                Poll::Pending => break,
            }
        }
        if more {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn handle(&mut self, raw: Raw) {
        match raw {
            Raw::Cancel(consumer_tag) => {
                // Deliveries that came before the cancel go out before it.
                if let Some(at) = self.consumers.iter().position(|(t, _)| *t == consumer_tag) {
                    let (_, mut deliveries) = self.consumers.swap_remove(at);
                    while let Ok(message) = deliveries.try_recv() {
                        self.deliver(message);
                    }
                }
                self.emit(ChannelEvent::ConsumerCancelled { consumer_tag });
            }
        }
    }

    fn deliver(&self, message: ConsumerMessage) {
        if let Some(delivery) = convert::delivery(message) {
            self.emit(ChannelEvent::Delivery(Box::new(delivery)));
        }
    }

    fn emit(&self, event: ChannelEvent) {
        // The receiver may be gone (nobody listens); the events are then moot.
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// Settles the channel's end if its event task stops without doing so, so that
/// no call waits for it forever.
struct DecideOnDrop(Arc<ChannelShared>);

impl Drop for DecideOnDrop {
    fn drop(&mut self) {
        self.0.decide(task_stopped());
    }
}
