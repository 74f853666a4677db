//! The application's handle: [`Client`], built by [`ClientBuilder`], with
//! [`Consumer`] streams and [`Received`] deliveries.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use futures::channel::oneshot;

use crate::backoff::BackoffConfig;
use crate::config::Config;
pub use crate::contract::{ClientState, CloseSummary, Flushed};
use crate::contract::{
    ConsumerItem, ConsumerReceiver, Engine, NO_SIZE_LIMIT, ReplyKey, Request, Shared,
    TopologyReply, consumer_stream, lock,
};
use crate::driver::Driver;
use crate::endpoint::{Endpoint, parse_host_list, parse_hosts};
use crate::error::{ConfigError, ConnectError};
use crate::event::Event;
use crate::ids::ChannelId;
use crate::message::{Delivery, FieldTable, Message, Properties};
use crate::outbox::{Confirmation, PublishError};
use crate::supervisor::{Stats, Supervisor};
use crate::tls::TlsConfig;
use crate::topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerId, ExchangeDecl, OpId, QueueDecl,
    QueueHandle, QueueRef, TopologyError,
};
use crate::transport::{ConnectOptions, Timer, Transport};

/// The URL used when neither the builder nor `AMQP_URL` names a broker.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Builds a [`Client`] and its [`Driver`].
///
/// ```
/// use amqp_rebound_core::Client;
///
/// let builder = Client::builder()
///     .hosts(["amqp://guest:guest@rabbit-1:5672/%2f", "amqp://guest:guest@rabbit-2:5672/%2f"])
///     .pool(2, 4)
///     .confirm_window(512)
///     .seed(7);
/// # let _ = builder;
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    hosts: Result<Vec<Endpoint>, ConfigError>,
    /// Every other setting, its hosts left empty until [`config`](Self::config).
    config: Config,
    connection_name: Option<String>,
    watch_capacity: usize,
    tls: Option<TlsConfig>,
}

