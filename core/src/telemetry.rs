//! What the client tells operators: the tracing targets, the metric names (one
//! vocabulary for production, the simulator and `rebound-chaos --metrics`), and
//! the latency summaries of [`Stats`](crate::Stats).
//!
//! # Metrics
//!
//! With the `metrics` feature, the client records these through the
//! [`metrics`](https://docs.rs/metrics) crate's facade, into whichever recorder
//! the application installed (Prometheus, StatsD, ...). **Install the recorder
//! before building the client**: the client registers its hot-path handles once,
//! when it is built. Without the feature nothing of this is compiled in.
//!
//! Every metric carries the label `client`: the client's
//! [connection name](crate::ClientBuilder::connection_name), or `unnamed`. The
//! metrics of a connection also carry `host` (`host:port` of one of the
//! configured brokers: no user, password or vhost) and, where they count a
//! failure, `class` (how the error was classified: `transient`,
//! `channel_level`, `refused`). Every label takes values from a set fixed by the
//! configuration, so the number of series is bounded: no message, queue or
//! error text is ever a label. Two clients with the same name add up (gauges
//! move by increments, and a client's share leaves them when it is dropped).
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `amqp_rebound_published_total` | counter | client | publishes accepted into the outbox |
//! | `amqp_rebound_sent_total` | counter | client | publish commands sent to the broker (first sends and re-sends) |
//! | `amqp_rebound_republished_total` | counter | client | re-sends of messages sent before (after a loss, or a nack with `retry_nacked`) |
//! | `amqp_rebound_confirmed_total` | counter | client | publishes confirmed by the broker |
//! | `amqp_rebound_returned_total` | counter | client | mandatory publishes returned unroutable |
//! | `amqp_rebound_nacked_total` | counter | client | publishes nacked by the broker |
//! | `amqp_rebound_timed_out_total` | counter | client | publishes past their deadline (or never connected) |
//! | `amqp_rebound_rejected_total` | counter | client | publishes refused with a channel error |
//! | `amqp_rebound_closed_total` | counter | client | publishes resolved `Closed` by a close |
//! | `amqp_rebound_deliveries_total` | counter | client | deliveries handed to consumers |
//! | `amqp_rebound_stale_acks_total` | counter | client | acks refused as stale (never sent) |
//! | `amqp_rebound_replay_failures_total` | counter | client | topology replay steps that failed |
//! | `amqp_rebound_reconnects_total` | counter | client, host, class | dials after a failure or a loss; `host` is the one dialled, `class` the cause |
//! | `amqp_rebound_recoveries_total` | counter | client, host, class | connections back after a loss; `host` is where, `class` the loss's cause |
//! | `amqp_rebound_outbox_depth` | gauge | client | messages in the outbox (waiting and in flight) |
//! | `amqp_rebound_in_flight` | gauge | client | messages sent and awaiting a confirm |
//! | `amqp_rebound_connections` | gauge | client, state | connection slots by state (`connecting`, `ready`, `reconnecting`, `closing`, `closed`) |
//! | `amqp_rebound_channels` | gauge | client, state | channel slots by state (`opening`, `ready`, `reopening`, `closed`) |
//! | `amqp_rebound_blocked_connections` | gauge | client | Ready connections the broker blocked (resource alarm) |
//! | `amqp_rebound_confirm_latency_seconds` | histogram | client | from a publish's acceptance to the broker's ack or nack |
//! | `amqp_rebound_recovery_stall_seconds` | histogram | client, host | from the loss of a Ready connection to a channel of it Ready again |
//! | `amqp_rebound_dial_duration_seconds` | histogram | client, host, outcome | one dial (TCP, TLS, AMQP handshake); `outcome` is `ok` or `error` |
//!
//! The counters are the [`Stats`](crate::Stats) fields of the same names
//! (`reconnects` and `recoveries` summed over their labels). They are brought up
//! to date after every input the client handles, not one by one.
//!
//! ```no_run
//! # #[cfg(feature = "metrics")]
//! # fn f() {
//! // print every name with its type and labels
//! for m in amqp_rebound_core::telemetry::METRICS {
//!     println!("{} ({:?}; {})", m.name, m.kind, m.labels.join(", "));
//! }
//! # }
//! ```
//!
//! # Tracing
//!
//! The targets and fields are listed in the crate docs (`Tracing`); their
//! names are the constants of [`targets`].

