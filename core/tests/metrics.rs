//! The `metrics` feature: what a recorder receives from the real Driver over the
//! in-memory transport and a manual clock. Without the feature this file is
//! empty (there is nothing to record into).
#![cfg(feature = "metrics")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::telemetry::{METRICS, MetricKind, names};
use amqp_rebound_core::{Client, TransportError};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use support::{ManualClock, MemoryTransport, drive};

const URL: &str = "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f";

type Labels = Vec<(String, String)>;

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// Keeps every counter, gauge and histogram by name and labels.
#[derive(Default)]
struct Capture {
    described: Mutex<BTreeSet<String>>,
    counters: Mutex<BTreeMap<(String, Labels), Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<(String, Labels), Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<(String, Labels), Arc<Samples>>>,
}

fn key_of(key: &Key) -> (String, Labels) {
    let mut labels: Labels = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

impl Recorder for Capture {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned());
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = Arc::clone(
            self.counters
                .lock()
                .unwrap()
                .entry(key_of(key))
                .or_default(),
        );
        Counter::from_arc(cell)
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let cell = Arc::clone(self.gauges.lock().unwrap().entry(key_of(key)).or_default());
        Gauge::from_arc(cell)
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let cell = Arc::clone(
            self.histograms
                .lock()
                .unwrap()
                .entry(key_of(key))
                .or_default(),
        );
        Histogram::from_arc(cell)
    }
}

impl Capture {
    /// The counter `name` summed over its label sets.
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v.load(Ordering::Relaxed))
            .sum()
    }

    /// The counter `name` with exactly these labels besides `client`.
    fn counter_with(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut want: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        want.push(("client".into(), "metrics-test".into()));
        want.sort();
        self.counters
            .lock()
            .unwrap()
            .get(&(name.to_owned(), want))
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// The gauge `name`, where its `state` label (if any) is `state`.
    fn gauge(&self, name: &str, state: Option<&str>) -> f64 {
        self.gauges
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && state.is_none_or(|s| labels.iter().any(|(k, v)| k == "state" && v == s))
            })
            .map(|(_, v)| f64::from_bits(v.load(Ordering::Relaxed)))
            .sum()
    }

    /// Every value recorded into the histogram `name`.
    fn samples(&self, name: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| n == name)
            .flat_map(|(_, v)| v.0.lock().unwrap().clone())
            .collect()
    }

    fn all_keys(&self) -> Vec<(String, Labels)> {
        let mut keys: Vec<_> = self.counters.lock().unwrap().keys().cloned().collect();
        keys.extend(self.gauges.lock().unwrap().keys().cloned());
        keys.extend(self.histograms.lock().unwrap().keys().cloned());
        keys
    }
}