/// Events a [`Client::watch`] stream holds for a watcher that does not keep up,
/// unless [`ClientBuilder::watch_capacity`] says otherwise.
pub const DEFAULT_WATCH_CAPACITY: usize = 1024;

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            hosts: Err(ConfigError::EmptyHostList),
            config: Config::new(Vec::new()),
            connection_name: None,
            watch_capacity: DEFAULT_WATCH_CAPACITY,
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// The brokers, as AMQP URIs (`amqp://` or `amqps://`). Errors surface from
    /// [`build`](Self::build), with the password redacted.
    pub fn hosts<I, S>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.hosts = parse_hosts(uris);
        self
    }

    /// The brokers from `AMQP_URL` (comma-separated list allowed), or
    /// [`DEFAULT_URL`] when it is unset. A value that is not UTF-8 is refused
    /// by `build` ([`ConfigError::InvalidUri`]), not replaced by the default.
    pub fn from_env(mut self) -> Self {
        self.hosts = match std::env::var("AMQP_URL") {
            Ok(list) => parse_host_list(&list),
            Err(std::env::VarError::NotPresent) => parse_host_list(DEFAULT_URL),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::InvalidUri {
                index: 0,
                uri: "AMQP_URL".into(),
                reason: "the variable is set but is not UTF-8 (its value is not shown: it may hold a password)".into(),
            }),
        };
        self
    }

    /// N connections x M channels per connection (default 1 x 4). `build`
    /// refuses a zero, more than 65535 of either, or more than
    /// [`MAX_POOL_CHANNELS`](crate::config::MAX_POOL_CHANNELS) channels in all
    /// ([`ConfigError`]); a pool wider than the broker's
    /// `channel_max` fails at first contact
    /// ([`TransportError::ChannelLimit`](crate::TransportError::ChannelLimit)).
    pub fn pool(mut self, connections: usize, channels_per_connection: usize) -> Self {
        self.config.connections = connections;
        self.config.channels_per_connection = channels_per_connection;
        self
    }

    /// Reconnect backoff (see [`BackoffConfig::default`] for the defaults and why).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Default publish deadline (30 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.publish_timeout = timeout;
        self
    }

    /// How long one dial may take (5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// With more than one host, how long a dial may go unanswered before the next
    /// host is dialled beside it; the first to connect is kept. Default 1 s;
    /// `Duration::MAX` turns it off.
    pub fn parallel_dial_after(mut self, after: Duration) -> Self {
        self.config.parallel_dial_after = after;
        self
    }

    /// How long [`Client::close`] (or dropping the last handle) drains
    /// accepted messages before it closes anyway (5 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self
    }

    /// Messages waiting for a channel (not yet sent) before publishers wait,
    /// or `no_wait` publishes get [`PublishError::Backpressure`] (10,000).
    /// Messages sent and waiting for their confirm are not counted here: the
    /// confirm window bounds those, per channel.
    pub fn outbox_capacity(mut self, capacity: usize) -> Self {
        self.config.outbox_capacity = capacity;
        self
    }

    /// Unconfirmed messages per channel (1024).
    pub fn confirm_window(mut self, window: usize) -> Self {
        self.config.confirm_window = window;
        self
    }

    /// Re-publish nacked messages instead of failing them. A nacked message
    /// is sent again after a pause that starts at the backoff's initial delay
    /// and grows by its multiplier with each send, up to its cap (50 ms, 100
    /// ms, ... 2 s with the defaults), until it is confirmed or its deadline
    /// passes (`TimedOut`); a close resolves one still pausing as `Nacked`.
    pub fn retry_nacked(mut self, retry: bool) -> Self {
        self.config.retry_nacked = retry;
        self
    }

    /// Seed of every random choice (host shuffle, jitter).
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }

    /// The connection name the broker shows; also the client's name in
    /// tracing (`client` field) and metrics (`client` label). At most
    /// [`MAX_CONNECTION_NAME`](crate::config::MAX_CONNECTION_NAME) bytes
    /// (`build` refuses a longer one with
    /// [`ConfigError::ConnectionNameTooLong`]).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Events each [`Client::watch`] stream holds for a watcher that does not
    /// keep up ([`DEFAULT_WATCH_CAPACITY`]): past it, the oldest are dropped and
    /// the stream says how many with [`Event::Lagged`]. Zero is refused.
    pub fn watch_capacity(mut self, capacity: usize) -> Self {
        self.watch_capacity = capacity;
        self
    }

    /// How to make TLS connections to the `amqps://` hosts: a private CA, a
    /// client certificate (mutual TLS, EXTERNAL authentication), native roots, a
    /// server name override. Without it they trust the public webpki roots.
    ///
    /// ```no_run
    /// use amqp_rebound_core::{Client, TlsConfig};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let tls = TlsConfig::new()
    ///     .ca_pem(std::fs::read("ca.pem")?)?
    ///     .client_cert_pem(std::fs::read("client.pem")?, std::fs::read("client.key")?)?;
    /// let builder = Client::builder()
    ///     .hosts(["amqps://rabbit.internal/%2f?auth_mechanism=external"])
    ///     .tls(tls);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The validated configuration.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = self.config.clone();
        config.hosts = self.hosts.clone()?;
        config.name.clone_from(&self.connection_name);
        config.validate()?;
        if self.watch_capacity == 0 {
            return Err(ConfigError::Zero("watch capacity"));
        }
        TlsConfig::check(self.tls.as_ref(), &config.hosts)?;
        Ok(config)
    }

    /// Builds the client over a transport and a timer. Spawn (or await) the
    /// returned [`Driver`]; the client does nothing without it.
    pub fn build<T: Transport, K: Timer>(
        self,
        transport: T,
        timer: K,
    ) -> Result<(Client, Driver), ConfigError> {
        let config = self.config()?;
        let publish_timeout = config.publish_timeout;
        let reports_blocked = transport.reports_blocked();
        let sup = Supervisor::new(config, timer.now())?;
        let frame_max = sup.frame_max();
        let shared = Arc::new(Shared {
            state: Mutex::new(ClientState::of(&sup)),
            queue_names: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            max_message_size: AtomicUsize::new(NO_SIZE_LIMIT),
            replies: Default::default(),
            relay: Default::default(),
        });
        // async-channel rather than futures' mpsc: it allocates a block per 31
        // requests, not a node per request (requests are allocated on a caller's
        // thread and often freed on the driver's)
        let (tx, rx) = async_channel::unbounded();
        let options = ConnectOptions {
            connection_name: self.connection_name,
            tls: self.tls,
        };
        let transport = Arc::new(transport);
        let checker = Arc::clone(&transport);
        let (driver, engine) = Driver::new(sup, transport, timer, rx, Arc::clone(&shared), options);
        shared.relay.set_engine(Arc::downgrade(&engine));
        let client = Client {
            tx,
            engine,
            shared,
            checks: Arc::new(Checks {
                frame_max,
                transport: Box::new(move |message| checker.check_message(message)),
            }),
            publish_timeout,
            reports_blocked,
            watch_capacity: self.watch_capacity,
        };
        Ok((client, driver))
    }
}