use std::time::Duration;

/// The tracing targets: stable, documented in the crate docs. Filter on them
/// (`RUST_LOG=amqp_rebound::connection=info`) rather than on module paths.
pub mod targets {
    /// The driver's span and its own events.
    pub const CLIENT: &str = "amqp_rebound::client";
    /// Dials, connection state, losses, recoveries, blocked connections.
    pub const CONNECTION: &str = "amqp_rebound::connection";
    /// Channel opens and channel state.
    pub const CHANNEL: &str = "amqp_rebound::channel";
    /// Topology replay and operations, queue renames, consumers.
    pub const TOPOLOGY: &str = "amqp_rebound::topology";
    /// One span per publish, at TRACE.
    pub const PUBLISH: &str = "amqp_rebound::publish";
    /// Every target, for tests and filters.
    pub const ALL: [&str; 5] = [CLIENT, CONNECTION, CHANNEL, TOPOLOGY, PUBLISH];
}

/// The metric names (see the [module docs](self) for their labels).
pub mod names {
    /// Counter: publishes accepted.
    pub const PUBLISHED: &str = "amqp_rebound_published_total";
    /// Counter: publish commands sent.
    pub const SENT: &str = "amqp_rebound_sent_total";
    /// Counter: re-sends.
    pub const REPUBLISHED: &str = "amqp_rebound_republished_total";
    /// Counter: confirmed publishes.
    pub const CONFIRMED: &str = "amqp_rebound_confirmed_total";
    /// Counter: returned publishes.
    pub const RETURNED: &str = "amqp_rebound_returned_total";
    /// Counter: nacked publishes.
    pub const NACKED: &str = "amqp_rebound_nacked_total";
    /// Counter: timed-out publishes.
    pub const TIMED_OUT: &str = "amqp_rebound_timed_out_total";
    /// Counter: rejected publishes.
    pub const REJECTED: &str = "amqp_rebound_rejected_total";
    /// Counter: publishes resolved Closed.
    pub const CLOSED: &str = "amqp_rebound_closed_total";
    /// Counter: deliveries.
    pub const DELIVERIES: &str = "amqp_rebound_deliveries_total";
    /// Counter: stale acks refused.
    pub const STALE_ACKS: &str = "amqp_rebound_stale_acks_total";
    /// Counter: replay steps failed.
    pub const REPLAY_FAILURES: &str = "amqp_rebound_replay_failures_total";
    /// Counter: reconnect dials, by host and cause class.
    pub const RECONNECTS: &str = "amqp_rebound_reconnects_total";
    /// Counter: recoveries, by host and cause class.
    pub const RECOVERIES: &str = "amqp_rebound_recoveries_total";
    /// Gauge: messages in the outbox.
    pub const OUTBOX_DEPTH: &str = "amqp_rebound_outbox_depth";
    /// Gauge: messages in flight.
    pub const IN_FLIGHT: &str = "amqp_rebound_in_flight";
    /// Gauge: connection slots by state.
    pub const CONNECTIONS: &str = "amqp_rebound_connections";
    /// Gauge: channel slots by state.
    pub const CHANNELS: &str = "amqp_rebound_channels";
    /// Gauge: blocked connections.
    pub const BLOCKED_CONNECTIONS: &str = "amqp_rebound_blocked_connections";
    /// Histogram (seconds): publish to confirm.
    pub const CONFIRM_LATENCY: &str = "amqp_rebound_confirm_latency_seconds";
    /// Histogram (seconds): loss to Ready.
    pub const RECOVERY_STALL: &str = "amqp_rebound_recovery_stall_seconds";
    /// Histogram (seconds): one dial.
    pub const DIAL_DURATION: &str = "amqp_rebound_dial_duration_seconds";
}

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of values (seconds).
    Histogram,
}

/// One metric the client records: [`METRICS`] lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricInfo {
    /// Its name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its label keys.
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
}

