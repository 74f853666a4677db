//! [`Simulation`]: the real [`Client`] and [`Driver`](amqp_rebound_core::Driver) on
//! a `LocalPool`, against a [`SimBroker`] through [`SimTransport`](crate::SimTransport),
//! in virtual time, under a [`FaultPlan`](crate::FaultPlan); and the invariant checks of its
//! [`Outcome`].
//!
//! # A run
//!
//! 1. The broker (seeded), the transport (wrapped in an [`InstrumentedTransport`]
//!    that counts dials and may plant a [`ClientBug`]) and the client (seeded) are
//!    built; the driver is spawned; the plan is scheduled on the clock.
//! 2. The workload declares its exchanges, queues and bindings, starts its
//!    consumers (each acks after its delay), then its publishers (one task per
//!    publish, so publishes pipeline).
//! 3. Time runs to the end: past the last fault plus the liveness bound, and past
//!    the last publish plus its deadline. No wall-clock wait: the clock jumps from
//!    one deadline to the next.
//! 4. The broker's contents and every record are taken; then (optionally) the
//!    topology is inspected and a probe message per consumed queue must reach a
//!    consumer; then (optionally) the client is closed and watched for dials.
//!
//! Everything that happens goes into a [`Trace`] stamped with virtual time; set
//! `REBOUND_LOG=debug` (or `info`, `trace`) to see the client's and the broker's
//! `tracing` logs, stamped with virtual time too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use amqp_rebound_core::message::{FieldTable, Message, Properties};
use amqp_rebound_core::topology::{ConsumeOptions, ExchangeDecl, QueueDecl};
use amqp_rebound_core::{
    AckError, Client, Confirmation, PublishError, PublishOptions, Queue, Stats,
};
use futures::StreamExt;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;

use crate::broker::{BrokerConfig, BrokerStats, LedgerEntry, SimBroker};
use crate::clock::VirtualClock;
use crate::fault::AppliedFault;
use crate::instrument::{ClientBug, InstrumentedTransport, Instruments};
use crate::scenario::{Scenario, Target, Workload};
use crate::trace::{SimTime, Trace};

/// How a publish ended, as the application saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// Confirmed by the broker.
    Confirmed,
    /// Returned unroutable (mandatory), then confirmed.
    Returned,
    /// Nacked by the broker.
    Nacked,
    /// No confirm before the deadline.
    TimedOut,
    /// The client closed first.
    Closed,
    /// Refused by a channel error.
    Rejected(u16),
    /// Anything else.
    Other(String),
}

impl PublishOutcome {
    fn of(result: &Result<Confirmation, PublishError>) -> PublishOutcome {
        match result {
            Ok(Confirmation::Confirmed) => PublishOutcome::Confirmed,
            Ok(Confirmation::Returned { .. }) => PublishOutcome::Returned,
            Ok(other) => PublishOutcome::Other(format!("{other:?}")),
            Err(PublishError::Nacked) => PublishOutcome::Nacked,
            Err(PublishError::TimedOut) => PublishOutcome::TimedOut,
            Err(PublishError::Closed) => PublishOutcome::Closed,
            Err(PublishError::Rejected { code, .. }) => PublishOutcome::Rejected(*code),
            Err(other) => PublishOutcome::Other(other.to_string()),
        }
    }
}

/// One publish of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRecord {
    /// The publisher's index.
    pub publisher: usize,
    /// When it was handed to the client.
    pub sent_at: Duration,
    /// When it resolved, if it did.
    pub resolved_at: Option<Duration>,
    /// How, if it did.
    pub outcome: Option<PublishOutcome>,
}

/// What the consumers' acks came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckCounts {
    /// Sent.
    pub ok: u64,
    /// Refused as stale (the channel was recovered since the delivery).
    pub stale: u64,
    /// Refused because the client closed.
    pub closed: u64,
    /// Refused otherwise.
    pub other: u64,
}

/// What became of the close at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReport {
    /// `close()` returned.
    pub returned: bool,
    /// The driver future completed.
    pub driver_finished: bool,
    /// Dials after `close()` returned.
    pub dials_after_close: usize,
    /// Publishes still unresolved after the close.
    pub unresolved_after_close: usize,
}

