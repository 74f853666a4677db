//! Failover across a real 3-node RabbitMQ cluster (`scripts/cluster up`), over
//! every real transport.
//!
//! 1. Quorum queue, 50,000 confirmed publishes while the node the client is on
//!    stops and comes back, three times: every publish Confirmed, none lost,
//!    duplicates counted, failover stall printed.
//! 2. A consumer on a quorum queue keeps receiving across three failovers; acks of
//!    deliveries from before a failover are `Stale`; nothing lost.
//! 3. All three nodes down for 5 s: the client backs off (no hot loop), recovers,
//!    and every publish of the outage resolves (Confirmed, or TimedOut at its
//!    deadline).
//! 4. A classic (non-replicated) queue whose node is down: what RabbitMQ 3.10
//!    does, asserted.
//! 5. A quorum queue without a majority holds its confirms; a later publish to
//!    another queue on the same channel is still confirmed at once (confirms
//!    arrive out of order, and the transport must report each as it comes).
//!
//! Runs only with `REBOUND_CLUSTER=1` (see `amqp_rebound_tests::cluster`);
//! `REBOUND_CLUSTER_EVENTS=1` also prints the client's events around each stop.
//!
//! ```text
//! scripts/cluster up
//! REBOUND_CLUSTER=1 cargo test -p amqp-rebound-tests --test cluster -- --nocapture
//! scripts/cluster down
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::{
    AckError, Client, Confirmation, ConsumeOptions, Consumer, Event, FieldTable, Message,
    Properties, PublishError, PublishOptions, Queue, QueueDecl, Received, Transport,
};
use amqp_rebound_tests::cluster::{
    Cluster, EventLog, Node, client, is_channel_ready, is_connection_lost, lock, unique, wait_ready,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::watch;

/// The cluster tests for one transport; `$make` builds the transport.
macro_rules! cluster_tests {
    ($($transport:ident => $make:expr),* $(,)?) => {$(
        mod $transport {
            use super::*;

            fn make() -> impl Transport {
                $make
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quorum_publishes_survive_node_stops() {
                super::quorum_publishes_survive_node_stops(make, stringify!($transport)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quorum_consumer_survives_node_stops() {
                super::quorum_consumer_survives_node_stops(make, stringify!($transport)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn whole_cluster_down_then_back() {
                super::whole_cluster_down_then_back(make, stringify!($transport)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn classic_queue_on_a_stopped_node() {
                super::classic_queue_on_a_stopped_node(make, stringify!($transport)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_held_confirm_does_not_hold_later_ones() {
                super::a_held_confirm_does_not_hold_later_ones(make, stringify!($transport)).await;
            }
        }
    )*};
}

cluster_tests! {
    lapin => amqp_rebound_lapin::LapinTransport::new(),
    amqprs => amqp_rebound_amqprs::AmqprsTransport::new(),
}

// ---------------------------------------------------------------------------
// helpers

fn quorum_decl(name: &str) -> QueueDecl {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    QueueDecl {
        arguments,
        ..QueueDecl::durable(name)
    }
}

async fn declare(client: &Client, decl: QueueDecl) -> Queue {
    let name = decl.name.clone();
    tokio::time::timeout(Duration::from_secs(60), client.declare_queue(decl))
        .await
        .unwrap_or_else(|_| panic!("declaring {name} took over 60 s"))
        .unwrap_or_else(|e| panic!("declaring {name}: {e}"))
}

fn message_properties(id: u64) -> Properties {
    Properties::default()
        .persistent()
        .with_message_id(id.to_string())
}

fn message_id(received: &Received) -> u64 {
    received
        .delivery
        .properties
        .message_id
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("delivery without a numeric message id: {received:?}"))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Prints the client's events since `since` when `REBOUND_CLUSTER_EVENTS` is set.
fn print_events(events: &EventLog, since: Instant, origin: Instant) {
    if std::env::var_os("REBOUND_CLUSTER_EVENTS").is_none() {
        return;
    }
    for (at, e) in events.snapshot().into_iter().filter(|(at, _)| *at >= since) {
        let t = at.saturating_duration_since(origin).as_millis() as i128
            - origin.saturating_duration_since(at).as_millis() as i128;
        eprintln!("  {t:>+7} ms {e:?}");
    }
}

/// What a publisher has done so far.
#[derive(Default)]
struct Progress {
    published: AtomicU64,
    resolved: AtomicU64,
    /// When each Confirmed publish resolved, in order.
    confirms: Mutex<Vec<Instant>>,
    /// Ids of the Confirmed publishes.
    confirmed: Mutex<Vec<u64>>,
    /// Publishes that did not resolve Confirmed.
    failures: Mutex<Vec<(u64, PublishError)>>,
}

impl Progress {
    fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    fn resolved(&self) -> u64 {
        self.resolved.load(Ordering::SeqCst)
    }

    fn first_confirm_after(&self, at: Instant) -> Option<Instant> {
        let confirms = lock(&self.confirms);
        let i = confirms.partition_point(|t| *t <= at);
        confirms.get(i).copied()
    }

    /// Waits (up to `patience`) until every publish so far has resolved.
    async fn wait_resolved(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while self.resolved() < self.published() {
            assert!(
                Instant::now() < deadline,
                "{} of {} publishes still unresolved after {patience:?}",
                self.published() - self.resolved(),
                self.published()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Publishes ids `0..total` to `queue` with up to `window` unresolved, never
/// past `*limit` (raised by the caller as it injects faults). Returns when all
/// `total` resolved, or when `limit` is set to 0 and nothing is in flight.
async fn publish_all(
    client: Client,
    queue: String,
    total: u64,
    window: usize,
    mut limit: watch::Receiver<u64>,
    progress: Arc<Progress>,
) {
    let payload = vec![b'x'; 64];
    let mut next = 0u64;
    let mut in_flight = FuturesUnordered::new();
    loop {
        let limit_now = *limit.borrow_and_update();
        let allowed = limit_now.min(total);
        while next < allowed && in_flight.len() < window {
            let (client, queue, payload, id) =
                (client.clone(), queue.clone(), payload.clone(), next);
            in_flight.push(async move {
                let result = client
                    .publish("", &queue, payload, message_properties(id))
                    .await;
                (id, result)
            });
            next += 1;
            progress.published.store(next, Ordering::SeqCst);
        }
        if in_flight.is_empty() && (next >= total || limit_now == 0) {
            return;
        }
        tokio::select! {
            Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                match result {
                    Ok(Confirmation::Confirmed) => {
                        lock(&progress.confirms).push(Instant::now());
                        lock(&progress.confirmed).push(id);
                    }
                    Ok(other) => panic!("publish {id} resolved as {other:?}"),
                    Err(e) => lock(&progress.failures).push((id, e)),
                }
                progress.resolved.fetch_add(1, Ordering::SeqCst);
            }
            changed = limit.changed(), if next < total && next >= allowed => {
                if changed.is_err() {
                    // the caller is gone: publish the rest
                    limit = watch::channel(total).1;
                }
            }
        }
    }
}

/// Consumes `queue` (no-ack) until every id of `expected` has arrived and the
/// broker reports the queue empty; returns (deliveries, distinct ids).
async fn drain(
    client: &Client,
    cluster: &Cluster,
    queue: &Queue,
    expected: &HashSet<u64>,
    patience: Duration,
) -> (u64, HashSet<u64>) {
    let mut consumer = client
        .consume(
            queue,
            ConsumeOptions {
                no_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .await
        .expect("consume to drain");
    let deadline = Instant::now() + patience;
    let mut seen = HashSet::new();
    let mut deliveries = 0u64;
    let mut missing = expected.len();
    loop {
        // every confirmed id arrived: now make sure no duplicate is left behind
        if missing == 0 {
            match cluster.queue_info(&queue.name()).await {
                Some((0, _)) => break,
                Some(_) => {}
                None => panic!("queue {} not listed", queue.name()),
            }
        }
        assert!(
            Instant::now() < deadline,
            "drain: {missing} of {} confirmed ids still missing after {patience:?} ({deliveries} deliveries)",
            expected.len()
        );
        let wait = if missing == 0 { 200 } else { 2_000 };
        while let Ok(Some(item)) =
            tokio::time::timeout(Duration::from_millis(wait), consumer.next()).await
        {
            let received = item.expect("drain consumer ended");
            let id = message_id(&received);
            deliveries += 1;
            if seen.insert(id) && expected.contains(&id) {
                missing -= 1;
            }
        }
    }
    consumer.cancel();
    (deliveries, seen)
}

// ---------------------------------------------------------------------------
// 1. publishes to a quorum queue while the client's node stops and returns

const TOTAL: u64 = 50_000;
const WINDOW: usize = 1_000;
/// Publishes released when the node starts stopping (about 0.2 s before it
/// closes its connections): the window is full when they close.
const BURST: u64 = 12_000;
/// Publishes released once the loss is seen: they wait in the outbox.
const AFTER_LOSS: u64 = 1_000;

async fn quorum_publishes_survive_node_stops<T: Transport>(make: fn() -> T, transport: &str) {
    let test = format!("{transport}::quorum_publishes_survive_node_stops");
    let Some(cluster) = Cluster::require(&test) else {
        return;
    };
    let started = Instant::now();
    let name = unique(&format!("{transport}-q1"));
    let client = client(make(), &name, |b| {
        b.pool(1, 4).publish_timeout(Duration::from_secs(120))
    });
    let events = EventLog::start(&client);
    let queue = declare(&client, quorum_decl(&name)).await;

    let progress = Arc::new(Progress::default());
    // the first publishes go out before any fault (a limit of 0 would mean "stop")
    let (limit, limit_rx) = watch::channel(1_000u64);
    let publisher = tokio::spawn(publish_all(
        client.clone(),
        queue.name(),
        TOTAL,
        WINDOW,
        limit_rx,
        Arc::clone(&progress),
    ));
    let mut in_flight_at_losses = 0;
    for cycle in 1..=3 {
        let node = cluster
            .connection_node(&name, Duration::from_secs(60))
            .await;
        let before = client.stats();
        let since = Instant::now();
        let (begun, stopping) = tokio::sync::oneshot::channel();
        let stop = cluster.stop_app_signalled(node, begun);
        let observe = async {
            // the burst starts as the node starts stopping
            let _ = stopping.await;
            limit.send_replace((progress.published() + BURST).min(TOTAL));
            let lost = events
                .wait_for(
                    since,
                    Duration::from_secs(60),
                    "connection loss",
                    is_connection_lost,
                )
                .await;
            let outstanding = progress.published() - progress.resolved();
            limit.send_modify(|l| *l = (*l).max(progress.published() + AFTER_LOSS).min(TOTAL));
            let ready = events
                .wait_for(
                    lost,
                    Duration::from_secs(60),
                    "channel ready",
                    is_channel_ready,
                )
                .await;
            (lost, ready, outstanding)
        };
        let ((), (lost, ready, outstanding)) = tokio::join!(stop, observe);
        let stopped = Instant::now();
        in_flight_at_losses += outstanding;
        progress.wait_resolved(Duration::from_secs(120)).await;
        print_events(&events, since, lost);
        let first = progress.first_confirm_after(ready).unwrap_or_else(|| {
            let failures = lock(&progress.failures).clone();
            panic!(
                "no confirm after recovery; {} of {} publishes failed, first: {:?}",
                failures.len(),
                progress.published(),
                &failures[..failures.len().min(5)]
            )
        });
        let now_on = cluster
            .connection_node(&name, Duration::from_secs(60))
            .await;
        assert_ne!(now_on, node, "the client is on the node that was stopped");
        let after = client.stats();
        cluster.start_app(node).await;
        eprintln!(
            "{test}: stop {cycle}: {node} (client moved to {now_on}); stop_app took {} ms; \
             {outstanding} publishes unresolved at the loss; republished {}; \
             stall (loss -> next confirm) {} ms, reconnect (loss -> channel ready) {} ms",
            ms(stopped - since),
            after.republished - before.republished,
            ms(first - lost),
            ms(ready - lost),
        );
    }
    assert!(
        in_flight_at_losses > 0,
        "no publish was in flight at any of the 3 losses: the scenario did not happen"
    );
    limit.send_replace(TOTAL);
    tokio::time::timeout(Duration::from_secs(300), publisher)
        .await
        .expect("the publisher finished within 300 s")
        .expect("the publisher did not panic");

    let failures = lock(&progress.failures).clone();
    assert!(
        failures.is_empty(),
        "{} publishes did not resolve Confirmed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let confirmed: HashSet<u64> = lock(&progress.confirmed).iter().copied().collect();
    assert_eq!(
        confirmed.len() as u64,
        TOTAL,
        "every publish confirmed once"
    );

    let (deliveries, seen) = drain(
        &client,
        &cluster,
        &queue,
        &confirmed,
        Duration::from_secs(300),
    )
    .await;
    let lost: Vec<u64> = confirmed.difference(&seen).copied().collect();
    let stats = client.stats();
    eprintln!(
        "{test}: {TOTAL} confirmed, {} distinct in the queue, {} duplicates, lost {}; \
         republished {}, reconnects {}; total {:.1} s",
        seen.len(),
        deliveries - seen.len() as u64,
        lost.len(),
        stats.republished,
        stats.reconnects,
        started.elapsed().as_secs_f64()
    );
    assert!(lost.is_empty(), "confirmed but not in the queue: {lost:?}");
    assert!(
        seen.iter().all(|id| *id < TOTAL),
        "ids that were never published arrived"
    );
    client
        .delete_queue(&queue)
        .await
        .expect("delete the test queue");
    client.close().await;
}

// ---------------------------------------------------------------------------
// 2. a consumer on a quorum queue across node stops

/// What the consumer task has seen.
#[derive(Default)]
struct ConsumerLog {
    deliveries: AtomicU64,
    redelivered: AtomicU64,
    /// Ids acked successfully.
    acked: Mutex<HashSet<u64>>,
    /// Acks that returned Stale without being held on purpose (they raced a loss).
    unplanned_stale: AtomicU64,
    /// How many deliveries to hold unacked now.
    hold: AtomicUsize,
    held: Mutex<Vec<Received>>,
    /// When each delivery arrived, and on which channel generation.
    arrivals: Mutex<Vec<(Instant, u64)>>,
}

async fn consume_all(mut consumer: Consumer, log: Arc<ConsumerLog>) {
    while let Some(item) = consumer.next().await {
        let received = item.unwrap_or_else(|e| panic!("consumer ended: {e}"));
        log.deliveries.fetch_add(1, Ordering::SeqCst);
        if received.delivery.redelivered {
            log.redelivered.fetch_add(1, Ordering::SeqCst);
        }
        lock(&log.arrivals).push((Instant::now(), received.generation()));
        let received = {
            let mut held = lock(&log.held);
            if held.len() < log.hold.load(Ordering::SeqCst) {
                held.push(received);
                continue;
            }
            received
        };
        let id = message_id(&received);
        match received.ack().await {
            Ok(()) => {
                lock(&log.acked).insert(id);
            }
            Err(AckError::Stale) => {
                log.unplanned_stale.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => panic!("ack of {id}: {e}"),
        }
    }
}

/// Deliveries held unacked across each failover.
const HOLD: usize = 20;

async fn quorum_consumer_survives_node_stops<T: Transport>(make: fn() -> T, transport: &str) {
    let test = format!("{transport}::quorum_consumer_survives_node_stops");
    let Some(cluster) = Cluster::require(&test) else {
        return;
    };
    let started = Instant::now();
    let name = unique(&format!("{transport}-q2"));
    let client = client(make(), &name, |b| {
        b.pool(1, 4).publish_timeout(Duration::from_secs(120))
    });
    let events = EventLog::start(&client);
    let queue = declare(&client, quorum_decl(&name)).await;
    let consumer = client
        .consume(
            &queue,
            ConsumeOptions {
                prefetch: Some(200),
                ..ConsumeOptions::default()
            },
        )
        .await
        .expect("consume");
    let log = Arc::new(ConsumerLog::default());
    let consuming = tokio::spawn(consume_all(consumer, Arc::clone(&log)));

    // A steady publisher (100 unresolved at most) until the limit drops to 0.
    let progress = Arc::new(Progress::default());
    let (limit, limit_rx) = watch::channel(u64::MAX);
    let publisher = tokio::spawn(publish_all(
        client.clone(),
        queue.name(),
        u64::MAX,
        100,
        limit_rx,
        Arc::clone(&progress),
    ));

    let mut stale = 0;
    for cycle in 1..=3 {
        // hold HOLD deliveries unacked across the failover
        log.hold.store(HOLD, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while lock(&log.held).len() < HOLD {
            assert!(
                Instant::now() < deadline,
                "no {HOLD} deliveries to hold within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let generation = lock(&log.held)[0].generation();
        let (node, since, lost) = cluster.stop_client_node(&name, &events).await;
        // deliveries resume on a newer channel generation
        let deadline = Instant::now() + Duration::from_secs(60);
        let resumed = loop {
            if let Some(at) = lock(&log.arrivals)
                .iter()
                .find(|(at, g)| *at > lost && *g > generation)
                .map(|(at, _)| *at)
            {
                break at;
            }
            assert!(
                Instant::now() < deadline,
                "no delivery on a new channel generation within 60 s of the loss"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let held: Vec<Received> = {
            log.hold.store(0, Ordering::SeqCst);
            std::mem::take(&mut *lock(&log.held))
        };
        for received in &held {
            assert_eq!(
                received.ack().await,
                Err(AckError::Stale),
                "ack of a delivery from before the failover"
            );
            stale += 1;
        }
        print_events(&events, since, lost);
        eprintln!(
            "{test}: stop {cycle}: {node}; deliveries resumed {} ms after the loss; \
             {} held acks were Stale",
            ms(resumed - lost),
            held.len()
        );
        cluster.start_app(node).await;
    }
    limit.send_replace(0);
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher's last publishes resolved within 120 s")
        .expect("the publisher did not panic");
    let failures = lock(&progress.failures).clone();
    assert!(
        failures.is_empty(),
        "publishes that did not resolve Confirmed: {:?}",
        &failures[..failures.len().min(5)]
    );
    let confirmed: HashSet<u64> = lock(&progress.confirmed).iter().copied().collect();

    // every confirmed message is acked by the consumer in the end
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = confirmed.difference(&lock(&log.acked)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} confirmed messages never acked by the consumer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = client.stats();
    let deliveries = log.deliveries.load(Ordering::SeqCst);
    eprintln!(
        "{test}: {} confirmed, all received and acked; deliveries {deliveries}, \
         redelivered {}, duplicates {}; held acks Stale {stale}, unplanned Stale acks {} \
         (stale_acks stat {}); total {:.1} s",
        confirmed.len(),
        log.redelivered.load(Ordering::SeqCst),
        deliveries - confirmed.len() as u64,
        log.unplanned_stale.load(Ordering::SeqCst),
        stats.stale_acks,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(stale, 3 * HOLD);
    assert!(stats.stale_acks >= stale as u64);
    consuming.abort();
    client
        .delete_queue(&queue)
        .await
        .expect("delete the test queue");
    client.close().await;
}

// ---------------------------------------------------------------------------
// 3. every node down for 5 s

const OUTAGE_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

type Outcome = (u64, Instant, Instant, Result<(), PublishError>);

async fn whole_cluster_down_then_back<T: Transport>(make: fn() -> T, transport: &str) {
    let test = format!("{transport}::whole_cluster_down_then_back");
    let Some(cluster) = Cluster::require(&test) else {
        return;
    };
    let started = Instant::now();
    let name = unique(&format!("{transport}-q3"));
    let client = client(make(), &name, |b| {
        b.pool(1, 4).publish_timeout(OUTAGE_PUBLISH_TIMEOUT)
    });
    let events = EventLog::start(&client);
    let queue = declare(&client, quorum_decl(&name)).await;
    wait_ready(&client, Duration::from_secs(30)).await;

    // One publish every 50 ms, each its own task: (id, started, resolved, result).
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let issued = Arc::new(AtomicU64::new(0));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (client, queue, outcomes, issued, stop) = (
            client.clone(),
            queue.name(),
            Arc::clone(&outcomes),
            Arc::clone(&issued),
            Arc::clone(&stop_publishing),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut id = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (client, queue, outcomes) =
                    (client.clone(), queue.clone(), Arc::clone(&outcomes));
                tokio::spawn(async move {
                    let start = Instant::now();
                    let message = Message::new("", queue, b"outage".to_vec())
                        .with_properties(message_properties(id));
                    let result = client
                        .publish_message(message, PublishOptions::default())
                        .await
                        .map(|_| ());
                    lock(&outcomes).push((id, start, Instant::now(), result));
                });
                id += 1;
                issued.store(id, Ordering::SeqCst);
            }
        })
    };
    // some traffic before the outage
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(&outcomes).len() < 20 {
        assert!(Instant::now() < deadline, "no confirms before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let down_at = Instant::now();
    futures::future::join_all(Node::ALL.map(|n| cluster.stop_app(n))).await;
    let all_down = Instant::now();
    let lost = events
        .wait_for(
            down_at,
            Duration::from_secs(60),
            "connection loss",
            is_connection_lost,
        )
        .await;
    assert!(
        !client.state().is_ready(),
        "the client is ready with every node stopped: {:?}",
        client.state()
    );
    // the scenario: the whole cluster stays down for 5 s
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart_at = Instant::now();
    cluster.start_apps(&Node::ALL).await;
    let all_up = Instant::now();
    // every node was down from `all_down` until `restart_at`: the first channel
    // Ready after `all_down` is the recovery
    let ready = events
        .wait_for(
            all_down,
            Duration::from_secs(60),
            "channel ready after the outage",
            is_channel_ready,
        )
        .await;
    wait_ready(&client, Duration::from_secs(30)).await;
    // publishing works again
    let after = tokio::time::timeout(
        Duration::from_secs(30),
        client.publish(
            "",
            &queue.name(),
            b"after".to_vec(),
            message_properties(u64::MAX),
        ),
    )
    .await
    .expect("a publish after the outage resolves");
    assert!(after.is_ok(), "publish after the outage: {after:?}");

    stop_publishing.store(true, Ordering::SeqCst);
    ticker.await.expect("ticker");
    let total = issued.load(Ordering::SeqCst);
    // every publish resolves, at the latest at its deadline (plus slack)
    let deadline = Instant::now() + OUTAGE_PUBLISH_TIMEOUT + Duration::from_secs(10);
    while (lock(&outcomes).len() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "{} of {total} publishes never resolved",
            total - lock(&outcomes).len() as u64
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes = lock(&outcomes).clone();
    let mut confirmed = 0;
    let mut timed_out = 0;
    for (id, start, end, result) in &outcomes {
        match result {
            Ok(()) => confirmed += 1,
            Err(PublishError::TimedOut) => {
                timed_out += 1;
                let took = *end - *start;
                assert!(
                    took + Duration::from_millis(100) >= OUTAGE_PUBLISH_TIMEOUT
                        && took <= OUTAGE_PUBLISH_TIMEOUT + Duration::from_secs(3),
                    "publish {id} timed out after {took:?}, deadline {OUTAGE_PUBLISH_TIMEOUT:?}"
                );
            }
            Err(e) => panic!("publish {id} failed: {e}"),
        }
    }
    // failed dials while every node was down: (retry_in) in order
    let failures: Vec<Duration> = events
        .snapshot()
        .into_iter()
        .filter(|(at, _)| *at >= all_down && *at <= ready)
        .filter_map(|(_, e)| match e {
            Event::RecoveryFailed { retry_in, .. } => Some(retry_in),
            _ => None,
        })
        .collect();
    let outage = ready - all_down;
    let in_outage = outcomes
        .iter()
        .filter(|(_, start, _, _)| *start >= all_down && *start <= restart_at)
        .count();
    print_events(&events, down_at, all_down);
    eprintln!(
        "{test}: stop_app x3 took {} ms (first loss seen at +{} ms), all down for {} ms, \
         start_app x3 took {} ms; client ready {} ms after the restart began ({} ms after the \
         last node booted); {} RecoveryFailed events while all were down (retry_in max {:?}); \
         publishes: {total} issued ({in_outage} while every node was down), {confirmed} \
         confirmed, {timed_out} timed out at their deadline; total {:.1} s",
        ms(all_down - down_at),
        ms(lost - down_at),
        ms(restart_at - all_down),
        ms(all_up - restart_at),
        ms(ready.saturating_duration_since(restart_at)),
        ms(ready.saturating_duration_since(all_up)),
        failures.len(),
        failures.iter().max(),
        started.elapsed().as_secs_f64()
    );
    // No hot loop: a slot tries each of the 3 hosts once, then waits a backoff
    // delay; so at most 2 failed dials in a row come without a wait, and the
    // count stays near 3 per doubling of the delay (50 ms .. the 10 s cap).
    let mut zero_run = 0;
    for retry_in in &failures {
        zero_run = if retry_in.is_zero() { zero_run + 1 } else { 0 };
        assert!(
            zero_run <= 2,
            "more than 2 failed dials in a row without a backoff delay: {failures:?}"
        );
        assert!(*retry_in <= Duration::from_secs(10), "delay above the cap");
    }
    let bound = 3 * (10 + outage.as_secs() as usize / 2);
    assert!(
        failures.len() <= bound,
        "{} RecoveryFailed in a {outage:?} outage (bound {bound}): {failures:?}",
        failures.len()
    );
    assert!(
        ready.saturating_duration_since(all_up) <= Duration::from_secs(10 + 5 + 5),
        "ready later than backoff cap + connect timeout after the cluster came back"
    );
    client
        .delete_queue(&queue)
        .await
        .expect("delete the test queue");
    client.close().await;
}

// ---------------------------------------------------------------------------
// 4. a classic (non-replicated) queue on a stopped node
//
// What RabbitMQ 3.10 does, measured here: a durable classic queue lives on one
// node. While that node is down, from the other nodes
// - queue.declare fails: 404 NOT_FOUND "home node '<node>' of durable queue
//   '<name>' in vhost '/' is down or inaccessible";
// - basic.consume fails with the same 404;
// - basic.publish finds no live queue: a mandatory message comes back (312
//   NO_ROUTE, `Returned`); a non-mandatory one is *confirmed and dropped*;
// and when the node returns, the queue is back with the messages it held.

fn is_not_found_home_down(error: &amqp_rebound_core::TransportError, home: Node) -> bool {
    matches!(error, amqp_rebound_core::TransportError::Reply { code: 404, text }
        if text.contains(&home.name()) && text.contains("is down or inaccessible"))
}

async fn classic_queue_on_a_stopped_node<T: Transport>(make: fn() -> T, transport: &str) {
    let test = format!("{transport}::classic_queue_on_a_stopped_node");
    let Some(cluster) = Cluster::require(&test) else {
        return;
    };
    let started = Instant::now();
    let name = unique(&format!("{transport}-classic"));
    // A declares the queue: it lives on A's node (RabbitMQ's default locator)
    let a_name = format!("{name}-a");
    let a = client(make(), &a_name, |b| b.pool(1, 2));
    let a_events = EventLog::start(&a);
    let queue = declare(&a, QueueDecl::durable(&name)).await;
    let home = cluster
        .connection_node(&a_name, Duration::from_secs(30))
        .await;
    for id in 0..10 {
        let confirmed = a
            .publish("", &name, b"classic".to_vec(), message_properties(id))
            .await;
        assert_eq!(confirmed, Ok(Confirmation::Confirmed));
    }
    // B lives on another node only
    let b_name = format!("{name}-b");
    let other = Node::ALL.into_iter().find(|n| *n != home).expect("3 nodes");
    let (b, b_driver) = Client::builder()
        .hosts([other.url()])
        .connection_name(&b_name)
        .pool(1, 2)
        .publish_timeout(Duration::from_secs(10))
        .build(make(), amqp_rebound_core::TokioTimer)
        .expect("valid client configuration");
    tokio::spawn(b_driver);
    let b_events = EventLog::start(&b);
    wait_ready(&b, Duration::from_secs(30)).await;

    let since = Instant::now();
    cluster.stop_app(home).await;

    // declare: 404, naming the home node
    let declared = b.declare_queue(QueueDecl::durable(&name)).await.err();
    assert!(
        matches!(&declared, Some(amqp_rebound_core::TopologyError::Broker { code: 404, text })
            if text.contains(&home.name()) && text.contains("is down or inaccessible")),
        "declare of a classic queue whose node is down: {declared:?}"
    );
    // mandatory publish: returned, NO_ROUTE
    let mandatory = Message::new("", name.as_str(), b"mandatory".to_vec())
        .with_properties(message_properties(100))
        .mandatory(true);
    let returned = b
        .publish_message(mandatory, PublishOptions::default())
        .await;
    assert!(
        matches!(
            &returned,
            Ok(Confirmation::Returned {
                reply_code: 312,
                ..
            })
        ),
        "mandatory publish to a classic queue whose node is down: {returned:?}"
    );
    // plain publish: RabbitMQ confirms it and drops it (checked below)
    let dropped = b
        .publish("", &name, b"dropped".to_vec(), message_properties(101))
        .await;
    assert_eq!(dropped, Ok(Confirmation::Confirmed));
    // consume: the broker's first answer comes back to the caller, a 404 naming
    // the home node; the client keeps nothing to retry
    let refused = b
        .consume(name.as_str(), ConsumeOptions::default())
        .await
        .err();
    assert!(
        matches!(&refused, Some(amqp_rebound_core::ConsumeError::Broker { code: 404, text })
            if text.contains(&home.name()) && text.contains("is down or inaccessible")),
        "consume on a classic queue whose node is down: {refused:?}"
    );
    // A failed over to another node; its topology replay re-declares the queue
    // and gets the same 404 (reported, retried with backoff)
    a_events
        .wait_for(
            since,
            Duration::from_secs(30),
            "A's replay of the queue declaration refused with 404",
            |e| {
                matches!(e, Event::ReplayFailed { step, error, .. }
                if step.contains("DeclareQueue") && is_not_found_home_down(error, home))
            },
        )
        .await;
    let a_state = a.state();
    let a_publish = tokio::time::timeout(
        Duration::from_secs(3),
        a.publish("", "rebound-nowhere", b"x".to_vec(), Properties::default()),
    )
    .await;
    let down_for = since.elapsed();
    let a_replay_failures = a_events.count(since, |e| matches!(e, Event::ReplayFailed { .. }));
    let b_replay_failures = b_events.count(since, |e| matches!(e, Event::ReplayFailed { .. }));

    let restart = Instant::now();
    cluster.start_app(home).await;
    // once the node is back a consumer can start (the queue may take a moment)
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut consumer = loop {
        match b.consume(name.as_str(), ConsumeOptions::default()).await {
            Ok(consumer) => break consumer,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no consumer within 60 s of the restart: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // the consumer gets exactly the 10 messages published before the stop
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {ids:?} delivered within 60 s of the restart"));
        let received = item.expect("consumer open").expect("a delivery");
        ids.push(message_id(&received));
        received.ack().await.expect("ack");
    }
    let resumed = restart.elapsed();
    ids.sort_unstable();
    assert_eq!(ids, (0..10).collect::<Vec<u64>>());
    // ... and the confirmed non-mandatory publish is not in the queue
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cluster.queue_info(&name).await {
            Some((0, _)) => break,
            info => assert!(
                Instant::now() < deadline,
                "queue {name} should be empty after 10 acks: {info:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(extra.is_err(), "an 11th delivery: {extra:?}");
    // A recovers once the queue's node is back
    wait_ready(&a, Duration::from_secs(60)).await;
    eprintln!(
        "{test}: home {home}, B on {other}; while down ({} ms): declare 404, mandatory \
         publish Returned 312, plain publish Confirmed and dropped, consume 404 \
         ({b_replay_failures} ReplayFailed on B); A (failed over) had {}/{} channels ready, \
         {a_replay_failures} ReplayFailed, and its publish elsewhere gave {:?}; after the \
         restart B received the 10 messages within {} ms and A was ready again; total {:.1} s",
        ms(down_for),
        a_state.ready_channels,
        a_state.channels,
        a_publish.map_err(|_| "no answer within 3 s"),
        ms(resumed),
        started.elapsed().as_secs_f64()
    );
    drop(consumer);
    a.delete_queue(&queue).await.expect("delete the test queue");
    a.close().await;
    b.close().await;
}

// ---------------------------------------------------------------------------
// 5. out-of-order confirms

/// A quorum queue with two of its three nodes down cannot commit, so RabbitMQ
/// holds the confirm of a publish to it; a publish to a classic queue on the live
/// node, on the same connection and channel (pool 1 x 1), is confirmed at once.
/// A transport that reports confirms only in order, or only when the oldest
/// resolves, fails here. When the nodes return the held publish is confirmed.
async fn a_held_confirm_does_not_hold_later_ones<T: Transport>(make: fn() -> T, transport: &str) {
    let test = format!("{transport}::a_held_confirm_does_not_hold_later_ones");
    let Some(cluster) = Cluster::require(&test) else {
        return;
    };
    let started = Instant::now();
    let live = Node(1);
    let name = unique(&format!("{transport}-held"));
    let (client, driver) = Client::builder()
        .hosts([live.url()])
        .connection_name(&name)
        .pool(1, 1)
        .publish_timeout(Duration::from_secs(120))
        .build(make(), amqp_rebound_core::TokioTimer)
        .expect("valid client configuration");
    tokio::spawn(driver);
    wait_ready(&client, Duration::from_secs(30)).await;
    let quorum = declare(&client, quorum_decl(&format!("{name}-quorum"))).await;
    let classic = declare(&client, QueueDecl::durable(format!("{name}-classic"))).await;
    let publish = |queue: &Queue, id: u64| {
        let (client, queue) = (client.clone(), queue.name());
        tokio::spawn(async move {
            client
                .publish("", &queue, b"held".to_vec(), message_properties(id))
                .await
        })
    };
    // warm: both queues confirm while every node runs
    assert_eq!(
        publish(&quorum, 0).await.unwrap(),
        Ok(Confirmation::Confirmed)
    );
    assert_eq!(
        publish(&classic, 1).await.unwrap(),
        Ok(Confirmation::Confirmed)
    );

    let others = [Node(2), Node(3)];
    for node in others {
        cluster.stop_app(node).await;
    }
    let held = publish(&quorum, 2);
    // it goes out first, on the one channel: wait until it is in flight
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stats().sent < 3 {
        assert!(
            Instant::now() < deadline,
            "{test}: the quorum publish was not sent within 10 s: {:?}",
            client.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = Instant::now();
    let mut later = Vec::new();
    for id in 3..13 {
        later.push(publish(&classic, id));
    }
    for p in later {
        let result = tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .unwrap_or_else(|_| {
                panic!("{test}: a publish to the live classic queue was not confirmed within 5 s behind the held one")
            })
            .expect("publish task");
        assert_eq!(result, Ok(Confirmation::Confirmed));
    }
    let later_took = sent.elapsed();
    assert!(
        !held.is_finished(),
        "{test}: the quorum publish resolved without a majority: {:?}",
        held.await
    );
    cluster.start_apps(&others).await;
    let held = tokio::time::timeout(Duration::from_secs(90), held)
        .await
        .unwrap_or_else(|_| {
            panic!("{test}: the held publish did not resolve after the nodes returned")
        })
        .expect("publish task");
    assert_eq!(held, Ok(Confirmation::Confirmed));
    eprintln!(
        "{test}: 10 later publishes confirmed in {} ms while the quorum publish was held; \
         it was confirmed once the nodes returned; total {:.1} s",
        ms(later_took),
        started.elapsed().as_secs_f64()
    );
    let _ = client.delete_queue(&quorum).await;
    let _ = client.delete_queue(&classic).await;
    client.close().await;
}
