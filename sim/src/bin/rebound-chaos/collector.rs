//! `--metrics`: a recorder that keeps the client's metrics in memory, and the
//! printout of their final values under the names a production client exports
//! (the core's `telemetry::METRICS`), so a simulated run and a Prometheus
//! dashboard speak one vocabulary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use amqp_rebound_core::telemetry::{METRICS, MetricKind};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use serde::Serialize;

/// A metric's name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }
}

#[derive(Default)]
struct Inner {
    counters: Mutex<BTreeMap<Series, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<Series, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<Series, Arc<Samples>>>,
}

/// The recorder: install a clone globally, read the other at the end.
#[derive(Clone, Default)]
pub struct Collector(Arc<Inner>);

fn series(key: &Key) -> Series {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

fn cell<T: Default>(map: &Mutex<BTreeMap<Series, Arc<T>>>, key: &Key) -> Arc<T> {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(map.entry(series(key)).or_default())
}

impl Recorder for Collector {
    // the names and their help come from METRICS
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(cell(&self.0.counters, key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(cell(&self.0.gauges, key))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(cell(&self.0.histograms, key))
    }
}

/// One series' final value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Value {
    /// The metric's name.
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Counters and gauges: the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Histograms: how many values, and their p50, p99 and maximum (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

fn rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

impl Collector {
    /// Every series recorded, metric by metric in the order of `METRICS`.
    pub fn values(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for m in METRICS {
            let labels = |l: &[(String, String)]| l.iter().cloned().collect();
            match m.kind {
                MetricKind::Counter | MetricKind::Gauge => {
                    let counter = m.kind == MetricKind::Counter;
                    let map = if counter {
                        &self.0.counters
                    } else {
                        &self.0.gauges
                    };
                    let map = map.lock().unwrap_or_else(PoisonError::into_inner);
                    for ((_, l), v) in map.iter().filter(|((n, _), _)| n == m.name) {
                        let raw = v.load(Ordering::Relaxed);
                        out.push(Value {
                            name: m.name,
                            kind: if counter { "counter" } else { "gauge" },
                            labels: labels(l),
                            value: Some(if counter {
                                raw as f64
                            } else {
                                f64::from_bits(raw)
                            }),
                            count: None,
                            p50: None,
                            p99: None,
                            max: None,
                        });
                    }
                }
                // histograms (and any kind a later core adds)
                _ => {
                    let map = self
                        .0
                        .histograms
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    for ((_, l), samples) in map.iter().filter(|((n, _), _)| n == m.name) {
                        let mut sorted = samples
                            .0
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone();
                        sorted.sort_by(f64::total_cmp);
                        out.push(Value {
                            name: m.name,
                            kind: "histogram",
                            labels: labels(l),
                            value: None,
                            count: Some(sorted.len()),
                            p50: rank(&sorted, 0.5),
                            p99: rank(&sorted, 0.99),
                            max: sorted.last().copied(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The text printout: every metric name, each series with its final value.
    pub fn print(&self) {
        let values = self.values();
        println!(
            "  metrics     (the names a client with the `metrics` feature exports; final values)"
        );
        for m in METRICS {
            let mine: Vec<&Value> = values.iter().filter(|v| v.name == m.name).collect();
            if mine.is_empty() {
                println!("    {} -", m.name);
            }
            for v in mine {
                let labels: Vec<String> = v
                    .labels
                    .iter()
                    .map(|(k, val)| format!("{k}=\"{val}\""))
                    .collect();
                let series = format!("{}{{{}}}", v.name, labels.join(","));
                match (v.value, v.count) {
                    (Some(value), _) => println!("    {series} {value}"),
                    (None, Some(count)) => {
                        let ms = |s: Option<f64>| {
                            s.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s * 1e3))
                        };
                        println!(
                            "    {series} count {count}, p50 {}, p99 {}, max {}",
                            ms(v.p50),
                            ms(v.p99),
                            ms(v.max)
                        );
                    }
                    (None, None) => println!("    {series} -"),
                }
            }
        }
    }
}
