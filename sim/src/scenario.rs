//! What a simulation runs: a [`Scenario`] is a [`Workload`] (declarations,
//! consumers, publishers), a [`FaultPlan`] and the [`Settings`] of the client and
//! the broker, all driven by one seed.
//!
//! The [`strategies`] generate them for proptest (and shrink them);
//! [`Scenario::from_seed`] draws one from those same strategies with an RNG seeded
//! by the scenario's seed, so that a seed alone names a whole scenario.

use std::time::Duration;

use amqp_rebound_core::backoff::BackoffConfig;
use amqp_rebound_core::topology::ExchangeKind;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use crate::fault::FaultPlan;
use crate::instrument::ClientBug;

/// An exchange the workload declares (named `ex<i>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// Name.
    pub name: String,
    /// Direct, fanout or topic.
    pub kind: ExchangeKind,
    /// Survives a broker restart (a transient one is replayed after it).
    pub durable: bool,
}

/// A queue the workload declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its name; `None` for a server-named, exclusive, auto-delete queue
    /// (`amq.gen-...`), which recovery re-creates under a new name.
    pub name: Option<String>,
    /// Survives a broker restart.
    pub durable: bool,
}

/// A binding of a workload queue to a workload exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    /// Queue index.
    pub queue: usize,
    /// Exchange index.
    pub exchange: usize,
    /// Binding key (a topic pattern for topic exchanges).
    pub key: String,
}

/// A consumer of a workload queue. It acks every delivery after `ack_delay`,
/// with the consumer tag `c<i>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Queue index.
    pub queue: usize,
    /// Prefetch (`None`: unlimited).
    pub prefetch: Option<u16>,
    /// How long it holds a delivery before acking it (acks may then cross a
    /// recovery and be refused as stale).
    pub ack_delay: Duration,
}

/// Where a publisher sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A workload exchange with a routing key.
    Exchange {
        /// Exchange index.
        exchange: usize,
        /// Routing key.
        key: String,
    },
    /// The default exchange, straight to a workload queue (by its current name).
    Queue(usize),
}

/// A publisher: `messages` messages, one every `interval` from `start`, each
/// without waiting for the previous one's confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherSpec {
    /// Where.
    pub target: Target,
    /// How many.
    pub messages: u32,
    /// When the first goes, from the start (after the declarations at the
    /// earliest).
    pub start: Duration,
    /// Time between two publishes.
    pub interval: Duration,
    /// Mandatory (unroutable ones come back as `Returned`).
    pub mandatory: bool,
    /// Delivery mode 2.
    pub persistent: bool,
}

impl PublisherSpec {
    /// When its last publish goes out, from the start (publishes are never
    /// delayed by the client: each is a task of its own).
    pub fn last_send(&self) -> Duration {
        self.start + self.interval * self.messages.saturating_sub(1)
    }
}

/// Declarations, consumers and publishers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// Exchanges, declared first.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues, declared next.
    pub queues: Vec<QueueSpec>,
    /// Bindings, declared after the queues.
    pub bindings: Vec<BindingSpec>,
    /// Consumers, started after the declarations.
    pub consumers: Vec<ConsumerSpec>,
    /// Publishers, started after the consumers.
    pub publishers: Vec<PublisherSpec>,
}

impl Workload {
    /// Every message the publishers send.
    pub fn messages(&self) -> u64 {
        self.publishers.iter().map(|p| u64::from(p.messages)).sum()
    }

    /// When the last publish goes out, from the start.
    pub fn last_send(&self) -> Duration {
        self.publishers
            .iter()
            .map(PublisherSpec::last_send)
            .max()
            .unwrap_or_default()
    }

    /// A publisher + consumer workload for the chaos demo: one durable direct
    /// exchange, one durable queue bound to it with one consumer (prefetch 100,
    /// acks after 2 ms), and `publishers` publishers sending `rate` persistent
    /// messages per second each for `duration`.
    pub fn chaos(publishers: usize, rate: u32, duration: Duration) -> Workload {
        let rate = rate.max(1);
        let interval = Duration::from_secs(1) / rate;
        let messages = u32::try_from(duration.as_millis() * u128::from(rate) / 1000)
            .unwrap_or(u32::MAX)
            .max(1);
        Workload {
            exchanges: vec![ExchangeSpec {
                name: "chaos".to_owned(),
                kind: ExchangeKind::Direct,
                durable: true,
            }],
            queues: vec![QueueSpec {
                name: Some("chaos.work".to_owned()),
                durable: true,
            }],
            bindings: vec![BindingSpec {
                queue: 0,
                exchange: 0,
                key: "work".to_owned(),
            }],
            consumers: vec![ConsumerSpec {
                queue: 0,
                prefetch: Some(100),
                ack_delay: Duration::from_millis(2),
            }],
            publishers: (0..publishers)
                .map(|_| PublisherSpec {
                    target: Target::Exchange {
                        exchange: 0,
                        key: "work".to_owned(),
                    },
                    messages,
                    start: Duration::from_millis(100),
                    interval,
                    mandatory: false,
                    persistent: true,
                })
                .collect(),
        }
    }
}

