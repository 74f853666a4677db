//! What the client tells operators, through the real Driver over the in-memory
//! transport and a manual clock: latency summaries in `Stats`, the bounded
//! `watch()` (the tracing targets, spans and fields: `tracing_targets.rs`).

mod support;

use std::time::Duration;

use amqp_rebound_core::{Client, ConfigError, Event};
use futures::{FutureExt, StreamExt};
use support::scenario::URL;
use support::scenario::{outage, publish_held, ready, start};
use support::{ManualClock, MemoryTransport};

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
