//! What the client tells operators, through the real Driver over the in-memory
//! transport and a manual clock: latency summaries in `Stats`, the bounded
//! `watch()`, and the tracing targets, spans and fields.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::telemetry::targets;
use amqp_rebound_core::{Client, ClientBuilder, ConfigError, Event, Properties};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use futures::{FutureExt, StreamExt};
use support::{ManualClock, MemoryTransport, drive};

const URL: &str = "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f";

fn start(builder: ClientBuilder) -> (LocalPool, ManualClock, MemoryTransport, Client) {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    let (client, driver) = builder
        .hosts([URL])
        .pool(1, 2)
        .seed(1)
        .connection_name("telemetry-test")
        .build(transport.clone(), clock.clone())
        .expect("valid config");
    pool.spawner().spawn_local(driver).expect("spawn");
    (pool, clock, transport, client)
}

fn ready(pool: &mut LocalPool, clock: &ManualClock, client: &Client) {
    assert!(drive(pool, clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
}

/// Publishes `n` messages whose confirms the broker holds for `hold`, and
/// waits for them.
fn publish_held(
    pool: &mut LocalPool,
    clock: &ManualClock,
    transport: &MemoryTransport,
    client: &Client,
    n: usize,
    hold: Duration,
) {
    transport.broker().hold_confirms = true;
    let done = Arc::new(Mutex::new(0usize));
    for i in 0..n {
        let future = client.publish("", "q", format!("m{i}"), Properties::default());
        let done = Arc::clone(&done);
        pool.spawner()
            .spawn_local(async move {
                future.await.expect("confirmed");
                *done.lock().unwrap() += 1;
            })
            .expect("spawn");
    }
    pool.run_until_stalled();
    clock.advance(hold);
    transport.release_confirms();
    assert!(drive(pool, clock, Duration::from_secs(5), || *done
        .lock()
        .unwrap()
        == n));
}

/// Kills the connection after it was Ready long enough to count as useful,
/// refuses dials for `down`, and waits for the recovery.
fn outage(
    pool: &mut LocalPool,
    clock: &ManualClock,
    transport: &MemoryTransport,
    client: &Client,
    down: Duration,
) {
    clock.advance(Duration::from_millis(200));
    pool.run_until_stalled();
    transport.broker().refuse = Some(amqp_rebound_core::TransportError::Io(
        "connection refused".into(),
    ));
    transport.kill_all();
    drive(pool, clock, down, || false);
    transport.broker().refuse = None;
    ready(pool, clock, client);
}

#[test]
fn stats_summarise_confirm_latency_and_the_last_recovery_stall() {
    let (mut pool, clock, transport, client) = start(Client::builder());
    ready(&mut pool, &clock, &client);
    let stats = client.stats();
    assert_eq!(
        (
            stats.confirm_latency_p50,
            stats.confirm_latency_p99,
            stats.last_recovery_stall
        ),
        (None, None, None),
        "nothing measured yet"
    );
    publish_held(
        &mut pool,
        &clock,
        &transport,
        &client,
        20,
        Duration::from_millis(30),
    );
    let stats = client.stats();
    let (p50, p99) = (
        stats.confirm_latency_p50.expect("p50"),
        stats.confirm_latency_p99.expect("p99"),
    );
    // every confirm took 30 ms of the manual clock; a bucket is 1/8 wide at most
    let (low, high) = (Duration::from_millis(30), Duration::from_micros(33_750));
    assert!(low <= p50 && p50 <= high, "p50 {p50:?}");
    assert!(low <= p99 && p99 <= high, "p99 {p99:?}");
    assert_eq!(stats.last_recovery_stall, None);

    outage(
        &mut pool,
        &clock,
        &transport,
        &client,
        Duration::from_millis(300),
    );
    let stall = client.stats().last_recovery_stall.expect("a recovery");
    // refused for 300 ms, then the next dial of the backoff (2 s cap) works
    assert!(
        stall >= Duration::from_millis(300) && stall <= Duration::from_millis(2_400),
        "stall {stall:?}"
    );
    assert_eq!(client.stats().recoveries, 1);
}

/// Three outages, watched by a watcher that reads only at the end.
fn watched_outages(capacity: usize) -> Vec<Event> {
    let (mut pool, clock, transport, client) = start(Client::builder().watch_capacity(capacity));
    let mut watcher = client.watch();
    ready(&mut pool, &clock, &client);
    for _ in 0..3 {
        outage(
            &mut pool,
            &clock,
            &transport,
            &client,
            Duration::from_millis(100),
        );
    }
    let mut seen = Vec::new();
    while let Some(Some(event)) = watcher.next().now_or_never() {
        seen.push(event);
    }
    seen
}

#[test]
fn a_forgotten_watcher_holds_at_most_its_capacity_and_hears_of_the_loss() {
    // the same seed and the same faults on the manual clock: the same events
    let all = watched_outages(1024);
    assert!(all.len() > 8, "{} events in three outages", all.len());
    assert!(
        !all.iter().any(|e| matches!(e, Event::Lagged { .. })),
        "within its capacity a watcher loses nothing"
    );
    let late = watched_outages(4);
    let Some(Event::Lagged { missed }) = late.first().cloned() else {
        panic!("the first item is the loss: {late:?}");
    };
    assert_eq!(late.len(), 1 + 4, "the loss, then the capacity's worth");
    assert_eq!(
        missed as usize + 4,
        all.len(),
        "every event is kept or counted"
    );
    assert_eq!(
        &late[1..],
        &all[all.len() - 4..],
        "the newest are kept, in order"
    );
}

#[test]
fn a_zero_watch_capacity_is_refused() {
    let transport = MemoryTransport::default();
    let err = Client::builder()
        .hosts([URL])
        .watch_capacity(0)
        .build(transport, ManualClock::new())
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err, ConfigError::Zero("watch capacity"));
}

#[cfg(feature = "serde")]
#[test]
fn stats_serialize_with_durations_in_seconds() {
    let (mut pool, clock, transport, client) = start(Client::builder());
    ready(&mut pool, &clock, &client);
    publish_held(
        &mut pool,
        &clock,
        &transport,
        &client,
        4,
        Duration::from_millis(8),
    );
    let json = serde_json::to_value(client.stats()).expect("serializes");
    assert_eq!(json["published"], 4);
    assert_eq!(json["confirmed"], 4);
    assert_eq!(json["outbox_depth"], 0);
    let p50 = json["confirm_latency_p50"].as_f64().expect("seconds");
    assert!((0.008..=0.009).contains(&p50), "{p50}");
    assert!(json["last_recovery_stall"].is_null());
}

// ----- tracing -----

/// What one span or event showed: its target, its name and every field.
#[derive(Debug, Clone, Default)]
struct Record {
    target: String,
    name: String,
    fields: BTreeMap<String, String>,
}

#[derive(Default)]
struct Seen {
    open: BTreeMap<u64, Record>,
    closed: Vec<Record>,
    events: Vec<Record>,
}

/// A layer that keeps every span (with the fields recorded later) and event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Seen>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut record = Record {
            target: attrs.metadata().target().to_owned(),
            name: attrs.metadata().name().to_owned(),
            fields: BTreeMap::new(),
        };
        attrs.record(&mut Fields(&mut record.fields));
        self.0.lock().unwrap().open.insert(id.into_u64(), record);
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(record) = self.0.lock().unwrap().open.get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut record.fields));
        }
    }
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut record = Record {
            target: event.metadata().target().to_owned(),
            name: event.metadata().name().to_owned(),
            fields: BTreeMap::new(),
        };
        event.record(&mut Fields(&mut record.fields));
        self.0.lock().unwrap().events.push(record);
    }
    fn on_close(&self, id: tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        if let Some(record) = seen.open.remove(&id.into_u64()) {
            seen.closed.push(record);
        }
    }
}