/// Everything a run leaves behind, for the checks and the reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario's seed.
    pub seed: u64,
    /// The trace (empty when the settings turn it off).
    pub trace: String,
    /// Lines in the trace (counted even when it is off).
    pub trace_lines: usize,
    /// Every workload publish, by payload id.
    pub publishes: BTreeMap<u64, PublishRecord>,
    /// Deliveries to the application, by payload id: how many times each.
    pub received: BTreeMap<u64, u32>,
    /// Messages in the broker's queues (ready or unacked) at the end, by payload
    /// id.
    pub in_queues: BTreeMap<u64, u32>,
    /// The broker's ledger at the end.
    pub ledger: Vec<LedgerEntry>,
    /// Broker counters at the end.
    pub broker: BrokerStats,
    /// Client counters at the end.
    pub client: Stats,
    /// What the transport wrapper counted.
    pub instruments: Instruments,
    /// The faults as applied.
    pub faults: Vec<AppliedFault>,
    /// When the last fault was over.
    pub quiet_at: Duration,
    /// Invariant 4's bound for this scenario.
    pub liveness_bound: Duration,
    /// The client's publish timeout (Invariant 3's deadline).
    pub publish_timeout: Duration,
    /// When the client last became Ready (all channels), if it is Ready at the
    /// end.
    pub ready_at: Option<Duration>,
    /// When the run ended (before probes and close).
    pub ended_at: Duration,
    /// Virtual time covered by the whole run (probes and close included).
    pub simulated: Duration,
    /// When each dial started, from the start.
    pub dial_times: Vec<Duration>,
    /// Topology the broker lacks at the end, described.
    pub topology_missing: Vec<String>,
    /// Probe per consumed queue: the queue's name, and whether a consumer got it.
    pub probes: Vec<(String, bool)>,
    /// What the acks came to.
    pub acks: AckCounts,
    /// The close, if the run closed the client.
    pub close: Option<CloseReport>,
    /// Declarations or subscriptions that failed.
    pub setup_errors: Vec<String>,
    /// When each confirm reached the application, in order.
    pub confirmed_at: Vec<Duration>,
    /// Acks with an unknown delivery tag at the broker (Invariant 8).
    pub unknown_tag_acks: u64,
}

/// One of the invariants every simulation is checked against. The numbers are
/// the project's (6, "backoff delays stay within [0, cap]", is a property of
/// `Backoff` itself, tested in the core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Invariant {
    /// 1. Only Ready channels are handed out.
    OnlyReadyChannels,
    /// 2. No confirmed message is lost.
    NoConfirmedLoss,
    /// 3. Every publish resolves.
    EveryPublishResolves,
    /// 4. Ready again within backoff cap + one connect after the last fault.
    Liveness,
    /// 5. `close()` is terminal.
    CloseIsTerminal,
    /// 7. The topology and the consumers are back after recovery.
    TopologyRestored,
    /// 8. No stale delivery tag reaches the broker.
    NoStaleAck,
    /// 9. Same seed, same trace.
    SameSeedSameTrace,
}

impl Invariant {
    /// The invariant's number.
    pub fn number(self) -> u8 {
        match self {
            Invariant::OnlyReadyChannels => 1,
            Invariant::NoConfirmedLoss => 2,
            Invariant::EveryPublishResolves => 3,
            Invariant::Liveness => 4,
            Invariant::CloseIsTerminal => 5,
            Invariant::TopologyRestored => 7,
            Invariant::NoStaleAck => 8,
            Invariant::SameSeedSameTrace => 9,
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Invariant::OnlyReadyChannels => "only Ready channels are used",
            Invariant::NoConfirmedLoss => "no confirmed message is lost",
            Invariant::EveryPublishResolves => "every publish resolves",
            Invariant::Liveness => "Ready again within backoff cap + one connect",
            Invariant::CloseIsTerminal => "close is terminal",
            Invariant::TopologyRestored => "topology restored after recovery",
            Invariant::NoStaleAck => "no stale delivery tag reaches the broker",
            Invariant::SameSeedSameTrace => "same seed, same trace",
        };
        write!(f, "invariant {} ({name})", self.number())
    }
}

/// A broken invariant, with the seed that replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// The scenario's seed.
    pub seed: u64,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated: {}\n  replay with REBOUND_SEED={}",
            self.invariant, self.detail, self.seed
        )
    }
}

impl std::error::Error for Violation {}

/// The payload of workload message `id`.
pub fn payload_of(id: u64) -> String {
    format!("m{id}")
}

/// The id in a workload payload (`None` for probes and foreign messages).
pub fn id_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.strip_prefix(b"m")?)
        .ok()?
        .parse()
        .ok()
}

fn message_id(publisher: usize, n: u32) -> u64 {
    (publisher as u64 + 1) * 10_000_000 + u64::from(n)
}

#[derive(Default, Clone)]
struct Records {
    publishes: BTreeMap<u64, PublishRecord>,
    received: BTreeMap<u64, u32>,
    probes: BTreeSet<usize>,
    acks: AckCounts,
    confirmed_at: Vec<Duration>,
    setup_errors: Vec<String>,
    queues: Vec<Option<Queue>>,
    setup_done: bool,
    unresolved: usize,
}

type Shared = Arc<Mutex<Records>>;

/// Spawns a task on the executor a workload runs on (a `LocalPool` in a
/// simulation, a tokio `LocalSet` against a real broker).
pub type Spawner = std::rc::Rc<dyn Fn(futures::future::LocalBoxFuture<'static, ()>)>;

/// What a running workload has recorded so far; shared with its tasks.
#[derive(Clone, Default)]
pub struct WorkloadRecords(Shared);

impl fmt::Debug for WorkloadRecords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = lock(&self.0);
        f.debug_struct("WorkloadRecords")
            .field("publishes", &r.publishes.len())
            .field("received", &r.received.len())
            .finish_non_exhaustive()
    }
}

