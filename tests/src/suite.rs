//! The harness of the conformance suite: [`run`] one case for one transport,
//! with a [`Harness`] that builds clients over it; and the helpers the cases share
//! (waiting on conditions, publishing many messages, draining a queue).
//!
//! The cases themselves are in [`cases`]; [`conformance_suite!`](crate::conformance_suite)
//! turns them into `#[test]`s for a transport.

pub mod cases;
pub mod edges;
pub mod tls_cases;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::transport::{Channel, ConnectOptions, Connection, Transport};
use amqp_rebound_core::{
    Client, ClientBuilder, Confirmation, ConsumeOptions, Endpoint, Event, FieldTable, Message,
    Properties, PublishError, PublishOptions, QueueDecl, TlsConfig, TokioTimer,
};
use futures::{Stream, StreamExt};

use crate::broker::{Access, BrokerLock, BrokerUrl, require_broker, unique};
use crate::tls::{TlsBroker, require_tls};

/// No case may take longer than this (it then fails, and its guards restore the
/// broker).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs one case of the suite: checks the broker is there (see
/// [`require_broker`]), takes the [`BrokerLock`] with `access`, and runs `body` on a
/// fresh two-worker tokio runtime within [`CASE_TIMEOUT`].
pub fn run<T, M, C, F>(
    transport: &'static str,
    case: &'static str,
    access: Access,
    make: M,
    body: C,
) where
    T: Transport,
    M: Fn() -> T + Send + Sync + 'static,
    C: FnOnce(Harness<T>) -> F,
    F: Future<Output = ()>,
{
    let test = format!("{transport}::{case}");
    if !require_broker(&test) {
        return;
    }
    run_with(test, transport, case, access, make, body, None);
}

/// [`run`], over the broker's TLS listener (see [`crate::tls`]): the harness's
/// URL is `AMQPS_URL`, and its clients and inspector trust the test CA. Skipped
/// (or failed, under `CI=true`) when there is no listener.
pub fn run_tls<T, M, C, F>(
    transport: &'static str,
    case: &'static str,
    access: Access,
    make: M,
    body: C,
) where
    T: Transport,
    M: Fn() -> T + Send + Sync + 'static,
    C: FnOnce(Harness<T>) -> F,
    F: Future<Output = ()>,
{
    let test = format!("{transport}::tls::{case}");
    if !require_broker(&test) {
        return;
    }
    let Some(tls) = require_tls(&test) else {
        return;
    };
    run_with(test, transport, case, access, make, body, Some(tls));
}