const fn info(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric the client records with the `metrics` feature.
pub const METRICS: &[MetricInfo] = {
    use MetricKind::{Counter, Gauge, Histogram};
    use names::*;
    const C: &[&str] = &["client"];
    &[
        info(PUBLISHED, Counter, C, "Publishes accepted into the outbox."),
        info(
            SENT,
            Counter,
            C,
            "Publish commands sent (first sends and re-sends).",
        ),
        info(
            REPUBLISHED,
            Counter,
            C,
            "Re-sends of messages sent before, after a loss.",
        ),
        info(CONFIRMED, Counter, C, "Publishes confirmed by the broker."),
        info(
            RETURNED,
            Counter,
            C,
            "Mandatory publishes returned unroutable.",
        ),
        info(NACKED, Counter, C, "Publishes nacked by the broker."),
        info(TIMED_OUT, Counter, C, "Publishes past their deadline."),
        info(
            REJECTED,
            Counter,
            C,
            "Publishes refused with a channel error.",
        ),
        info(CLOSED, Counter, C, "Publishes resolved Closed by a close."),
        info(DELIVERIES, Counter, C, "Deliveries handed to consumers."),
        info(
            STALE_ACKS,
            Counter,
            C,
            "Acks refused as stale (never sent).",
        ),
        info(
            REPLAY_FAILURES,
            Counter,
            C,
            "Topology replay steps that failed.",
        ),
        info(
            RECONNECTS,
            Counter,
            &["client", "host", "class"],
            "Dials after a failure or loss, by host dialled and cause class.",
        ),
        info(
            RECOVERIES,
            Counter,
            &["client", "host", "class"],
            "Connections back after a loss, by host and the loss's class.",
        ),
        info(
            OUTBOX_DEPTH,
            Gauge,
            C,
            "Messages in the outbox (waiting and in flight).",
        ),
        info(IN_FLIGHT, Gauge, C, "Messages sent and awaiting a confirm."),
        info(
            CONNECTIONS,
            Gauge,
            &["client", "state"],
            "Connection slots by state.",
        ),
        info(
            CHANNELS,
            Gauge,
            &["client", "state"],
            "Channel slots by state.",
        ),
        info(
            BLOCKED_CONNECTIONS,
            Gauge,
            C,
            "Ready connections blocked by the broker.",
        ),
        info(
            CONFIRM_LATENCY,
            Histogram,
            C,
            "Seconds from a publish's acceptance to the broker's ack or nack.",
        ),
        info(
            RECOVERY_STALL,
            Histogram,
            &["client", "host"],
            "Seconds from the loss of a Ready connection to a channel of it Ready again.",
        ),
        info(
            DIAL_DURATION,
            Histogram,
            &["client", "host", "outcome"],
            "Seconds one dial took (TCP, TLS, AMQP handshake).",
        ),
    ]
};

/// Sub-buckets per power of two: a quantile is reported at most 1/8 above the
/// true value.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Values are microseconds, clamped below 2^40 µs (12.7 days).
const MAX_BITS: u32 = 40;
const BUCKETS: usize = (MAX_BITS - SUB_BITS) as usize * SUB + SUB;

/// A fixed-size log-linear histogram of durations (microseconds, 8 buckets per
/// power of two): recording is an index computation and an increment, memory
/// is 2.4 KiB whatever the count. Written here rather than taken from
/// `hdrhistogram` because two quantiles within 12.5 % are all `Stats` needs,
/// and this needs no allocation per value, no dependency and no error path.
#[derive(Clone)]
pub(crate) struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl LatencyHistogram {
    fn index(us: u64) -> usize {
        let v = us.min((1 << MAX_BITS) - 1);
        if v < SUB as u64 {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        // the top SUB_BITS + 1 bits: in [SUB, 2 * SUB)
        let mantissa = (v >> shift) as usize;
        (shift as usize + 1) * SUB + mantissa - SUB
    }

    /// The highest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let shift = (i / SUB - 1) as u32;
        let mantissa = (SUB + i % SUB) as u64;
        ((mantissa + 1) << shift) - 1
    }

    pub(crate) fn record(&mut self, value: Duration) {
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    /// The `q` quantile (0 < q <= 1), rounded up to its bucket's highest value;
    /// `None` before the first value.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(Self::upper(i)));
            }
        }
        None
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// `host:port` of an endpoint: its label, without user, password or vhost.
#[cfg(feature = "metrics")]
fn host_label(endpoint: &crate::Endpoint) -> String {
    let host = endpoint.host();
    if host.contains(':') {
        format!("[{host}]:{}", endpoint.port())
    } else {
        format!("{host}:{}", endpoint.port())
    }
}

/// The label value of an error class.
pub(crate) fn class_label(class: crate::ErrorClass) -> &'static str {
    match class {
        crate::ErrorClass::Transient => "transient",
        crate::ErrorClass::ChannelLevel => "channel_level",
        crate::ErrorClass::Refused => "refused",
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use noop::Metrics;
#[cfg(feature = "metrics")]
pub(crate) use recorder::Metrics;

/// The supervisor's metrics, with the `metrics` feature.
#[cfg(feature = "metrics")]
mod recorder {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use metrics::{Counter, Gauge, Histogram, Label, SharedString};

    use super::{MetricKind, host_label, names};
    use crate::config::Config;
    use crate::endpoint::Endpoint;
    use crate::error::ErrorClass;
    use crate::state::Phase;
    use crate::supervisor::Stats;

    /// Reads one counter of `Stats`.
    type StatField = fn(&Stats) -> u64;

    const CONN_PHASES: [(Phase, &str); 5] = [
        (Phase::Connecting, "connecting"),
        (Phase::Ready, "ready"),
        (Phase::Reconnecting, "reconnecting"),
        (Phase::Closing, "closing"),
        (Phase::Closed, "closed"),
    ];
    const CHAN_PHASES: [(Phase, &str); 4] = [
        (Phase::Opening, "opening"),
        (Phase::Ready, "ready"),
        (Phase::Reopening, "reopening"),
        (Phase::Closed, "closed"),
    ];

    /// Handles registered once (the hot path touches only these), the values
    /// already reported (gauges move by deltas, so clients sharing a name add
    /// up and a dropped client takes its share back), and what a connection
    /// slot's next figures need.
    pub(crate) struct Metrics {
        client: SharedString,
        hosts: Vec<SharedString>,
        counters: [(Counter, StatField); 12],
        reported: [u64; 12],
        outbox_depth: Gauge,
        in_flight: Gauge,
        depth: (usize, usize),
        blocked: Gauge,
        blocked_now: u64,
        connections: [Gauge; 5],
        connections_now: [u64; 5],
        channels: [Gauge; 4],
        channels_now: [u64; 4],
        confirm_latency: Histogram,
        /// Per slot: when its dial went out, to which host.
        dialling: Vec<Option<(Instant, usize)>>,
        /// Per slot: the class of its last failure (the cause of its next dial).
        cause: Vec<Option<ErrorClass>>,
    }

    fn phase_index(table: &[(Phase, &str)], phase: Phase) -> Option<usize> {
        table.iter().position(|(p, _)| *p == phase)
    }

    impl Metrics {
        pub(crate) fn new(config: &Config, hosts: &[Arc<Endpoint>]) -> Metrics {
            for m in super::METRICS {
                match m.kind {
                    MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
                    MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
                    MetricKind::Histogram => {
                        metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help)
                    }
                }
            }
            let client =
                SharedString::from(config.name.clone().unwrap_or_else(|| "unnamed".into()));
            let labels = || vec![Label::new("client", client.clone())];
            let counter = |name: &'static str| metrics::counter!(name, labels());
            let gauge = |name: &'static str| metrics::gauge!(name, labels());
            let state_gauge = |name: &'static str, state: &'static str| metrics::gauge!(name, "client" => client.clone(), "state" => state);
            let counters: [(Counter, StatField); 12] = [
                (counter(names::PUBLISHED), |s| s.published),
                (counter(names::SENT), |s| s.sent),
                (counter(names::REPUBLISHED), |s| s.republished),
                (counter(names::CONFIRMED), |s| s.confirmed),
                (counter(names::RETURNED), |s| s.returned),
                (counter(names::NACKED), |s| s.nacked),
                (counter(names::TIMED_OUT), |s| s.timed_out),
                (counter(names::REJECTED), |s| s.rejected),
                (counter(names::CLOSED), |s| s.closed),
                (counter(names::DELIVERIES), |s| s.deliveries),
                (counter(names::STALE_ACKS), |s| s.stale_acks),
                (counter(names::REPLAY_FAILURES), |s| s.replay_failures),
            ];
            let n = config.connections;
            let channels = config.connections * config.channels_per_connection;
            let mut metrics = Metrics {
                hosts: hosts
                    .iter()
                    .map(|h| SharedString::from(host_label(h)))
                    .collect(),
                counters,
                reported: [0; 12],
                outbox_depth: gauge(names::OUTBOX_DEPTH),
                in_flight: gauge(names::IN_FLIGHT),
                depth: (0, 0),
                blocked: gauge(names::BLOCKED_CONNECTIONS),
                blocked_now: 0,
                connections: CONN_PHASES.map(|(_, s)| state_gauge(names::CONNECTIONS, s)),
                connections_now: [0; 5],
                channels: CHAN_PHASES.map(|(_, s)| state_gauge(names::CHANNELS, s)),
                channels_now: [0; 4],
                confirm_latency: metrics::histogram!(names::CONFIRM_LATENCY, labels()),
                dialling: vec![None; n],
                cause: vec![None; n],
                client,
            };
            // the slots' first states, set without a transition
            metrics.connections[0].increment(n as f64);
            metrics.connections_now[0] = n as u64;
            metrics.channels[0].increment(channels as f64);
            metrics.channels_now[0] = channels as u64;
            metrics
        }

        /// Brings the counters and depth gauges up to `stats` (after an input).
        pub(crate) fn sync(&mut self, stats: &Stats, outbox_depth: usize, in_flight: usize) {
            for ((counter, field), reported) in self.counters.iter().zip(&mut self.reported) {
                let now = field(stats);
                if now != *reported {
                    counter.increment(now.saturating_sub(*reported));
                    *reported = now;
                }
            }
            move_gauge(&self.outbox_depth, &mut self.depth.0, outbox_depth);
            move_gauge(&self.in_flight, &mut self.depth.1, in_flight);
        }

        pub(crate) fn connection_phase(&mut self, from: Phase, to: Phase, was_blocked: bool) {
            if from != to {
                shift(
                    &self.connections,
                    &mut self.connections_now,
                    &CONN_PHASES,
                    from,
                    to,
                );
            }
            if was_blocked && to != Phase::Ready {
                self.blocked(false);
            }
        }

        pub(crate) fn channel_phase(&mut self, from: Phase, to: Phase) {
            shift(
                &self.channels,
                &mut self.channels_now,
                &CHAN_PHASES,
                from,
                to,
            );
        }

        pub(crate) fn blocked(&mut self, blocked: bool) {
            if blocked {
                self.blocked_now += 1;
                self.blocked.increment(1.0);
            } else if self.blocked_now > 0 {
                self.blocked_now -= 1;
                self.blocked.decrement(1.0);
            }
        }

        fn labels(&self, host: usize) -> Vec<Label> {
            let mut labels = vec![Label::new("client", self.client.clone())];
            if let Some(host) = self.hosts.get(host) {
                labels.push(Label::new("host", host.clone()));
            }
            labels
        }

        /// Slot `c` dials host `host`; `reconnect` unless it is the slot's first.
        pub(crate) fn dial(&mut self, c: usize, host: usize, now: Instant, reconnect: bool) {
            if reconnect {
                let class = self.cause[c].map_or("unknown", super::class_label);
                let mut labels = self.labels(host);
                labels.push(Label::new("class", class));
                metrics::counter!(names::RECONNECTS, labels).increment(1);
            }
            self.dialling[c] = Some((now, host));
        }

        /// Slot `c`'s dial ended (a no-op when none was out).
        pub(crate) fn dial_done(&mut self, c: usize, now: Instant, ok: bool) {
            let Some((at, host)) = self.dialling[c].take() else {
                return;
            };
            let mut labels = self.labels(host);
            labels.push(Label::new("outcome", if ok { "ok" } else { "error" }));
            metrics::histogram!(names::DIAL_DURATION, labels)
                .record(now.saturating_duration_since(at).as_secs_f64());
        }

        /// Slot `c` failed (a dial or a loss) with an error of `class`.
        pub(crate) fn failed(&mut self, c: usize, class: ErrorClass) {
            self.cause[c] = Some(class);
        }

        /// Slot `c` is back on `host` after a loss of `class`.
        pub(crate) fn recovered(&mut self, host: usize, class: ErrorClass) {
            let mut labels = self.labels(host);
            labels.push(Label::new("class", super::class_label(class)));
            metrics::counter!(names::RECOVERIES, labels).increment(1);
        }

        pub(crate) fn stall(&mut self, host: usize, stall: Duration) {
            metrics::histogram!(names::RECOVERY_STALL, self.labels(host))
                .record(stall.as_secs_f64());
        }

        #[inline]
        pub(crate) fn confirm_latency(&mut self, latency: Duration) {
            self.confirm_latency.record(latency.as_secs_f64());
        }
    }

    fn move_gauge(gauge: &Gauge, reported: &mut usize, now: usize) {
        if now > *reported {
            gauge.increment((now - *reported) as f64);
        } else if now < *reported {
            gauge.decrement((*reported - now) as f64);
        }
        *reported = now;
    }

    fn shift(
        gauges: &[Gauge],
        counts: &mut [u64],
        table: &[(Phase, &str)],
        from: Phase,
        to: Phase,
    ) {
        if let Some(i) = phase_index(table, from)
            && counts[i] > 0
        {
            counts[i] -= 1;
            gauges[i].decrement(1.0);
        }
        if let Some(i) = phase_index(table, to) {
            counts[i] += 1;
            gauges[i].increment(1.0);
        }
    }

    impl Drop for Metrics {
        /// A client that is gone takes its share out of the gauges.
        fn drop(&mut self) {
            self.outbox_depth.decrement(self.depth.0 as f64);
            self.in_flight.decrement(self.depth.1 as f64);
            self.blocked.decrement(self.blocked_now as f64);
            for (gauge, n) in self.connections.iter().zip(self.connections_now) {
                gauge.decrement(n as f64);
            }
            for (gauge, n) in self.channels.iter().zip(self.channels_now) {
                gauge.decrement(n as f64);
            }
        }
    }
}

/// Without the `metrics` feature: nothing, inlined away.
#[cfg(not(feature = "metrics"))]
mod noop {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::config::Config;
    use crate::endpoint::Endpoint;
    use crate::error::ErrorClass;
    use crate::state::Phase;

    pub(crate) struct Metrics;

    impl Metrics {
        #[inline(always)]
        pub(crate) fn new(_: &Config, _: &[Arc<Endpoint>]) -> Metrics {
            Metrics
        }
        #[inline(always)]
        pub(crate) fn connection_phase(&mut self, _: Phase, _: Phase, _: bool) {}
        #[inline(always)]
        pub(crate) fn channel_phase(&mut self, _: Phase, _: Phase) {}
        #[inline(always)]
        pub(crate) fn blocked(&mut self, _: bool) {}
        #[inline(always)]
        pub(crate) fn dial(&mut self, _: usize, _: usize, _: Instant, _: bool) {}
        #[inline(always)]
        pub(crate) fn dial_done(&mut self, _: usize, _: Instant, _: bool) {}
        #[inline(always)]
        pub(crate) fn failed(&mut self, _: usize, _: ErrorClass) {}
        #[inline(always)]
        pub(crate) fn recovered(&mut self, _: usize, _: ErrorClass) {}
        #[inline(always)]
        pub(crate) fn stall(&mut self, _: usize, _: Duration) {}
        #[inline(always)]
        pub(crate) fn confirm_latency(&mut self, _: Duration) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_continuous_and_within_an_eighth() {
        let mut last = 0;
        for us in [0u64, 1, 7, 8, 9, 15, 16, 17, 100, 1_000, 123_456, 1 << 39] {
            let i = LatencyHistogram::index(us);
            assert!(i >= last, "index is monotonic");
            last = i;
            let upper = LatencyHistogram::upper(i);
            assert!(upper >= us, "{us} <= {upper}");
            assert!(upper - us <= us / 8, "{us}: {upper} is more than 1/8 above");
        }
        // every bucket's range starts right after the previous one's
        for i in 1..BUCKETS {
            assert_eq!(
                LatencyHistogram::index(LatencyHistogram::upper(i - 1) + 1),
                i
            );
        }
        assert_eq!(LatencyHistogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).expect("p50");
        let p99 = h.quantile(0.99).expect("p99");
        assert!(p50 >= Duration::from_millis(50) && p50 <= Duration::from_micros(56_250));
        assert!(p99 >= Duration::from_millis(99) && p99 <= Duration::from_micros(111_375));
        h.record(Duration::MAX);
        assert!(h.quantile(1.0).expect("max") >= Duration::from_secs(86_400));
    }

    #[test]
    fn every_metric_is_listed_once_with_the_client_label() {
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        for m in METRICS {
            assert_eq!(m.labels.first(), Some(&"client"), "{}", m.name);
            assert!(m.name.starts_with("amqp_rebound_"));
            match m.kind {
                MetricKind::Counter => assert!(m.name.ends_with("_total")),
                MetricKind::Histogram => assert!(m.name.ends_with("_seconds")),
                MetricKind::Gauge => {}
            }
        }
    }
}