impl WorkloadRecords {
    /// Every publish so far, by payload id.
    pub fn publishes(&self) -> BTreeMap<u64, PublishRecord> {
        lock(&self.0).publishes.clone()
    }

    /// Deliveries to the application, by payload id: how many times each.
    pub fn received(&self) -> BTreeMap<u64, u32> {
        lock(&self.0).received.clone()
    }

    /// When each confirm reached the application, in order.
    pub fn confirmed_at(&self) -> Vec<Duration> {
        lock(&self.0).confirmed_at.clone()
    }

    /// What the acks came to.
    pub fn acks(&self) -> AckCounts {
        lock(&self.0).acks.clone()
    }

    /// Declarations or subscriptions that failed.
    pub fn setup_errors(&self) -> Vec<String> {
        lock(&self.0).setup_errors.clone()
    }

    /// The declared queues (`None` where the declaration failed), once the
    /// declarations are done.
    pub fn queues(&self) -> Vec<Option<Queue>> {
        lock(&self.0).queues.clone()
    }

    /// The declarations and subscriptions are done; publishers have started.
    pub fn setup_done(&self) -> bool {
        lock(&self.0).setup_done
    }

    /// Publishes handed to the client and not resolved yet.
    pub fn unresolved(&self) -> usize {
        lock(&self.0).unresolved
    }
}

/// Starts `workload` on `client`: a task that declares its exchanges, queues and
/// bindings, subscribes its consumers (tags `c0`, `c1`, ...; each acks after its
/// delay), then starts its publishers (one task per publish, payloads `m<id>`);
/// publisher start times count from now on `trace`'s timer. Returns the records
/// the tasks fill in.
pub fn start_workload(
    client: &Client,
    workload: &Workload,
    trace: &Trace,
    spawn: Spawner,
) -> WorkloadRecords {
    let records = WorkloadRecords::default();
    let start = trace.timer().now();
    spawn(Box::pin(setup(
        client.clone(),
        workload.clone(),
        records.0.clone(),
        trace.clone(),
        start,
        spawn.clone(),
    )));
    records
}
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a [`Scenario`].
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_sim::{Fault, FaultPlan, Scenario, Settings, Simulation, Workload};
///
/// let scenario = Scenario {
///     seed: 1,
///     settings: Settings::default(),
///     workload: Workload::chaos(1, 20, Duration::from_secs(2)),
///     plan: FaultPlan::new().at(Duration::from_secs(1), Fault::KillAll),
/// };
/// let outcome = Simulation::new(&scenario).run();
/// outcome.check_all().unwrap();
/// assert!(outcome.confirmed() >= 40);
/// ```
pub struct Simulation<'a> {
    scenario: &'a Scenario,
    progress: Option<Box<dyn FnMut(Duration, Duration) + 'a>>,
}

impl fmt::Debug for Simulation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.scenario.seed)
            .finish_non_exhaustive()
    }
}