/// Options of one publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Deadline instead of the client's publish timeout.
    pub timeout: Option<Duration>,
    /// Fail with [`PublishError::Backpressure`] at once when the outbox is full,
    /// instead of waiting for room.
    pub no_wait: bool,
}

impl PublishOptions {
    /// Sets the deadline of this publish, measured from when the driver takes it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Fails at once with backpressure when the outbox is full.
    pub fn no_wait(mut self) -> Self {
        self.no_wait = true;
        self
    }
}

/// The broker's answer to one publish, from [`Client::publish`] or
/// [`Client::publish_message`]: resolves exactly once, with [`Confirmation`] or
/// a [`PublishError`] ([`PublishError::Closed`] when the client is closed or
/// its driver is gone).
#[derive(Debug)]
#[must_use = "the message is published anyway; the future only tells how it ended"]
pub struct PublishFuture {
    /// The reply's slot; `None` once the result was read.
    reply: Option<(Arc<Shared>, ReplyKey)>,
}

impl Future for PublishFuture {
    type Output = Result<Confirmation, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some((shared, key)) = self.reply.as_ref() else {
            return Poll::Ready(Err(PublishError::Closed));
        };
        let key = *key;
        // a channel's wake-up handed to a publisher: its events are taken
        // here (without this future's waker, or the run would wake this task
        // again only to find what the poll below finds)
        if shared.relay.take_owed() {
            shared.replies.unregister(key);
            shared.relay.run();
        }
        match shared.replies.poll(key, cx) {
            Poll::Ready(result) => {
                shared.relay.leave(key);
                // read: the slot is freed
                self.reply = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                shared.relay.wait(key, cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for PublishFuture {
    fn drop(&mut self) {
        if let Some((shared, key)) = self.reply.take() {
            shared.replies.forget(key);
            shared.relay.leave(key);
        }
    }
}

/// A handle to a resilient RabbitMQ client. Cheap to clone; `Send + Sync`.
///
/// Every publish resolves exactly once: [`Confirmation`] or a [`PublishError`].
/// Connections, channels, topology and consumers recover by themselves; a message
/// the broker had not confirmed when a connection died is published again.
///
/// ```no_run
/// use amqp_rebound_core::{Client, ConsumeOptions, Event, Properties, QueueDecl};
/// use futures::StreamExt;
///
/// # async fn run(client: Client) -> Result<(), Box<dyn std::error::Error>> {
/// // topology is declared once and replayed after every recovery
/// let queue = client.declare_queue(QueueDecl::durable("jobs")).await?;
///
/// // resolves when the broker confirmed it, even across a reconnect
/// let confirmation = client
///     .publish("", &queue.name(), "hello", Properties::default().persistent())
///     .await?;
/// println!("{confirmation:?}");
///
/// // a consumer keeps receiving across recoveries
/// let mut consumer = client.consume(&queue, ConsumeOptions::default()).await?;
/// if let Some(received) = consumer.next().await {
///     received?.ack().await?; // a delivery from before a recovery is refused: Stale
/// }
///
/// // what happens, as it happens
/// let mut events = client.watch();
/// while let Some(event) = events.next().await {
///     if let Event::RecoveryFailed { endpoint, error, retry_in, .. } = &event {
///         eprintln!("{endpoint}: {error}; retrying in {retry_in:?}");
///     }
/// #   break;
/// }
/// client.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    tx: async_channel::Sender<Request>,
    engine: Arc<dyn Engine>,
    shared: Arc<Shared>,
    checks: Arc<Checks>,
    publish_timeout: Duration,
    reports_blocked: bool,
    watch_capacity: usize,
}

/// What a publish the driver takes is checked against on its caller's thread,
/// so that it fails at the call as it does when the call runs it there.
struct Checks {
    frame_max: u32,
    /// [`Transport::check_message`] of the client's transport.
    transport: Box<MessageCheck>,
}

/// A transport's [`Transport::check_message`], apart from its transport type.
type MessageCheck = dyn Fn(&Message) -> Result<(), String> + Send + Sync;

impl Checks {
    /// Why `message` would be refused at the call, if it would.
    fn refusal(
        &self,
        shared: &Shared,
        message: &Message,
        options: &PublishOptions,
    ) -> Option<PublishError> {
        if shared.closed.load(Ordering::SeqCst) {
            return Some(PublishError::Closed);
        }
        let max = shared.max_message_size.load(Ordering::Relaxed);
        let max = (max != NO_SIZE_LIMIT).then_some(max);
        if let Err(e) = crate::supervisor::check_message(message, self.frame_max, max) {
            return Some(e);
        }
        if let Err(reason) = (self.transport)(message) {
            return Some(PublishError::Invalid(reason));
        }
        // a deadline of now has passed by the time anything could send it
        (options.timeout == Some(Duration::ZERO)).then_some(PublishError::TimedOut)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("shared", &self.shared)
            .field("publish_timeout", &self.publish_timeout)
            .field("reports_blocked", &self.reports_blocked)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn send(&self, request: Request) -> bool {
        self.tx.try_send(request).is_ok()
    }

    /// Publishes `payload` to `exchange` with `routing_key`; the returned future
    /// resolves with the broker's confirm. Waits for room when the outbox is full.
    ///
    /// The message is handed to the client by this call, so messages go out in
    /// the order of the calls, and the future is `'static` (it can be spawned or
    /// kept apart from the client). Dropping the future does not withdraw the
    /// message: it is still published; only its result is not seen.
    ///
    /// The call does not block. If no other thread is using the client's state at
    /// that moment, it writes the message to the transport itself, on the calling
    /// thread (a channel with room in its confirm window; the driver is not woken
    /// for it); otherwise it queues the message for the driver. Either way, a
    /// message the call can tell is bad (see [`PublishError::Invalid`]) or a
    /// publish on a closed client resolves at the call.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: impl Into<Bytes>,
        properties: Properties,
    ) -> PublishFuture {
        let message = Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            payload: payload.into(),
            properties: properties.into(),
            mandatory: false,
        };
        self.submit(Arc::new(message), PublishOptions::default())
    }

    /// Publishes a [`Message`] with [`PublishOptions`]; as [`Client::publish`],
    /// the message is handed over by this call and the future waits for the
    /// confirm.
    pub fn publish_message(&self, message: Message, options: PublishOptions) -> PublishFuture {
        self.submit(Arc::new(message), options)
    }

    fn submit(&self, message: Arc<Message>, options: PublishOptions) -> PublishFuture {
        let reply = self.shared.replies.open();
        let request = Request::Publish {
            message,
            timeout: options.timeout,
            wait: !options.no_wait,
            reply,
        };
        // on this thread if the client's state is free, else through the driver,
        // after the checks the call would have run here
        let refused = match self.engine.try_publish(request) {
            Ok(()) => None,
            Err(request) => {
                let refusal = match &request {
                    Request::Publish { message, .. } => {
                        self.checks.refusal(&self.shared, message, &options)
                    }
                    _ => None,
                };
                // `send` fails when the driver is gone
                refusal.or_else(|| (!self.send(request)).then_some(PublishError::Closed))
            }
        };
        if let Some(error) = refused {
            self.shared.replies.resolve(reply, Err(error));
        }
        PublishFuture {
            reply: Some((Arc::clone(&self.shared), reply)),
        }
    }

    /// The client's default publish timeout.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// Whether the transport reports the broker's resource alarms
    /// ([`Transport::reports_blocked`]). If not, [`Event::Blocked`] never comes:
    /// during an alarm publishes wait without notice and time out at their
    /// deadline.
    pub fn reports_blocked(&self) -> bool {
        self.reports_blocked
    }

    async fn topology(
        &self,
        op: impl FnOnce(&mut Supervisor, Instant) -> Result<OpId, TopologyError> + Send + 'static,
    ) -> Result<(), TopologyError> {
        let (reply, rx) = oneshot::channel();
        let request = Request::Topology {
            op: Box::new(op),
            reply: TopologyReply::Unit(reply),
        };
        if !self.send(request) {
            return Err(TopologyError::Closed);
        }
        rx.await.unwrap_or(Err(TopologyError::Closed))
    }

    /// Declares an exchange (replayed after every recovery).
    pub async fn declare_exchange(&self, decl: ExchangeDecl) -> Result<(), TopologyError> {
        self.topology(move |s, now| s.declare_exchange(now, decl))
            .await
    }

    /// Deletes an exchange (and forgets it).
    pub async fn delete_exchange(&self, name: &str) -> Result<(), TopologyError> {
        let name = name.to_string();
        self.topology(move |s, now| s.delete_exchange(now, &name))
            .await
    }

    /// Declares a queue (replayed after every recovery). For a server-named queue
    /// (`QueueDecl::server_named()`), the returned [`Queue`]'s name follows the
    /// renames recovery causes.
    pub async fn declare_queue(&self, decl: QueueDecl) -> Result<Queue, TopologyError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::DeclareQueue { decl, reply }) {
            return Err(TopologyError::Closed);
        }
        let (handle, name) = rx.await.unwrap_or(Err(TopologyError::Closed))?;
        lock(&self.shared.queue_names).insert(handle, name);
        Ok(Queue {
            handle,
            shared: Arc::clone(&self.shared),
        })
    }