/// The client's and the broker's configuration in a simulation, and how long to
/// watch after the faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Connections in the pool.
    pub connections: usize,
    /// Channels per connection.
    pub channels: usize,
    /// Broker addresses (`rabbit-0`, `rabbit-1`, ...; one broker behind them).
    pub hosts: usize,
    /// The client's reconnect backoff.
    pub backoff: BackoffConfig,
    /// The client's connect timeout.
    pub connect_timeout: Duration,
    /// The client's publish timeout.
    pub publish_timeout: Duration,
    /// The broker's heartbeat interval (a partitioned connection dies after 2x).
    pub heartbeat: Duration,
    /// One-way latency of the simulated wire.
    pub latency: Duration,
    /// Allowance for "one connect" in the liveness bound: dial, channel opens,
    /// confirm.select, topology replay, consumers.
    pub one_connect: Duration,
    /// A planted client bug (test double); [`ClientBug::None`] normally.
    pub bug: ClientBug,
    /// Record the trace (off for benchmarks).
    pub trace: bool,
    /// Check topology and consumers at the end (probe messages).
    pub probe: bool,
    /// Close the client at the end and watch for dials afterwards.
    pub close: bool,
    /// How long to watch for dials after the close.
    pub after_close: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connections: 1,
            channels: 2,
            hosts: 2,
            // the library's defaults: the properties guard what users run
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            latency: Duration::from_millis(1),
            one_connect: Duration::from_millis(500),
            bug: ClientBug::None,
            trace: true,
            probe: true,
            close: true,
            after_close: Duration::from_secs(30),
        }
    }
}

impl Settings {
    /// Invariant 4's bound: after the last fault is over, the client is Ready
    /// again within this (backoff cap + one connect, plus the connect timeout
    /// when a dial may have hung in a partition).
    pub fn liveness_bound(&self, plan: &FaultPlan) -> Duration {
        let hang = if plan.may_hang_dials() {
            self.connect_timeout
        } else {
            Duration::ZERO
        };
        self.backoff.cap + hang + self.one_connect
    }
}

/// One simulation: a seed, settings, a workload, a fault plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Seeds the broker (names), the client (host shuffle, jitter) and, through
    /// [`Scenario::from_seed`], the workload and the plan.
    pub seed: u64,
    /// Configuration.
    pub settings: Settings,
    /// What the application does.
    pub workload: Workload,
    /// What goes wrong.
    pub plan: FaultPlan,
}

/// The size of generated scenarios.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Faults happen in `[first_fault, window)`.
    pub window: Duration,
    /// No fault before this (the declarations run first).
    pub first_fault: Duration,
    /// How many faults (inclusive range).
    pub faults: (usize, usize),
    /// Messages per publisher (inclusive range).
    pub messages: (u32, u32),
    /// Publishers (inclusive range).
    pub publishers: (usize, usize),
    /// Keep away from the server-named queue bugs of core found by this
    /// simulator (see [`Scenario::avoid_known_core_bugs`]).
    pub avoid_known_core_bugs: bool,
}

impl Shape {
    /// The property tests' size: 20 simulated seconds of faults (10 to 16 of
    /// them, i.e. 30 to 48 per simulated minute), up to 3 publishers of up to 40
    /// messages.
    pub fn small() -> Shape {
        Shape {
            window: Duration::from_secs(20),
            first_fault: Duration::from_millis(500),
            faults: (10, 16),
            messages: (5, 40),
            publishers: (1, 3),
            avoid_known_core_bugs: false,
        }
    }

    /// A 60 s scenario with 10 to 20 faults and up to 4 publishers of up to 600
    /// messages (the benchmark's size).
    pub fn minute() -> Shape {
        Shape {
            window: Duration::from_secs(60),
            first_fault: Duration::from_millis(500),
            faults: (10, 20),
            messages: (100, 600),
            publishers: (1, 4),
            avoid_known_core_bugs: false,
        }
    }
}