fn run_with<T, M, C, F>(
    test: String,
    transport: &'static str,
    case: &'static str,
    access: Access,
    make: M,
    body: C,
    tls: Option<TlsBroker>,
) where
    T: Transport,
    M: Fn() -> T + Send + Sync + 'static,
    C: FnOnce(Harness<T>) -> F,
    F: Future<Output = ()>,
{
    let lock_wait = Instant::now();
    let _lock = BrokerLock::acquire(access);
    let waited = lock_wait.elapsed();
    if waited > Duration::from_millis(100) {
        eprintln!("{test}: waited {waited:?} for the broker lock ({access:?})");
    }
    if access == Access::Exclusive {
        // A run killed before its guards ran (a nextest timeout sends SIGKILL in
        // the end) may have left the broker stopped, alarmed or deaf: undo that
        // first, so one failure does not cascade.
        if let Err(e) = crate::broker::heal_broker() {
            panic!("{test}: cannot restore the broker before the case: {e}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let harness = Harness {
        make: Arc::new(make),
        transport,
        case,
        url: tls
            .as_ref()
            .map_or_else(BrokerUrl::from_env, |tls| tls.url.clone()),
        tls_config: tls.as_ref().map(TlsBroker::trusting_ca),
        tls,
    };
    let started = Instant::now();
    runtime.block_on(async {
        if tokio::time::timeout(CASE_TIMEOUT, body(harness))
            .await
            .is_err()
        {
            panic!("{test}: did not finish within {CASE_TIMEOUT:?}");
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    eprintln!("{test}: passed in {:?}", started.elapsed());
}

/// What a case gets: the transport under test and the broker's URL.
pub struct Harness<T> {
    make: Arc<dyn Fn() -> T + Send + Sync>,
    /// The transport's name (`lapin`, `amqprs`).
    pub transport: &'static str,
    /// The case's name.
    pub case: &'static str,
    /// The broker (`AMQP_URL`; `AMQPS_URL` for the TLS cases).
    pub url: BrokerUrl,
    /// The TLS listener, for the TLS cases.
    pub tls: Option<TlsBroker>,
    /// What the clients and the inspector use for `amqps://` (the test CA, for
    /// the TLS cases).
    pub tls_config: Option<TlsConfig>,
}

impl<T: Transport> Harness<T> {
    /// A new transport value.
    pub fn transport(&self) -> T {
        (self.make)()
    }

    /// A builder for the real broker's URL(s) with a fresh seed (printed, so a
    /// failure can be replayed with `REBOUND_SEED`) and a unique connection name.
    pub fn builder<S: AsRef<str>>(&self, urls: impl IntoIterator<Item = S>) -> ClientBuilder {
        let seed = std::env::var("REBOUND_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("{}::{}: client seed {seed}", self.transport, self.case);
        let builder = Client::builder()
            .hosts(urls)
            .seed(seed)
            .connection_name(self.connection_name());
        match &self.tls_config {
            Some(tls) => builder.tls(tls.clone()),
            None => builder,
        }
    }

    /// The connection-name prefix of this case's clients (see
    /// [`close_connections_named`](crate::broker::close_connections_named)).
    pub fn connection_prefix(&self) -> String {
        format!(
            "rebound-test.{}.{}.{}",
            self.transport,
            self.case,
            std::process::id()
        )
    }

    fn connection_name(&self) -> String {
        format!("{}.{:04x}", self.connection_prefix(), fastrand::u16(..))
    }

    /// Builds the client over this transport and tokio's clock, and spawns its
    /// driver.
    pub fn start(&self, builder: ClientBuilder) -> Client {
        let (client, driver) = builder
            .build(self.transport(), TokioTimer)
            .expect("a valid client configuration");
        tokio::spawn(driver);
        client
    }

    /// A client of the real broker with the default pool, Ready.
    pub async fn client(&self) -> Client {
        let client = self.start(self.builder([self.url.url()]));
        wait_ready(&client, Duration::from_secs(15)).await;
        client
    }

    /// A plain connection and channel over the transport, to look at the broker
    /// from outside the client under test.
    pub async fn inspector(&self) -> Inspector<T> {
        let endpoint = Endpoint::parse(&self.url.url()).expect("AMQP_URL parses");
        let mut options = ConnectOptions::named(format!("{}.inspector", self.connection_prefix()));
        options.tls = self.tls_config.clone();
        let connection = self
            .transport()
            .connect(&endpoint, &options)
            .await
            .unwrap_or_else(|e| panic!("inspector: cannot connect: {e}"));
        let channel = connection
            .open_channel()
            .await
            .unwrap_or_else(|e| panic!("inspector: cannot open a channel: {e}"));
        // the contract: take the events at once (nothing is read from them)
        let events = channel.events();
        Inspector {
            _events: events,
            channel,
            connection,
        }
    }
}

type ChannelOf<T> = <<T as Transport>::Connection as Connection>::Channel;

/// A plain channel on its own connection.
pub struct Inspector<T: Transport> {
    channel: ChannelOf<T>,
    connection: T::Connection,
    _events: futures::stream::BoxStream<'static, amqp_rebound_core::ChannelEvent>,
}

impl<T: Transport> Inspector<T> {
    /// Messages ready in a queue (redeclaring it with the same `decl`).
    pub async fn ready_messages(&self, decl: &QueueDecl) -> u32 {
        self.channel
            .declare_queue(decl)
            .await
            .unwrap_or_else(|e| panic!("inspector: declare {}: {e}", decl.name))
            .message_count
    }

    /// Deletes a queue.
    pub async fn delete_queue(&self, name: &str) {
        if let Err(e) = self.channel.delete_queue(name).await {
            eprintln!("inspector: delete {name}: {e}");
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close().await;
    }
}

// ---------------------------------------------------------------------------
// waiting

/// Polls `condition` every 5 ms until it holds; panics after `timeout`. Returns
/// how long it took.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`eventually`] with an async condition (e.g. a question to the broker),
/// checked every 50 ms.
pub async fn until<F, C>(what: &str, timeout: Duration, mut condition: C) -> Duration
where
    C: FnMut() -> F,
    F: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every connection and channel of the client is Ready.
pub async fn wait_ready(client: &Client, timeout: Duration) -> Duration {
    eventually("the client to be Ready", timeout, || {
        client.state().is_ready()
    })
    .await
}

/// Waits for the first event that `matches`, skipping the others; panics after
/// `timeout` or if the stream ends.
pub async fn next_event(
    events: &mut (impl Stream<Item = Event> + Unpin),
    what: &str,
    timeout: Duration,
    mut matches: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) if matches(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

/// Every event available now (without waiting).
pub fn drain_events(events: &mut (impl Stream<Item = Event> + Unpin)) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(Some(event)) = events.next().now_or_never() {
        out.push(event);
    }
    out
}

use futures::FutureExt;

/// Awaits `future` for at most `timeout`, panicking with `what` after that.
pub async fn within<F: Future>(what: &str, timeout: Duration, future: F) -> F::Output {
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
}

// ---------------------------------------------------------------------------
// messages

/// A non-durable test queue that the broker deletes 10 minutes after its last
/// use (so a test that dies leaves nothing behind for long).
pub fn test_queue(name: &str) -> QueueDecl {
    QueueDecl {
        name: name.to_string(),
        arguments: expires(),
        ..QueueDecl::default()
    }
}

/// Arguments with `x-expires` = 10 minutes.
pub fn expires() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    arguments
}

/// A unique queue name for this case.
pub fn queue_name<T>(h: &Harness<T>, what: &str) -> String {
    unique(&format!("{}.{what}", h.transport))
}

/// The id in a test message's payload (`"<id>:..."`).
pub fn id_of(payload: &[u8]) -> u32 {
    let end = payload
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(payload.len());
    std::str::from_utf8(&payload[..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a test message: {:?}", String::from_utf8_lossy(payload)))
}

/// A small payload: `"<id>:"`.
pub fn small_payload(id: u32) -> Vec<u8> {
    format!("{id}:").into_bytes()
}

/// What [`publish_many`] does with each id.
pub type MakeMessage = Arc<dyn Fn(u32) -> Message + Send + Sync>;

/// A plain message with the id as payload, to the default exchange.
pub fn plain(queue: &str) -> MakeMessage {
    let queue = queue.to_string();
    Arc::new(move |id| {
        Message::new("", queue.as_str(), small_payload(id))
            .with_properties(Properties::default().with_message_id(id.to_string()))
    })
}

/// How fast [`publish_many`] goes.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    /// At most this many publishes per second.
    pub rate: Option<u32>,
    /// Gate `k` holds back every id from `gates[k]` on until `opened` reaches
    /// `k + 1` (e.g. until the k-th fault has landed).
    pub gates: Vec<u32>,
    /// How many gates are open.
    pub opened: Option<tokio::sync::watch::Receiver<usize>>,
}

impl Pace {
    /// As fast as the client takes them.
    pub fn unlimited() -> Pace {
        Pace::default()
    }

    /// At most `rate` per second.
    pub fn rate(rate: u32) -> Pace {
        Pace {
            rate: Some(rate),
            ..Pace::default()
        }
    }

    async fn wait(&self, start: tokio::time::Instant, id: u32) {
        if let Some(rate) = self.rate
            && id.is_multiple_of(64)
        {
            let due = start + Duration::from_secs_f64(f64::from(id) / f64::from(rate));
            tokio::time::sleep_until(due).await;
        }
        let Some(opened) = &self.opened else {
            return;
        };
        let needed = self.gates.iter().filter(|&&gate| id >= gate).count();
        if needed > 0 {
            let mut opened = opened.clone();
            if opened.wait_for(|&open| open >= needed).await.is_err() {
                panic!("the gate keeper went away before opening gate {needed}");
            }
        }
    }
}

/// Publishes ids `0..total`, up to `concurrency` at once, paced by `pace`.
/// Returns the results by id.
pub async fn publish_many(
    client: &Client,
    total: u32,
    concurrency: usize,
    pace: Pace,
    make: MakeMessage,
) -> Vec<Result<Confirmation, PublishError>> {
    let start = tokio::time::Instant::now();
    let pace = &pace;
    let mut results: Vec<(u32, Result<Confirmation, PublishError>)> =
        futures::stream::iter(0..total)
            .then(|id| async move {
                pace.wait(start, id).await;
                id
            })
            .map(|id| {
                let client = client.clone();
                let message = make(id);
                async move {
                    let result = client
                        .publish_message(message, PublishOptions::default())
                        .await;
                    (id, result)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
    results.sort_by_key(|(id, _)| *id);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Asserts that every result is `Confirmed`, naming the first that is not.
pub fn assert_all_confirmed(results: &[Result<Confirmation, PublishError>]) {
    let bad: Vec<(usize, &Result<Confirmation, PublishError>)> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r, Ok(Confirmation::Confirmed)))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} publishes not confirmed; first: {:?}",
        bad.len(),
        results.len(),
        bad.first()
    );
}

/// Consumes `expected` messages from `queue` (no-ack) and counts them by id.
pub async fn drain_ids(
    client: &Client,
    queue: &str,
    expected: usize,
    timeout: Duration,
) -> HashMap<u32, u32> {
    let options = ConsumeOptions {
        no_ack: true,
        ..ConsumeOptions::default()
    };
    let mut consumer = client
        .consume(queue, options)
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = 0usize;
    while received < expected {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                *counts.entry(id_of(delivery.payload())).or_default() += 1;
                received += 1;
            }
            Ok(Some(Err(e))) => panic!("the consumer of {queue} ended: {e}"),
            Ok(None) => panic!("the consumer of {queue} ended"),
            Err(_) => panic!(
                "timed out after {timeout:?} draining {queue}: {received} of {expected} received"
            ),
        }
    }
    consumer.cancel();
    counts
}

/// What a publish-through-faults run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossReport {
    /// Messages published (all confirmed).
    pub published: u32,
    /// Messages the queue held.
    pub in_queue: u32,
    /// Copies beyond the first.
    pub duplicates: u32,
    /// The client's count of re-sent messages.
    pub republished: u64,
}

/// After `total` confirmed publishes of [`plain`] messages to `queue`: the queue
/// holds every id at least once. Drains it and returns the counts. (It leaves
/// the queue: delete it with [`delete_queues`] once the client is closed.)
pub async fn assert_none_lost<T: Transport>(
    h: &Harness<T>,
    client: &Client,
    decl: &QueueDecl,
    total: u32,
) -> LossReport {
    let inspector = h.inspector().await;
    let in_queue = inspector.ready_messages(decl).await;
    assert!(
        in_queue >= total,
        "the queue holds {in_queue} messages, fewer than the {total} confirmed"
    );
    let counts = drain_ids(
        client,
        &decl.name,
        in_queue as usize,
        Duration::from_secs(60),
    )
    .await;
    let missing: Vec<u32> = (0..total).filter(|id| !counts.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    inspector.close().await;
    LossReport {
        published: total,
        in_queue,
        duplicates: in_queue - total,
        republished: client.stats().republished,
    }
}

/// Deletes queues from outside the client. Call it after the client is closed:
/// a client that still consumes from a queue re-declares it when it is deleted
/// (the broker cancels the consumer, the client re-subscribes).
pub async fn delete_queues<T: Transport>(h: &Harness<T>, names: &[&str]) {
    let inspector = h.inspector().await;
    for name in names {
        inspector.delete_queue(name).await;
    }
    inspector.close().await;
}

/// Closes the client, which must finish within 10 s.
pub async fn close(client: Client) {
    within("close()", Duration::from_secs(10), client.close()).await;
}