    /// Deletes a queue (and forgets it).
    pub async fn delete_queue(&self, queue: impl Into<QueueRef>) -> Result<(), TopologyError> {
        let queue = queue.into();
        self.topology(move |s, now| s.delete_queue(now, queue))
            .await
    }

    /// Binds a queue to an exchange (replayed after every recovery).
    pub async fn bind_queue(
        &self,
        queue: impl Into<QueueRef>,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), TopologyError> {
        let (queue, exchange, key) = (queue.into(), exchange.to_string(), routing_key.to_string());
        self.topology(move |s, now| s.bind_queue(now, queue, &exchange, &key, arguments))
            .await
    }

    /// Removes a queue binding.
    pub async fn unbind_queue(
        &self,
        queue: impl Into<QueueRef>,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), TopologyError> {
        let (queue, exchange, key) = (queue.into(), exchange.to_string(), routing_key.to_string());
        self.topology(move |s, now| s.unbind_queue(now, queue, &exchange, &key, arguments))
            .await
    }

    /// Binds exchange `destination` to `source` (replayed after every recovery).
    pub async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), TopologyError> {
        let (d, s, k) = (
            destination.to_string(),
            source.to_string(),
            routing_key.to_string(),
        );
        self.topology(move |sup, now| sup.bind_exchange(now, &d, &s, &k, arguments))
            .await
    }

    /// Removes an exchange-to-exchange binding.
    pub async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), TopologyError> {
        let (d, s, k) = (
            destination.to_string(),
            source.to_string(),
            routing_key.to_string(),
        );
        self.topology(move |sup, now| sup.unbind_exchange(now, &d, &s, &k, arguments))
            .await
    }

    /// Consumes from a queue. The [`Consumer`] keeps receiving across recoveries
    /// (it is re-subscribed with the same tag). Dropping this call's future
    /// before it answers (a timeout, a `select!`) cancels the consumer the
    /// broker may have made for it.
    pub async fn consume(
        &self,
        queue: impl Into<QueueRef>,
        options: ConsumeOptions,
    ) -> Result<Consumer, ConsumeError> {
        self.consume_with_tag(queue, None, options).await
    }

    /// Like [`consume`](Self::consume), with a consumer tag of your choice.
    pub async fn consume_with_tag(
        &self,
        queue: impl Into<QueueRef>,
        tag: Option<String>,
        options: ConsumeOptions,
    ) -> Result<Consumer, ConsumeError> {
        // bounded by the prefetch when the broker bounds the unacked deliveries
        let bound = options
            .prefetch
            .filter(|&n| n > 0 && !options.no_ack)
            .map(usize::from);
        let (items, rx) = consumer_stream(bound, !options.no_ack);
        let (reply, id) = oneshot::channel();
        let request = Request::Consume {
            queue: queue.into(),
            tag,
            options,
            items,
            reply,
        };
        if !self.send(request) {
            return Err(ConsumeError::Closed);
        }
        let mut answer = ConsumeAnswer {
            id,
            client: self.clone(),
        };
        let id = (&mut answer.id)
            .await
            .unwrap_or(Err(ConsumeError::Closed))?;
        Ok(Consumer {
            id,
            items: rx,
            client: self.clone(),
        })
    }

    pub(crate) async fn ack(
        &self,
        channel: ChannelId,
        generation: u64,
        delivery_tag: u64,
        kind: AckKind,
    ) -> Result<(), AckError> {
        let (reply, rx) = oneshot::channel();
        let request = Request::Ack {
            channel,
            generation,
            delivery_tag,
            kind,
            reply,
        };
        if !self.send(request) {
            return Err(AckError::Closed);
        }
        rx.await.unwrap_or(Err(AckError::Closed))
    }

    /// A snapshot of the pool's state.
    pub fn state(&self) -> ClientState {
        lock(&self.shared.state).clone()
    }

    /// Counters (reconnects, recoveries, published, confirmed, republished,
    /// ...), depths and latency summaries (see [`Stats`]).
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// A stream of what happens: state changes, blocked / unblocked, recovery
    /// failures, queue renames, consumer cancels. Publish results and deliveries
    /// are not in it (they go to their callers and consumers). It ends when the
    /// client's driver does.
    ///
    /// Bounded: a watcher that falls more than
    /// [`ClientBuilder::watch_capacity`] events behind (1024 by default) loses
    /// the oldest ones, and its next item is [`Event::Lagged`] with how many
    /// (then the events kept, in order), as with tokio's `broadcast`. A
    /// forgotten watcher therefore holds at most that many events; dropping the
    /// stream unsubscribes it.
    ///
    /// ```no_run
    /// # async fn f(client: amqp_rebound_core::Client) {
    /// use amqp_rebound_core::Event;
    /// use futures::StreamExt;
    ///
    /// let mut events = client.watch();
    /// while let Some(event) = events.next().await {
    ///     match event {
    ///         Event::Lagged { missed } => eprintln!("{missed} events were dropped"),
    ///         other => println!("{other:?}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn watch(&self) -> impl Stream<Item = Event> + Send + Unpin + 'static {
        let (events, stream) = crate::watch::channel(self.watch_capacity);
        self.send(Request::Watch { events });
        stream
    }

    /// Whether the client is closed: `close` or `close_discarding` was called
    /// (true from the call on, while the close still drains: nothing new is
    /// accepted), or its driver ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    /// Closes the client, draining first: nothing new is accepted (later calls
    /// fail with `Closed`), and every message accepted before the call (futures
    /// dropped or not) is published and its confirm awaited, across recoveries,
    /// until the close timeout ([`ClientBuilder::close_timeout`], default 5 s).
    /// Then the connections close cleanly; what is still unresolved resolves
    /// [`PublishError::Closed`] (if it was in flight, the broker may have it).
    /// Returns when the driver is done, with how many publishes the close
    /// resolved that way.
    ///
    /// Dropping the last `Client` handle does the same, with nobody waiting: the
    /// driver drains within the close timeout and then ends. A live
    /// [`Consumer`], and each [`Received`] it gave until it is dropped, holds a
    /// handle too: while one lives, the client stays open.
    ///
    /// Either drain runs on the [`Driver`]: it needs the driver's executor to
    /// keep running. A tokio runtime that shuts down (`main` returning from
    /// `#[tokio::main]`, the end of a `#[tokio::test]`) drops the driver with
    /// its other tasks; what was not confirmed then resolves
    /// [`PublishError::Closed`] at once, and what was not yet sent is lost (a
    /// WARN of target `amqp_rebound::client` counts them). Await `close` before
    /// the runtime ends.
    pub async fn close(&self) -> CloseSummary {
        self.close_with(false).await
    }

    /// Closes the client **without draining: messages not yet sent are lost**
    /// (they resolve [`PublishError::Closed`] at once). Messages already in
    /// flight keep their channel until their confirms come, up to the close
    /// timeout; then the connections close. For callers that
    /// must stop now (a second SIGTERM); [`close`](Self::close) keeps what was
    /// accepted.
    pub async fn close_discarding(&self) -> CloseSummary {
        self.close_with(true).await
    }

    async fn close_with(&self, discard: bool) -> CloseSummary {
        let (done, rx) = oneshot::channel();
        if self.send(Request::Close { discard, done }) {
            // a second close (or one after the driver ended) learns nothing new
            rx.await.unwrap_or_default()
        } else {
            CloseSummary::default()
        }
    }

    /// Waits for the first contact with the brokers: `Ok` once a channel is (or
    /// was) Ready; the cause when a full round of dials over every host failed
    /// before that (bad credentials with the broker's text, unknown vhost,
    /// connection refused, unreachable, TLS), without waiting for a publish
    /// timeout. The client keeps dialling in the background either way; after
    /// the first Ready it never reports an error here again.
    ///
    /// ```no_run
    /// # async fn f(client: amqp_rebound_core::Client) {
    /// if let Err(e) = client.connected().await {
    ///     eprintln!("RabbitMQ is not reachable with this configuration: {e}");
    /// }
    /// # }
    /// ```
    pub async fn connected(&self) -> Result<(), ConnectError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::Connected { reply }) {
            return Err(ConnectError::Closed);
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ConnectError::Transport(e)),
            Err(_) => Err(ConnectError::Closed),
        }
    }

    /// Waits until every message accepted before this call has resolved
    /// (confirmed, returned, nacked, timed out, ...), and says how many of them
    /// did not resolve `Confirmed`, counting from the client's start (those that
    /// failed before the call too): for batch jobs and tests. The difference
    /// between two flushes' counts is what the messages accepted between the two
    /// calls did not confirm. Messages published after the call are not waited
    /// for. [`PublishError::Closed`] if the client closed before they all
    /// resolved.
    ///
    /// ```no_run
    /// # async fn f(client: amqp_rebound_core::Client) -> Result<(), amqp_rebound_core::PublishError> {
    /// for i in 0..1000 {
    ///     drop(client.publish("", "jobs", format!("job {i}"), Default::default()));
    /// }
    /// let flushed = client.flush().await?;
    /// assert_eq!(flushed.not_confirmed, 0, "every job is with the broker");
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) -> Result<Flushed, PublishError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::Flush { reply }) {
            return Err(PublishError::Closed);
        }
        rx.await.map_err(|_| PublishError::Closed)
    }
}