impl<'a> Simulation<'a> {
    /// A simulation of `scenario`.
    pub fn new(scenario: &'a Scenario) -> Simulation<'a> {
        Simulation {
            scenario,
            progress: None,
        }
    }

    /// Calls `progress(elapsed, end)` (virtual times) as the run advances.
    pub fn on_progress(mut self, progress: impl FnMut(Duration, Duration) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// When the main phase ends, from the start.
    pub fn end_of(scenario: &Scenario) -> Duration {
        let s = &scenario.settings;
        let quiet = scenario.plan.quiet_after() + s.liveness_bound(&scenario.plan);
        let publishes = scenario.workload.last_send() + s.publish_timeout;
        quiet.max(publishes) + Duration::from_secs(1)
    }

    /// Runs it to the end. Logs go to `tracing` when `REBOUND_LOG` is set.
    pub fn run(self) -> Outcome {
        let level = std::env::var("REBOUND_LOG")
            .ok()
            .and_then(|l| l.parse::<tracing::Level>().ok());
        let clock = VirtualClock::new();
        match level {
            Some(level) => {
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(level)
                    .with_timer(SimTime::new(clock.clone()))
                    .with_ansi(false)
                    .with_test_writer()
                    .finish();
                tracing::subscriber::with_default(subscriber, || self.run_on(clock))
            }
            None => self.run_on(clock),
        }
    }

    fn run_on(mut self, clock: VirtualClock) -> Outcome {
        let scenario = self.scenario;
        let settings = &scenario.settings;
        let seed = scenario.seed;
        let origin = clock.now();
        let trace = if settings.trace {
            Trace::new(clock.clone())
        } else {
            Trace::disabled(clock.clone())
        };
        let broker = SimBroker::new(
            clock.clone(),
            BrokerConfig::default()
                .with_seed(seed)
                .with_latency(settings.latency)
                .with_default_heartbeat(settings.heartbeat),
        );
        let hosts: Vec<String> = (0..settings.hosts.max(1))
            .map(|h| broker.add_host(&format!("rabbit-{h}")))
            .collect();
        let transport =
            InstrumentedTransport::new(broker.transport(), Arc::new(clock.clone()), settings.bug);
        let uris: Vec<String> = hosts
            .iter()
            .map(|h| format!("amqp://guest:guest@{h}/%2f"))
            .collect();
        let built = Client::builder()
            .hosts(&uris)
            .pool(settings.connections, settings.channels)
            .backoff(settings.backoff.clone())
            .connect_timeout(settings.connect_timeout)
            .publish_timeout(settings.publish_timeout)
            .seed(seed)
            .connection_name("sim")
            // the trace keeps every event: a restart of a large pool emits a
            // burst of state changes before the watcher's task runs again
            .watch_capacity(1 << 20)
            .build(transport.clone(), clock.clone());
        let (client, driver) = match built {
            Ok(pair) => pair,
            Err(e) => panic!("the simulation's settings are invalid: {e}"),
        };
        let mut pool = LocalPool::new();
        let spawner = pool.spawner();
        let driver_finished = Arc::new(Mutex::new(false));
        {
            let finished = Arc::clone(&driver_finished);
            spawn(&spawner, async move {
                driver.await;
                *lock(&finished) = true;
            });
        }
        {
            let mut events = client.watch();
            let trace = trace.clone();
            spawn(&spawner, async move {
                while let Some(event) = events.next().await {
                    trace.record("event", format_args!("{event:?}"));
                }
            });
        }
        let log = scenario
            .plan
            .install(&broker, origin, hosts.clone(), trace.clone());
        let spawn_on_pool: Spawner = {
            let spawner = spawner.clone();
            std::rc::Rc::new(move |task| spawn(&spawner, task))
        };
        let records = start_workload(&client, &scenario.workload, &trace, spawn_on_pool).0;

        let end = Simulation::end_of(scenario);
        let mut ready_since: Option<Duration> = None;
        {
            let progress = &mut self.progress;
            let client = &client;
            let clock_ref = &clock;
            let ready = &mut ready_since;
            clock.run_until(origin + end, || {
                pool.run_until_stalled();
                let now = clock_ref.elapsed();
                match (client.state().is_ready(), *ready) {
                    (true, None) => *ready = Some(now),
                    (false, Some(_)) => *ready = None,
                    _ => {}
                }
                if let Some(p) = progress.as_mut() {
                    p(now, end);
                }
            });
        }
        let ended_at = clock.elapsed();
        trace.record("run", format_args!("end of the main phase"));

        // Snapshot: what the broker holds and what the application got, together.
        let in_queues = queue_contents(&broker);
        let ledger = broker.ledger();
        let (publishes, received, confirmed_at, acks, setup_errors, queues) = {
            let r = lock(&records);
            (
                r.publishes.clone(),
                r.received.clone(),
                r.confirmed_at.clone(),
                r.acks.clone(),
                r.setup_errors.clone(),
                r.queues.clone(),
            )
        };

        let mut topology_missing = Vec::new();
        let mut probes = Vec::new();
        if settings.probe {
            topology_missing = missing_topology(&scenario.workload, &queues, &broker);
            let consumed: BTreeSet<usize> = scenario
                .workload
                .consumers
                .iter()
                .map(|c| c.queue)
                .collect();
            for &q in &consumed {
                let name = queues
                    .get(q)
                    .and_then(|x| x.as_ref())
                    .map(Queue::name)
                    .unwrap_or_default();
                let client = client.clone();
                let target = name.clone();
                spawn(&spawner, async move {
                    let message = Message::new("", target, format!("probe-{q}"));
                    let _ = client
                        .publish_message(message, PublishOptions::default())
                        .await;
                });
                probes.push((q, name));
            }
            let pool = &mut pool;
            clock.run_for(Duration::from_secs(3), || pool.run_until_stalled());
        }
        let probes = {
            let r = lock(&records);
            probes
                .into_iter()
                .map(|(q, name)| (name, r.probes.contains(&q)))
                .collect()
        };

        let client_stats = client.stats();
        let mut close = None;
        if settings.close {
            let returned = Arc::new(Mutex::new(false));
            {
                let returned = Arc::clone(&returned);
                let client = client.clone();
                spawn(&spawner, async move {
                    client.close().await;
                    *lock(&returned) = true;
                });
            }
            {
                let pool = &mut pool;
                clock.run_for(Duration::from_secs(10), || pool.run_until_stalled());
            }
            let dials_at_close = transport.dials();
            trace.record("run", format_args!("closed; watching for dials"));
            {
                let pool = &mut pool;
                clock.run_for(settings.after_close, || pool.run_until_stalled());
            }
            let unresolved_after_close = lock(&records).unresolved;
            close = Some(CloseReport {
                returned: *lock(&returned),
                driver_finished: *lock(&driver_finished),
                dials_after_close: transport.dials() - dials_at_close,
                unresolved_after_close,
            });
        }
        drop(client);
        pool.run_until_stalled();
        let instruments = transport.instruments();
        let dial_times = instruments
            .dials
            .iter()
            .map(|t| t.saturating_duration_since(origin))
            .collect();

        Outcome {
            seed,
            trace: trace.text(),
            trace_lines: trace.lines(),
            publishes,
            received,
            in_queues,
            ledger,
            broker: broker.stats(),
            client: client_stats,
            instruments,
            dial_times,
            simulated: clock.elapsed(),
            faults: log.applied(),
            quiet_at: scenario.plan.quiet_after(),
            liveness_bound: settings.liveness_bound(&scenario.plan),
            publish_timeout: settings.publish_timeout,
            ready_at: ready_since,
            ended_at,
            topology_missing,
            probes,
            acks,
            close,
            setup_errors,
            confirmed_at,
            unknown_tag_acks: broker.unknown_tag_acks(),
        }
    }
}

fn spawn(
    spawner: &futures::executor::LocalSpawner,
    f: impl std::future::Future<Output = ()> + 'static,
) {
    // The pool lives as long as the run; spawning on it cannot fail before then.
    if spawner.spawn_local(f).is_err() {
        unreachable!("the simulation's pool is alive while it spawns");
    }
}

fn queue_contents(broker: &SimBroker) -> BTreeMap<u64, u32> {
    let mut contents = BTreeMap::new();
    for q in broker.queues() {
        for m in q.messages() {
            if let Some(id) = id_of(&m.payload) {
                *contents.entry(id).or_default() += 1;
            }
        }
    }
    contents
}

fn missing_topology(
    workload: &Workload,
    queues: &[Option<Queue>],
    broker: &SimBroker,
) -> Vec<String> {
    let mut missing = Vec::new();
    let exchanges: BTreeSet<String> = broker.exchanges().into_iter().map(|e| e.name).collect();
    for e in &workload.exchanges {
        if !exchanges.contains(&e.name) {
            missing.push(format!("exchange {}", e.name));
        }
    }
    let name = |q: usize| queues.get(q).and_then(|x| x.as_ref()).map(Queue::name);
    let open = broker.open_connections();
    for (i, _) in workload.queues.iter().enumerate() {
        match name(i).and_then(|n| broker.queue(&n).map(|s| (n, s))) {
            None => missing.push(format!("queue #{i} ({:?})", name(i))),
            Some((n, snapshot)) => {
                if snapshot
                    .exclusive_owner
                    .is_some_and(|owner| !open.contains(&owner))
                {
                    missing.push(format!("queue {n}: its owner connection is closed"));
                }
            }
        }
    }
    let bindings = broker.bindings();
    for b in &workload.bindings {
        let (Some(queue), Some(exchange)) = (name(b.queue), workload.exchanges.get(b.exchange))
        else {
            missing.push(format!("binding {b:?}: queue or exchange unknown"));
            continue;
        };
        let found = bindings.iter().any(|x| {
            x.source == exchange.name
                && x.destination == crate::broker::BindingDestination::Queue(queue.clone())
                && x.routing_key == b.key
        });
        if !found {
            missing.push(format!("binding {} -> {queue} ({})", exchange.name, b.key));
        }
    }
    for (i, c) in workload.consumers.iter().enumerate() {
        let tag = format!("c{i}");
        let on = name(c.queue)
            .and_then(|n| broker.queue(&n))
            .is_some_and(|q| q.consumers.contains(&tag));
        if !on {
            missing.push(format!("consumer {tag} on queue #{}", c.queue));
        }
    }
    missing
}

/// Declarations, then consumers, then publishers.
async fn setup(
    client: Client,
    workload: Workload,
    records: Shared,
    trace: Trace,
    start: std::time::Instant,
    spawn: Spawner,
) {
    let mut errors = Vec::new();
    for e in &workload.exchanges {
        let decl = ExchangeDecl {
            durable: e.durable,
            ..ExchangeDecl::new(e.name.clone(), e.kind.clone())
        };
        if let Err(err) = client.declare_exchange(decl).await {
            errors.push(format!("declare exchange {}: {err}", e.name));
        }
    }
    let mut queues = Vec::new();
    for q in &workload.queues {
        let decl = match &q.name {
            Some(name) => QueueDecl {
                name: name.clone(),
                durable: q.durable,
                ..QueueDecl::default()
            },
            None => QueueDecl::server_named(),
        };
        match client.declare_queue(decl).await {
            Ok(queue) => queues.push(Some(queue)),
            Err(err) => {
                errors.push(format!("declare queue {:?}: {err}", q.name));
                queues.push(None);
            }
        }
    }
    for b in &workload.bindings {
        let (Some(Some(queue)), Some(exchange)) =
            (queues.get(b.queue), workload.exchanges.get(b.exchange))
        else {
            continue;
        };
        if let Err(err) = client
            .bind_queue(queue, &exchange.name, &b.key, FieldTable::default())
            .await
        {
            errors.push(format!("bind {} to {}: {err}", queue.name(), exchange.name));
        }
    }
    {
        let mut r = lock(&records);
        r.queues = queues.clone();
        r.setup_errors.extend(errors.iter().cloned());
    }
    for e in &errors {
        trace.record("setup", format_args!("{e}"));
    }
    for (i, c) in workload.consumers.iter().enumerate() {
        let Some(Some(queue)) = queues.get(c.queue) else {
            continue;
        };
        let options = ConsumeOptions {
            prefetch: c.prefetch,
            ..ConsumeOptions::default()
        };
        match client
            .consume_with_tag(queue, Some(format!("c{i}")), options)
            .await
        {
            Ok(consumer) => spawn(Box::pin(consume(
                i,
                consumer,
                c.ack_delay,
                records.clone(),
                trace.clone(),
                spawn.clone(),
            ))),
            Err(err) => {
                trace.record("setup", format_args!("consume c{i}: {err}"));
                lock(&records)
                    .setup_errors
                    .push(format!("consume c{i}: {err}"));
            }
        }
    }
    lock(&records).setup_done = true;
    trace.record("setup", format_args!("done"));
    for (p, spec) in workload.publishers.iter().enumerate() {
        spawn(Box::pin(publisher(
            p,
            spec.clone(),
            workload.exchanges.iter().map(|e| e.name.clone()).collect(),
            client.clone(),
            queues.clone(),
            records.clone(),
            trace.clone(),
            start,
            spawn.clone(),
        )));
    }
}

async fn consume(
    index: usize,
    mut consumer: amqp_rebound_core::Consumer,
    ack_delay: Duration,
    records: Shared,
    trace: Trace,
    spawn: Spawner,
) {
    while let Some(item) = consumer.next().await {
        let received = match item {
            Ok(received) => received,
            Err(err) => {
                trace.record("consumer", format_args!("c{index} ended: {err}"));
                break;
            }
        };
        let payload = received.payload();
        if let Some(q) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.strip_prefix("probe-"))
            .and_then(|q| q.parse().ok())
        {
            lock(&records).probes.insert(q);
            trace.record("probe", format_args!("queue #{q} reached c{index}"));
        } else if let Some(id) = id_of(payload) {
            *lock(&records).received.entry(id).or_default() += 1;
            trace.record(
                "recv",
                format_args!(
                    "{} by c{index}{}",
                    payload_of(id),
                    if received.delivery.redelivered {
                        " (redelivered)"
                    } else {
                        ""
                    }
                ),
            );
        }
        let records = records.clone();
        let trace = trace.clone();
        spawn(Box::pin(async move {
            if !ack_delay.is_zero() {
                let timer = trace.timer();
                timer.sleep_until(timer.now() + ack_delay).await;
            }
            let result = received.ack().await;
            let mut r = lock(&records);
            match result {
                Ok(()) => r.acks.ok += 1,
                Err(AckError::Stale) => {
                    r.acks.stale += 1;
                    drop(r);
                    trace.record("ack", format_args!("c{index}: stale, not sent"));
                }
                Err(AckError::Closed) => r.acks.closed += 1,
                Err(err) => {
                    r.acks.other += 1;
                    drop(r);
                    trace.record("ack", format_args!("c{index}: {err}"));
                }
            }
        }));
    }
}

#[allow(clippy::too_many_arguments)] // one task's whole context
async fn publisher(
    index: usize,
    spec: crate::scenario::PublisherSpec,
    exchanges: Vec<String>,
    client: Client,
    queues: Vec<Option<Queue>>,
    records: Shared,
    trace: Trace,
    start: std::time::Instant,
    spawn: Spawner,
) {
    let timer = Arc::clone(trace.timer());
    timer.sleep_until(start + spec.start).await;
    let properties = if spec.persistent {
        Properties::default().persistent()
    } else {
        Properties::default()
    };
    for n in 0..spec.messages {
        if n > 0 {
            timer.sleep_until(timer.now() + spec.interval).await;
        }
        let (exchange, key) = match &spec.target {
            Target::Exchange { exchange, key } => (
                exchanges.get(*exchange).cloned().unwrap_or_default(),
                key.clone(),
            ),
            Target::Queue(q) => (
                String::new(),
                queues
                    .get(*q)
                    .and_then(|x| x.as_ref())
                    .map(Queue::name)
                    .unwrap_or_default(),
            ),
        };
        let id = message_id(index, n);
        let message = Message::new(exchange, key, payload_of(id))
            .with_properties(properties.clone())
            .mandatory(spec.mandatory);
        {
            let mut r = lock(&records);
            r.publishes.insert(
                id,
                PublishRecord {
                    publisher: index,
                    sent_at: trace.elapsed(),
                    resolved_at: None,
                    outcome: None,
                },
            );
            r.unresolved += 1;
        }
        let client = client.clone();
        let records = records.clone();
        let trace = trace.clone();
        spawn(Box::pin(async move {
            let result = client
                .publish_message(message, PublishOptions::default())
                .await;
            let outcome = PublishOutcome::of(&result);
            trace.record("publish", format_args!("{} -> {outcome:?}", payload_of(id)));
            let now = trace.elapsed();
            let mut r = lock(&records);
            if outcome == PublishOutcome::Confirmed {
                r.confirmed_at.push(now);
            }
            r.unresolved = r.unresolved.saturating_sub(1);
            if let Some(rec) = r.publishes.get_mut(&id) {
                rec.resolved_at = Some(now);
                rec.outcome = Some(outcome);
            }
        }));
    }
}

impl Outcome {
    /// Publishes resolved as confirmed.
    pub fn confirmed(&self) -> usize {
        self.publishes
            .values()
            .filter(|p| p.outcome == Some(PublishOutcome::Confirmed))
            .count()
    }