impl Scenario {
    /// The scenario a seed names for a shape: drawn from
    /// [`strategies::scenario`] with an RNG seeded by `seed`, then given `seed`.
    /// Same seed, same shape: same scenario, on every machine (as long as the
    /// strategies and the proptest version stay the same: a change to either may
    /// give old seeds new scenarios).
    ///
    /// ```
    /// use amqp_rebound_sim::{Scenario, Shape};
    ///
    /// let a = Scenario::from_seed(42, &Shape::small());
    /// assert_eq!(a, Scenario::from_seed(42, &Shape::small()));
    /// assert_eq!(a.seed, 42);
    /// assert!(a.plan.len() >= 10);
    /// ```
    pub fn from_seed(seed: u64, shape: &Shape) -> Scenario {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&(!seed).to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let mut scenario = match strategies::scenario(shape.clone()).new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            // The strategies use no filter, so drawing a value cannot be rejected.
            Err(reason) => unreachable!("scenario strategies never reject: {reason}"),
        };
        scenario.seed = seed;
        if shape.avoid_known_core_bugs {
            scenario.avoid_known_core_bugs();
        }
        scenario
    }

    /// Edits the scenario so that it cannot hit the server-named queue bugs of
    /// core this simulator found (they are reproduced by the ignored tests in
    /// `tests/known_core_bugs.rs`): a server-named queue keeps only its first
    /// consumer, and a workload with a server-named queue runs with one channel
    /// per connection.
    ///
    /// The bugs: core re-declares a server-named queue (with `""`, so under a new
    /// name) whenever channel 0 of its connection reopens and on every broker
    /// `basic.cancel` of one of its consumers, even when the old queue still
    /// exists, so the consumers that were not re-subscribed stay on the old queue;
    /// and a channel-level error on the channel of the last consumer of an
    /// auto-delete server-named queue makes the broker delete it, after which that
    /// channel's replay re-consumes the old name and fails with 404 forever.
    pub fn avoid_known_core_bugs(&mut self) {
        let w = &mut self.workload;
        let server_named: Vec<bool> = w.queues.iter().map(|q| q.name.is_none()).collect();
        let mut seen = vec![false; server_named.len()];
        w.consumers.retain(|c| {
            if !server_named.get(c.queue).copied().unwrap_or(false) {
                return true;
            }
            !std::mem::replace(&mut seen[c.queue], true)
        });
        if server_named.contains(&true) {
            self.settings.channels = 1;
        }
    }

    /// The chaos demo's scenario: [`Workload::chaos`] for `duration` under a
    /// random plan of about `faults_per_minute` faults per minute.
    pub fn chaos(seed: u64, duration: Duration, faults_per_minute: usize) -> Scenario {
        let per_minute = faults_per_minute.max(1);
        let count = usize::try_from((duration.as_millis() * per_minute as u128).div_ceil(60_000))
            .unwrap_or(usize::MAX)
            .max(1);
        let shape = Shape {
            window: duration,
            first_fault: Duration::from_millis(500).min(duration / 2),
            faults: (count, count),
            messages: (1, 1),
            publishers: (1, 1),
            avoid_known_core_bugs: false,
        };
        let drawn = Scenario::from_seed(seed, &shape);
        let settings = Settings {
            connections: 2,
            channels: 4,
            hosts: 3,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            ..Settings::default()
        };
        Scenario {
            seed,
            settings,
            workload: Workload::chaos(2, 200, duration),
            plan: drawn.plan,
        }
    }
}

/// proptest strategies for workloads, fault plans and whole scenarios.
pub mod strategies {
    use std::time::Duration;

    use amqp_rebound_core::backoff::{BackoffConfig, Jitter};
    use amqp_rebound_core::topology::ExchangeKind;
    use proptest::prelude::*;

    use super::{
        BindingSpec, ConsumerSpec, ExchangeSpec, PublisherSpec, QueueSpec, Scenario, Settings,
        Shape, Target, Workload,
    };
    use crate::fault::{Fault, FaultPlan};

    /// Routing keys publishers use.
    pub const KEYS: [&str; 3] = ["a.x", "a.y", "b.x"];
    /// Topic binding patterns.
    pub const PATTERNS: [&str; 4] = ["a.*", "#", "*.x", "a.x"];

    fn millis(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
        (lo..=hi).prop_map(Duration::from_millis)
    }