#[test]
fn a_recorder_gets_the_stats_gauges_and_histograms_with_bounded_labels() {
    let capture = Capture::default();
    metrics::with_local_recorder(&capture, || {
        let mut pool = LocalPool::new();
        let clock = ManualClock::new();
        let transport = MemoryTransport::default();
        let (client, driver) = Client::builder()
            .hosts([URL])
            .pool(1, 3)
            .seed(1)
            .connection_name("metrics-test")
            .build(transport.clone(), clock.clone())
            .expect("valid config");
        pool.spawner().spawn_local(driver).expect("spawn");
        assert_eq!(capture.gauge(names::CONNECTIONS, Some("connecting")), 1.0);
        assert_eq!(capture.gauge(names::CHANNELS, Some("opening")), 3.0);
        assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
            .state()
            .is_ready()));
        assert_eq!(capture.gauge(names::CONNECTIONS, Some("ready")), 1.0);
        assert_eq!(capture.gauge(names::CONNECTIONS, None), 1.0, "one slot");
        assert_eq!(capture.gauge(names::CHANNELS, Some("ready")), 3.0);
        assert_eq!(capture.gauge(names::CHANNELS, None), 3.0);

        // 10 publishes whose confirms the broker holds for 40 ms
        transport.broker().hold_confirms = true;
        let done = support::scenario::spawn_confirmed(&pool, &client, 10);
        pool.run_until_stalled();
        assert_eq!(capture.counter(names::PUBLISHED), 10);
        assert_eq!(capture.gauge(names::OUTBOX_DEPTH, None), 10.0);
        assert_eq!(capture.gauge(names::IN_FLIGHT, None), 10.0);
        clock.advance(Duration::from_millis(40));
        transport.release_confirms();
        assert!(drive(&mut pool, &clock, Duration::from_secs(5), || *done
            .lock()
            .unwrap()
            == 10));
        assert_eq!(capture.counter(names::CONFIRMED), 10);
        assert_eq!(capture.gauge(names::OUTBOX_DEPTH, None), 0.0);
        assert_eq!(capture.gauge(names::IN_FLIGHT, None), 0.0);
        assert_eq!(capture.samples(names::CONFIRM_LATENCY), vec![0.04; 10]);

        // a loss after useful work, dials refused for 300 ms, then back
        clock.advance(Duration::from_millis(200));
        pool.run_until_stalled();
        transport.broker().refuse = Some(TransportError::Io("connection refused".into()));
        transport.block_all(true);
        pool.run_until_stalled();
        assert_eq!(capture.gauge(names::BLOCKED_CONNECTIONS, None), 1.0);
        transport.kill_all();
        drive(&mut pool, &clock, Duration::from_millis(300), || false);
        assert_eq!(
            capture.gauge(names::BLOCKED_CONNECTIONS, None),
            0.0,
            "a lost connection is no longer blocked"
        );
        assert_eq!(capture.gauge(names::CONNECTIONS, Some("ready")), 0.0);
        assert_eq!(capture.gauge(names::CONNECTIONS, None), 1.0);
        transport.broker().refuse = None;
        assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
            .state()
            .is_ready()));
        pool.run_until_stalled();

        let stats = client.stats();
        assert!(stats.reconnects >= 2, "{stats:?}");
        assert_eq!(capture.counter(names::RECONNECTS), stats.reconnects);
        assert_eq!(
            capture.counter_with(
                names::RECONNECTS,
                &[("host", "127.0.0.1:5672"), ("class", "transient")]
            ),
            stats.reconnects,
            "every reconnect was caused by a transient error, on the one host"
        );
        assert_eq!(capture.counter(names::RECOVERIES), 1);
        assert_eq!(
            capture.counter_with(
                names::RECOVERIES,
                &[("host", "127.0.0.1:5672"), ("class", "transient")]
            ),
            1
        );
        let stalls = capture.samples(names::RECOVERY_STALL);
        assert_eq!(stalls.len(), 1);
        assert_eq!(
            Some(Duration::from_secs_f64(stalls[0])),
            stats.last_recovery_stall,
            "the histogram and Stats agree"
        );
        assert!(stalls[0] >= 0.3, "{stalls:?}");
        let dials = capture.samples(names::DIAL_DURATION);
        assert_eq!(
            dials.len() as u64,
            1 + stats.reconnects,
            "every dial measured"
        );
        assert_eq!(
            capture
                .histograms
                .lock()
                .unwrap()
                .keys()
                .filter(|(n, l)| n == names::DIAL_DURATION
                    && l.contains(&("outcome".into(), "error".into())))
                .count(),
            1,
            "the refused dials are measured apart"
        );
        for (name, field) in [
            (names::PUBLISHED, stats.published),
            (names::SENT, stats.sent),
            (names::REPUBLISHED, stats.republished),
            (names::CONFIRMED, stats.confirmed),
            (names::RETURNED, stats.returned),
            (names::NACKED, stats.nacked),
            (names::TIMED_OUT, stats.timed_out),
            (names::REJECTED, stats.rejected),
            (names::CLOSED, stats.closed),
            (names::DELIVERIES, stats.deliveries),
            (names::STALE_ACKS, stats.stale_acks),
            (names::REPLAY_FAILURES, stats.replay_failures),
        ] {
            assert_eq!(capture.counter(name), field, "{name} is Stats' field");
        }

        // every name is documented and described; every label is declared,
        // bounded (no message data) and shows no password
        let described = capture.described.lock().unwrap().clone();
        for (name, labels) in capture.all_keys() {
            let info = METRICS
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} is not in METRICS"));
            assert!(described.contains(&name), "{name} is described");
            let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            for key in &keys {
                assert!(
                    info.labels.contains(key) || (*key == "state" || *key == "outcome"),
                    "{name}: label {key} not declared"
                );
            }
            for (key, value) in &labels {
                let allowed: &[&str] = match key.as_str() {
                    "client" => &["metrics-test"],
                    "host" => &["127.0.0.1:5672"],
                    "class" => &["transient", "channel_level", "refused"],
                    "outcome" => &["ok", "error"],
                    "state" => &[
                        "connecting",
                        "ready",
                        "reconnecting",
                        "closing",
                        "closed",
                        "opening",
                        "reopening",
                    ],
                    other => panic!("{name}: unexpected label {other}"),
                };
                assert!(allowed.contains(&value.as_str()), "{name}: {key}={value}");
            }
        }
        let histograms = METRICS
            .iter()
            .filter(|m| m.kind == MetricKind::Histogram)
            .count();
        assert_eq!(histograms, 3);

        // a client that is gone takes its share out of the gauges
        drop(client);
        drive(&mut pool, &clock, Duration::from_secs(10), || false);
        drop(pool);
        for gauge in [
            names::CONNECTIONS,
            names::CHANNELS,
            names::OUTBOX_DEPTH,
            names::IN_FLIGHT,
            names::BLOCKED_CONNECTIONS,
        ] {
            assert_eq!(capture.gauge(gauge, None), 0.0, "{gauge} after the drop");
        }
    });
}