    /// Distinct workload messages the application received.
    pub fn received_unique(&self) -> usize {
        self.received.len()
    }

    /// Deliveries beyond the first of a message (at-least-once duplicates).
    pub fn duplicated(&self) -> u64 {
        self.received
            .values()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum()
    }

    /// Confirmed messages the broker cannot account for: never received by it,
    /// or routed and then neither in a queue, nor delivered to the application,
    /// nor lost with a queue that a fault deleted. Sorted ids.
    pub fn lost(&self) -> Vec<u64> {
        let mut by_id: BTreeMap<u64, Vec<&LedgerEntry>> = BTreeMap::new();
        for entry in &self.ledger {
            if let Some(id) = id_of(&entry.payload) {
                by_id.entry(id).or_default().push(entry);
            }
        }
        self.publishes
            .iter()
            .filter(|(_, p)| p.outcome == Some(PublishOutcome::Confirmed))
            .map(|(id, _)| *id)
            .filter(|id| {
                let Some(entries) = by_id.get(id) else {
                    return true; // the broker never got it
                };
                let accounted = self.in_queues.contains_key(id)
                    || self.received.contains_key(id)
                    || entries.iter().any(|e| e.routed == 0)
                    || entries.iter().all(|e| e.dropped + e.discarded >= e.routed);
                !accounted
            })
            .collect()
    }