/// A declared queue. Its [`name`](Queue::name) follows the renames of a
/// server-named queue across recoveries.
#[derive(Debug, Clone)]
pub struct Queue {
    handle: QueueHandle,
    shared: Arc<Shared>,
}

impl Queue {
    /// The queue's current name.
    pub fn name(&self) -> String {
        lock(&self.shared.queue_names)
            .get(&self.handle)
            .cloned()
            .unwrap_or_default()
    }

    /// The stable handle.
    pub fn handle(&self) -> QueueHandle {
        self.handle
    }
}

impl From<&Queue> for QueueRef {
    fn from(queue: &Queue) -> Self {
        QueueRef::Handle(queue.handle)
    }
}

impl From<Queue> for QueueRef {
    fn from(queue: Queue) -> Self {
        QueueRef::Handle(queue.handle)
    }
}

/// A stream of [`Received`] messages that survives recovery. It ends (with an
/// error item) when the broker cancels it for good or the client closes. Dropping
/// it cancels the consumer.
///
/// When the client has closed, the next item is the `Closed` error (or, for a
/// consumer that had ended before, the error that ended it): the deliveries it
/// held and had not handed out could no longer be acked, and the broker
/// delivers them again (an auto-ack consumer's, which are the application's
/// alone, are still handed out first).
#[derive(Debug)]
pub struct Consumer {
    id: ConsumerId,
    items: ConsumerReceiver,
    client: Client,
}

