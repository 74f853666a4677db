//! The tracing targets, spans and fields the client emits, through the real
//! Driver over the in-memory transport and a manual clock.
//!
//! A test binary of its own: a subscriber set with `with_default` sees a
//! callsite only if no other thread of the process settles that callsite's
//! interest at the same time, which tests running beside it in one process
//! (`cargo test`) do.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::Client;
use amqp_rebound_core::telemetry::targets;
use futures::task::LocalSpawnExt;
use support::capture::Fields;
use support::drive;
use support::scenario::{outage, publish_held, ready, start};

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