    /// Messages the broker saw acked that the application never received.
    pub fn acked_unseen(&self) -> Vec<u64> {
        self.ledger
            .iter()
            .filter(|e| e.acked > 0)
            .filter_map(|e| id_of(&e.payload))
            .filter(|id| !self.received.contains_key(id))
            .collect()
    }

    /// Recovery stalls: for each fault that hit something, the time from it to
    /// the next confirm the application saw (faults followed by none are left
    /// out). In fault order.
    pub fn recovery_stalls(&self) -> Vec<Duration> {
        self.faults
            .iter()
            .filter(|f| f.hit)
            .filter_map(|f| {
                let i = self.confirmed_at.partition_point(|t| *t <= f.at);
                self.confirmed_at.get(i).map(|t| *t - f.at)
            })
            .collect()
    }

    /// The largest number of dials that started within any `window` (a sliding
    /// window, closed at both ends) among those at or after `from`.
    pub fn max_dials_within(&self, window: Duration, from: Duration) -> usize {
        let dials: Vec<Duration> = self
            .dial_times
            .iter()
            .copied()
            .filter(|t| *t >= from)
            .collect();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..dials.len() {
            while dials[hi] - dials[lo] > window {
                lo += 1;
            }
            best = best.max(hi + 1 - lo);
        }
        best
    }