impl Consumer {
    /// The consumer's id.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The next delivery, or the error that ended the consumer; `None` once it
    /// ended. The same as [`StreamExt::next`](futures::StreamExt::next), without
    /// importing a trait.
    ///
    /// ```no_run
    /// # async fn f(client: amqp_rebound_core::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut consumer = client.consume("jobs", Default::default()).await?;
    /// while let Some(received) = consumer.next().await {
    ///     let received = received?;
    ///     println!("{:?}: {:?}", received.properties().message_id, received.payload());
    ///     received.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next(&mut self) -> Option<Result<Received, ConsumeError>> {
        futures::StreamExt::next(self).await
    }

    /// Cancels the consumer (deliveries already received can still be acked;
    /// those it holds and has not handed out go back to the queue, as do those
    /// the broker sends it before it takes the cancel). Dropping the consumer
    /// does the same. Its tag may be given to a new consumer at once: deliveries
    /// meant for this one never reach that one.
    ///
    /// An auto-ack (`no_ack`) consumer's deliveries cannot go back: so that
    /// nothing published after the cancel is routed to it, the client's
    /// publishes wait until the broker has taken the cancel (one round trip; at
    /// most 5 s).
    pub fn cancel(self) {
        drop(self);
    }
}

/// The answer to a `consume` call. Dropped with a consumer in it (the call's
/// future was dropped between the answer and its next poll), it cancels that
/// consumer, which nobody else can: the driver cancels one whose call was gone
/// before the answer.
struct ConsumeAnswer {
    id: oneshot::Receiver<Result<ConsumerId, ConsumeError>>,
    client: Client,
}