#[test]
fn tracing_uses_the_documented_targets_with_outcomes_and_no_secret() {
    use tracing_subscriber::layer::SubscriberExt;

    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        let (mut pool, clock, transport, client) = start(Client::builder());
        ready(&mut pool, &clock, &client);
        publish_held(
            &mut pool,
            &clock,
            &transport,
            &client,
            3,
            Duration::from_millis(5),
        );
        outage(
            &mut pool,
            &clock,
            &transport,
            &client,
            Duration::from_millis(100),
        );
        let closing = client.clone();
        pool.spawner()
            .spawn_local(async move {
                closing.close().await;
            })
            .expect("spawn");
        drop(client);
        drive(&mut pool, &clock, Duration::from_secs(10), || false);
    });
    let seen = capture.0.lock().unwrap();
    let ours = |r: &&Record| r.target.starts_with("amqp_rebound");
    let all: Vec<&Record> = seen
        .closed
        .iter()
        .chain(&seen.events)
        .chain(seen.open.values())
        .filter(ours)
        .collect();
    assert!(!all.is_empty());
    for r in &all {
        assert!(
            targets::ALL.contains(&r.target.as_str()),
            "undocumented target {} ({})",
            r.target,
            r.name
        );
        for (field, value) in &r.fields {
            assert!(!value.contains("s3cr3t-pw"), "{}.{field} = {value}", r.name);
        }
    }
    let span = |name: &str, outcome: &str| {
        seen.closed
            .iter()
            .find(|r| {
                r.name == name && r.fields.get("outcome").map(String::as_str) == Some(outcome)
            })
            .unwrap_or_else(|| panic!("no closed {name} span with outcome {outcome}"))
            .clone()
    };
    let dial = span("dial", "ok");
    assert_eq!(dial.target, targets::CONNECTION);
    assert!(dial.fields.contains_key("duration_ms"));
    assert!(dial.fields["endpoint"].contains("127.0.0.1:5672"));
    let failed = span("dial", "error");
    assert!(failed.fields.contains_key("duration_ms"));
    let open = span("channel_open", "ok");
    assert_eq!(open.target, targets::CHANNEL);
    assert!(open.fields.contains_key("duration_ms"));
    let replay = span("replay", "ok");
    assert_eq!(replay.target, targets::TOPOLOGY);
    assert!(replay.fields.contains_key("duration_ms"));
    let recovery = span("recovery", "recovered");
    assert_eq!(recovery.target, targets::CONNECTION);
    assert_eq!(recovery.fields["client"], "telemetry-test");
    assert_eq!(recovery.fields["cause"], "transient");
    let stall: f64 = recovery.fields["stall_ms"].parse().expect("a number");
    assert!(stall >= 100.0, "stall {stall} ms");
    let publish = span("publish", "confirmed");
    assert_eq!(publish.target, targets::PUBLISH);
    assert_eq!(publish.fields["latency_ms"], "5.0");
    assert_eq!(publish.fields["sends"], "1");
    assert!(
        seen.closed.iter().any(|r| r.name == "client"),
        "the driver's span closes with it"
    );
    assert!(
        seen.events.iter().any(|r| r.target == targets::CONNECTION
            && r.fields.get("message").map(String::as_str) == Some("connection recovered")),
        "an INFO event says when a connection is back"
    );
}