    /// One exchange, `ex<i>`.
    pub fn exchange(i: usize) -> impl Strategy<Value = ExchangeSpec> {
        (
            prop_oneof![
                Just(ExchangeKind::Direct),
                Just(ExchangeKind::Fanout),
                Just(ExchangeKind::Topic)
            ],
            any::<bool>(),
        )
            .prop_map(move |(kind, durable)| ExchangeSpec {
                name: format!("ex{i}"),
                kind,
                durable,
            })
    }

    /// One queue: `q<i>` (durable or not) or server-named.
    pub fn queue(i: usize) -> impl Strategy<Value = QueueSpec> {
        prop_oneof![
            2 => any::<bool>().prop_map(move |durable| QueueSpec {
                name: Some(format!("q{i}")),
                durable,
            }),
            1 => Just(QueueSpec { name: None, durable: false }),
        ]
    }

    /// A workload with 1 to 2 exchanges, 1 to 3 queues (each bound once or
    /// twice), 1 to 3 consumers and the shape's publishers.
    pub fn workload(shape: &Shape) -> impl Strategy<Value = Workload> + use<> {
        let (pmin, pmax) = shape.publishers;
        let (mmin, mmax) = shape.messages;
        // Publishers spread their messages over half to all of the fault window.
        let window = u64::try_from(shape.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(2);
        (1usize..=2, 1usize..=3)
            .prop_flat_map(move |(ne, nq)| {
                let exchanges: Vec<_> = (0..ne).map(exchange).collect();
                let queues: Vec<_> = (0..nq).map(queue).collect();
                let binding = (0..nq, 0..ne, 0..PATTERNS.len(), 0..KEYS.len());
                let bindings = proptest::collection::vec(binding, nq..=2 * nq);
                let consumer = (
                    0..nq,
                    prop_oneof![Just(None), (1u16..=20).prop_map(Some)],
                    prop_oneof![Just(Duration::ZERO), millis(1, 50)],
                );
                let consumers = proptest::collection::vec(consumer, 1..=3);
                // `Some(b)`: use the key of the b-th binding of that exchange, if
                // it has any (most messages should be routable).
                let target = prop_oneof![
                    3 => (0..ne, 0..KEYS.len(), proptest::option::weighted(0.75, 0usize..4))
                        .prop_map(|(exchange, k, bound)| (Some((exchange, k, bound)), 0)),
                    1 => (0..nq).prop_map(|q| (None, q)),
                ];
                let publisher = (
                    target,
                    mmin..=mmax,
                    millis(0, window / 8),
                    (window / 2)..=window,
                    proptest::bool::weighted(0.2),
                    any::<bool>(),
                );
                let publishers = proptest::collection::vec(publisher, pmin..=pmax);
                (exchanges, queues, bindings, consumers, publishers)
            })
            .prop_map(|(exchanges, queues, bindings, consumers, publishers)| {
                // Every queue gets at least one binding (the i-th binding goes to
                // queue i), so that exchange publishes can reach it.
                let bindings: Vec<BindingSpec> = bindings
                    .into_iter()
                    .enumerate()
                    .map(|(i, (q, e, p, k))| {
                        let queue = if i < queues.len() { i } else { q };
                        let key = match exchanges[e].kind {
                            ExchangeKind::Topic => PATTERNS[p].to_owned(),
                            ExchangeKind::Fanout => String::new(),
                            _ => KEYS[k].to_owned(),
                        };
                        BindingSpec {
                            queue,
                            exchange: e,
                            key,
                        }
                    })
                    .collect();
                let consumers = consumers
                    .into_iter()
                    .map(|(queue, prefetch, ack_delay)| ConsumerSpec {
                        queue,
                        prefetch,
                        ack_delay,
                    })
                    .collect();
                let publishers = publishers
                    .into_iter()
                    .map(|(target, messages, start, span, mandatory, persistent)| {
                        let target = match target {
                            (Some((exchange, k, bound)), _) => {
                                let keys: Vec<&BindingSpec> =
                                    bindings.iter().filter(|b| b.exchange == exchange).collect();
                                let key = match (bound, exchanges[exchange].kind.clone()) {
                                    (Some(b), ExchangeKind::Direct) if !keys.is_empty() => {
                                        keys[b % keys.len()].key.clone()
                                    }
                                    _ => KEYS[k].to_owned(),
                                };
                                Target::Exchange { exchange, key }
                            }
                            (None, q) => Target::Queue(q),
                        };
                        PublisherSpec {
                            target,
                            messages,
                            start,
                            interval: Duration::from_millis(span) / messages.max(1),
                            mandatory,
                            persistent,
                        }
                    })
                    .collect();
                Workload {
                    exchanges,
                    queues,
                    bindings,
                    consumers,
                    publishers,
                }
            })
    }

    /// One fault, every kind possible.
    pub fn fault() -> impl Strategy<Value = Fault> {
        let pick = 0usize..16;
        prop_oneof![
            3 => pick.clone().prop_map(|pick| Fault::KillConnection { pick }),
            1 => Just(Fault::KillAll),
            1 => pick.clone().prop_map(|pick| Fault::CloseConnection { pick, code: 320 }),
            2 => (pick.clone(), 0usize..8, prop_oneof![Just(404u16), Just(406), Just(541)])
                .prop_map(|(pick, channel, code)| Fault::CloseChannel { pick, channel, code }),
            1 => (0usize..4, millis(100, 3000))
                .prop_map(|(host, duration)| Fault::RefuseDials { host, duration }),
            1 => (0usize..4, millis(100, 6000))
                .prop_map(|(host, duration)| Fault::Partition { host, duration }),
            1 => millis(0, 3000).prop_map(|downtime| Fault::Restart { downtime }),
            1 => (millis(10, 500), millis(100, 3000))
                .prop_map(|(delay, duration)| Fault::DelayConfirms { delay, duration }),
            1 => millis(100, 2000).prop_map(|duration| Fault::DropConfirms { duration }),
            1 => millis(100, 1000).prop_map(|duration| Fault::NackConfirms { duration }),
            1 => (pick.clone(), millis(100, 3000))
                .prop_map(|(pick, duration)| Fault::Block { pick, duration }),
            1 => millis(100, 2000).prop_map(|duration| Fault::Alarm { duration }),
            1 => pick.clone().prop_map(|pick| Fault::CancelConsumer { pick }),
            1 => pick.prop_map(|pick| Fault::DeleteQueue { pick }),
        ]
    }

    /// `count` faults (inclusive range) at times in `[first, window)`.
    pub fn fault_plan(
        first: Duration,
        window: Duration,
        count: (usize, usize),
    ) -> impl Strategy<Value = FaultPlan> {
        let lo = u64::try_from(first.as_millis()).unwrap_or(u64::MAX);
        let hi = u64::try_from(window.as_millis())
            .unwrap_or(u64::MAX)
            .max(lo + 1);
        proptest::collection::vec((lo..hi, fault()), count.0..=count.1).prop_map(|faults| {
            let mut plan = FaultPlan::new();
            for (at, fault) in faults {
                plan.push(Duration::from_millis(at), fault);
            }
            plan
        })
    }

    /// Pool sizes, host count, latency and backoff jitter around
    /// [`Settings::default`].
    pub fn settings() -> impl Strategy<Value = Settings> {
        (
            1usize..=2,
            1usize..=3,
            1usize..=2,
            millis(1, 3),
            prop_oneof![
                Just(Jitter::Full),
                Just(Jitter::Decorrelated),
                Just(Jitter::None)
            ],
        )
            .prop_map(|(connections, channels, hosts, latency, jitter)| {
                let d = Settings::default();
                Settings {
                    connections,
                    channels,
                    hosts,
                    latency,
                    backoff: BackoffConfig {
                        jitter,
                        ..d.backoff
                    },
                    ..d
                }
            })
    }

    /// A whole scenario of a shape (its seed from the generator too).
    pub fn scenario(shape: Shape) -> impl Strategy<Value = Scenario> {
        (
            any::<u64>(),
            settings(),
            workload(&shape),
            fault_plan(shape.first_fault, shape.window, shape.faults),
        )
            .prop_map(|(seed, settings, workload, plan)| Scenario {
                seed,
                settings,
                workload,
                plan,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_scenario() {
        let shape = Shape::small();
        let a = Scenario::from_seed(7, &shape);
        assert_eq!(a, Scenario::from_seed(7, &shape));
        assert_ne!(a, Scenario::from_seed(8, &shape));
        assert!((10..=16).contains(&a.plan.len()));
        assert!(a.plan.faults.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn chaos_scenarios_have_their_fault_rate() {
        let s = Scenario::chaos(1, Duration::from_secs(60), 12);
        assert_eq!(s.plan.len(), 12);
        assert_eq!(s.workload.messages(), 2 * 12_000);
    }
}