impl Drop for ConsumeAnswer {
    fn drop(&mut self) {
        if let Ok(Some(Ok(consumer))) = self.id.try_recv() {
            self.client.send(Request::Cancel { consumer });
        }
    }
}

impl Stream for Consumer {
    type Item = Result<Received, ConsumeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // the driver finished (its request channel closed): what an acking
        // consumer still holds could no longer be acked
        let client_ended = self.client.tx.is_closed();
        match self.items.poll_next(cx, client_ended) {
            Poll::Ready(Some(ConsumerItem::Delivery {
                delivery,
                channel,
                generation,
            })) => Poll::Ready(Some(Ok(Received {
                delivery: *delivery,
                channel,
                generation,
                client: Some(self.client.clone()),
            }))),
            Poll::Ready(Some(ConsumerItem::Ended(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // before the driver can hear of it: what is left unread is its to give back
        self.items.close();
        self.client.send(Request::Cancel { consumer: self.id });
    }
}

/// A message delivered to a [`Consumer`]. Ack, nack or reject it; if its channel
/// was recovered since it arrived, that returns [`AckError::Stale`] and the broker
/// redelivers it.
#[derive(Debug)]
pub struct Received {
    /// The delivery: payload, properties, routing data.
    pub delivery: Delivery,
    channel: ChannelId,
    generation: u64,
    client: Option<Client>,
}

impl Received {
    /// Its properties (content type, headers, message id, ...).
    pub fn properties(&self) -> &Properties {
        &self.delivery.properties
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        &self.delivery.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.delivery.routing_key
    }

    /// Whether the broker delivered it before: a possible duplicate (see
    /// [`guarantees`](crate::guarantees)).
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// The consumer tag it was delivered to.
    pub fn consumer_tag(&self) -> &str {
        &self.delivery.consumer_tag
    }

    /// The body.
    pub fn payload(&self) -> &[u8] {
        &self.delivery.payload
    }

    /// The channel generation it came on.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The channel it came on.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    async fn settle(&self, kind: AckKind) -> Result<(), AckError> {
        match &self.client {
            Some(client) => {
                client
                    .ack(
                        self.channel,
                        self.generation,
                        self.delivery.delivery_tag,
                        kind,
                    )
                    .await
            }
            None => Err(AckError::Closed),
        }
    }

    /// Acknowledges it.
    pub async fn ack(&self) -> Result<(), AckError> {
        self.settle(AckKind::Ack { multiple: false }).await
    }

    /// Negatively acknowledges it.
    pub async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        self.settle(AckKind::Nack {
            multiple: false,
            requeue,
        })
        .await
    }

    /// Rejects it.
    pub async fn reject(&self, requeue: bool) -> Result<(), AckError> {
        self.settle(AckKind::Reject { requeue }).await
    }
}