    fn violation(&self, invariant: Invariant, detail: String) -> Violation {
        Violation {
            invariant,
            seed: self.seed,
            detail,
        }
    }

    /// Invariant 1, through what the broker can see: no publish on a channel
    /// outside confirm mode (before `confirm.select` completed), none to an
    /// exchange that does not exist (before the topology replay completed), none
    /// accepted on a channel whose close the client had been told of.
    pub fn check_only_ready_channels(&self) -> Result<(), Violation> {
        let b = &self.broker;
        let i = &self.instruments;
        if b.publishes_outside_confirm_mode > 0
            || b.publishes_to_missing_exchange > 0
            || i.publishes_after_close > 0
        {
            return Err(self.violation(
                Invariant::OnlyReadyChannels,
                format!(
                    "{} publishes outside confirm mode, {} to a missing exchange, {} after \
                     the channel was known closed",
                    b.publishes_outside_confirm_mode,
                    b.publishes_to_missing_exchange,
                    i.publishes_after_close
                ),
            ));
        }
        Ok(())
    }

    /// Invariant 2: every message resolved `Confirmed` is accounted for by the
    /// broker (see [`lost`](Self::lost)), and every message the broker saw acked
    /// reached the application.
    pub fn check_no_confirmed_loss(&self) -> Result<(), Violation> {
        let lost = self.lost();
        let unseen = self.acked_unseen();
        if lost.is_empty() && unseen.is_empty() {
            return Ok(());
        }
        let show = |ids: &[u64]| {
            ids.iter()
                .take(8)
                .map(|id| payload_of(*id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(self.violation(
            Invariant::NoConfirmedLoss,
            format!(
                "{} confirmed messages lost ({}), {} acked but never delivered ({})",
                lost.len(),
                show(&lost),
                unseen.len(),
                show(&unseen)
            ),
        ))
    }

    /// Invariant 3: every publish resolved, none later than a moment after its
    /// deadline (the publish timeout).
    pub fn check_every_publish_resolves(&self) -> Result<(), Violation> {
        let deadline = self.publish_timeout;
        let unresolved: Vec<u64> = self
            .publishes
            .iter()
            .filter(|(_, p)| p.outcome.is_none())
            .map(|(id, _)| *id)
            .collect();
        let late: Vec<u64> = self
            .publishes
            .iter()
            .filter(|(_, p)| {
                p.resolved_at
                    .is_some_and(|r| r > p.sent_at + deadline + Duration::from_millis(100))
            })
            .map(|(id, _)| *id)
            .collect();
        if unresolved.is_empty() && late.is_empty() {
            return Ok(());
        }
        Err(self.violation(
            Invariant::EveryPublishResolves,
            format!(
                "{} publishes unresolved at {:?} (first {:?}), {} resolved after their deadline",
                unresolved.len(),
                self.ended_at,
                unresolved.first().map(|id| payload_of(*id)),
                late.len()
            ),
        ))
    }

    /// Invariant 4: Ready at the end, and Ready since no later than the last
    /// fault's end plus the bound.
    pub fn check_liveness(&self) -> Result<(), Violation> {
        let limit = self.quiet_at + self.liveness_bound;
        match self.ready_at {
            Some(t) if t <= limit => Ok(()),
            Some(t) => Err(self.violation(
                Invariant::Liveness,
                format!(
                    "Ready only at {t:?}; the last fault was over at {:?}, bound {:?}",
                    self.quiet_at, self.liveness_bound
                ),
            )),
            None => Err(self.violation(
                Invariant::Liveness,
                format!(
                    "not Ready at {:?}; the last fault was over at {:?}, bound {:?}",
                    self.ended_at, self.quiet_at, self.liveness_bound
                ),
            )),
        }
    }

    /// Invariant 5: `close()` returned, the driver ended, no dial after it, nothing
    /// left unresolved.
    pub fn check_close_is_terminal(&self) -> Result<(), Violation> {
        let Some(c) = &self.close else {
            return Ok(());
        };
        if c.returned
            && c.driver_finished
            && c.dials_after_close == 0
            && c.unresolved_after_close == 0
        {
            return Ok(());
        }
        Err(self.violation(Invariant::CloseIsTerminal, format!("{c:?}")))
    }

    /// Invariant 7: every exchange, queue (under its current name), binding and
    /// consumer is on the broker, and a probe through each consumed queue reached
    /// a consumer.
    pub fn check_topology_restored(&self) -> Result<(), Violation> {
        let unreached: Vec<&String> = self
            .probes
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| name)
            .collect();
        if self.topology_missing.is_empty() && unreached.is_empty() && self.setup_errors.is_empty()
        {
            return Ok(());
        }
        Err(self.violation(
            Invariant::TopologyRestored,
            format!(
                "missing: {:?}; probes not received through {:?}; setup errors: {:?}",
                self.topology_missing, unreached, self.setup_errors
            ),
        ))
    }

    /// Invariant 8: no ack, nack or reject with an unknown delivery tag reached
    /// the broker.
    pub fn check_no_stale_ack(&self) -> Result<(), Violation> {
        if self.unknown_tag_acks == 0 {
            return Ok(());
        }
        Err(self.violation(
            Invariant::NoStaleAck,
            format!(
                "{} acks with an unknown delivery tag reached the broker ({} refused as stale \
                 by the client)",
                self.unknown_tag_acks, self.acks.stale
            ),
        ))
    }

    /// Every check above (Invariants 1 to 5, 7 and 8), the first failure first.
    pub fn check_all(&self) -> Result<(), Violation> {
        self.check_only_ready_channels()?;
        self.check_no_confirmed_loss()?;
        self.check_every_publish_resolves()?;
        self.check_liveness()?;
        self.check_close_is_terminal()?;
        self.check_topology_restored()?;
        self.check_no_stale_ack()
    }
}

/// Invariant 9: runs `scenario` twice and compares the traces byte for byte.
pub fn check_same_trace(scenario: &Scenario) -> Result<(), Violation> {
    let a = Simulation::new(scenario).run();
    let b = Simulation::new(scenario).run();
    if a.trace == b.trace {
        return Ok(());
    }
    let line = a
        .trace
        .lines()
        .zip(b.trace.lines())
        .position(|(x, y)| x != y)
        .unwrap_or_else(|| a.trace.lines().count().min(b.trace.lines().count()));
    Err(Violation {
        invariant: Invariant::SameSeedSameTrace,
        seed: scenario.seed,
        detail: format!(
            "traces differ from line {line}: {:?} vs {:?}",
            a.trace.lines().nth(line),
            b.trace.lines().nth(line)
        ),
    })
}

/// The seed in `REBOUND_SEED`, if set (decimal or `0x` hex).
pub fn seed_from_env() -> Option<u64> {
    let raw = std::env::var("REBOUND_SEED").ok()?;
    let raw = raw.trim();
    match raw.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => raw.parse().ok(),
    }
}

/// A planted bug for a scenario: the same scenario with `bug` in its settings.
pub fn with_bug(scenario: &Scenario, bug: ClientBug) -> Scenario {
    let mut s = scenario.clone();
    s.settings.bug = bug;
    s
}
