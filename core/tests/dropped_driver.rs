//! A driver dropped before it ended (its runtime shut down: `main` returned
//! from `#[tokio::main]`, a `#[tokio::test]` ended) cannot drain: what it owed
//! resolves `Closed` there. It says so, as a warning that counts them, instead
//! of losing them without a word.
//!
//! A test binary of its own: a subscriber set with `with_default` sees a
//! callsite only if no other thread of the process settles that callsite's
//! interest at the same time (see `tracing_targets.rs`).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::telemetry::targets;
use amqp_rebound_core::{Client, Properties};
use support::capture::Fields;
use support::drive;
use support::scenario::{ready, start};

/// A WARN event: its target and fields.
type Warning = (String, BTreeMap<String, String>);

/// The WARN events seen.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<Warning>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((event.metadata().target().to_owned(), fields));
    }
}

/// Publishes `n` messages fire-and-forget whose confirms the broker holds,
/// drops every client handle, then drops the driver (the executor goes, as a
/// runtime's tasks go when it shuts down); the warnings seen.
fn drop_the_driver_owing(n: u32) -> Vec<Warning> {
    use tracing_subscriber::layer::SubscriberExt;

    let warnings = Warnings::default();
    let subscriber = tracing_subscriber::registry().with(warnings.clone());
    tracing::subscriber::with_default(subscriber, || {
        let (mut pool, clock, transport, client) = start(Client::builder());
        ready(&mut pool, &clock, &client);
        transport.broker().hold_confirms = true;
        for i in 0..n {
            drop(client.publish("", "q", i.to_string(), Properties::default()));
        }
        drive(&mut pool, &clock, Duration::from_millis(10), || false);
        assert_eq!(client.stats().in_flight, n as usize);
        drop(client);
        drive(&mut pool, &clock, Duration::from_millis(10), || false);
        // the driver, draining for the dropped handles, goes with its executor
        drop(pool);
    });
    let seen = warnings.0.lock().unwrap();
    seen.clone()
}

#[test]
fn a_driver_dropped_with_messages_owed_warns_how_many_it_did_not_confirm() {
    let seen = drop_the_driver_owing(10);
    let warned: Vec<_> = seen
        .iter()
        .filter(|(_, fields)| fields.contains_key("unresolved"))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "one warning for the unconfirmed messages: {seen:?}"
    );
    let (target, fields) = warned[0];
    assert_eq!(target, targets::CLIENT);
    assert_eq!(fields["unresolved"], "10");
    assert_eq!(fields["client"], "telemetry-test");
    assert!(
        fields["message"].contains("Client::close"),
        "it says what to do: {fields:?}"
    );

    // owing nothing, it says nothing
    let seen = drop_the_driver_owing(0);
    assert!(
        seen.iter()
            .all(|(_, fields)| !fields.contains_key("unresolved")),
        "{seen:?}"
    );
}
