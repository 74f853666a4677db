//! [`Fault`]s and [`FaultPlan`]s: what goes wrong in a simulation, and when.
//!
//! A plan is a list of faults at offsets of virtual time from the start of a
//! simulation. [`FaultPlan::install`] schedules them on the broker's
//! [`VirtualClock`](crate::VirtualClock); each fires as time passes, and a fault with a duration
//! (refusal, partition, confirm trouble, blocking) schedules its own end.
//!
//! Faults that target "a connection", "a channel", "a consumer" or "a queue" name
//! it by a `pick` number, resolved when the fault fires against what exists then
//! (`pick % count`, in the broker's sorted order), so a plan is independent of the
//! ids a run happens to create and still replays exactly.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::broker::{ConfirmMode, SimBroker, SimConnectionId};
use crate::trace::Trace;

/// One thing that goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// TCP reset of one open connection (`pick` among the open ones).
    KillConnection {
        /// Which one.
        pick: usize,
    },
    /// TCP reset of every connection.
    KillAll,
    /// The broker closes one connection with a reply code (320
    /// CONNECTION_FORCED, as `rabbitmqctl close_connection`).
    CloseConnection {
        /// Which one.
        pick: usize,
        /// Reply code.
        code: u16,
    },
    /// The broker closes one channel with a reply code (404, 406, 541, ...).
    CloseChannel {
        /// Which connection.
        pick: usize,
        /// Which of its open channels.
        channel: usize,
        /// Reply code.
        code: u16,
    },
    /// Dials to one host are refused for a while (open connections stay).
    RefuseDials {
        /// Host index (modulo the host count).
        host: usize,
        /// How long.
        duration: Duration,
    },
    /// One host is blackholed, then heals.
    Partition {
        /// Host index (modulo the host count).
        host: usize,
        /// How long until the heal.
        duration: Duration,
    },
    /// The broker restarts: every connection gets 320, transient state is lost,
    /// dials are refused during the downtime.
    Restart {
        /// How long it stays down.
        downtime: Duration,
    },
    /// Confirms are sent late for a while.
    DelayConfirms {
        /// How late.
        delay: Duration,
        /// For how long.
        duration: Duration,
    },
    /// Confirms are never sent for a while (messages are routed).
    DropConfirms {
        /// For how long.
        duration: Duration,
    },
    /// Messages are refused and nacked for a while.
    NackConfirms {
        /// For how long.
        duration: Duration,
    },
    /// One connection is blocked (`connection.blocked`), then unblocked.
    Block {
        /// Which one.
        pick: usize,
        /// How long.
        duration: Duration,
    },
    /// A resource alarm blocks every connection for a while.
    Alarm {
        /// How long.
        duration: Duration,
    },
    /// The broker cancels one consumer (`basic.cancel`).
    CancelConsumer {
        /// Which one, among every consumer of every queue.
        pick: usize,
    },
    /// An administrator deletes a queue that has consumers (its consumers get
    /// `basic.cancel`, its messages are dropped). Queues without consumers are
    /// left alone: no AMQP client can notice their deletion before its next
    /// recovery.
    DeleteQueue {
        /// Which one, among the queues with consumers.
        pick: usize,
    },
}

impl Fault {
    /// How long the fault lasts after it fires (zero for instantaneous ones).
    pub fn duration(&self) -> Duration {
        match self {
            Fault::RefuseDials { duration, .. }
            | Fault::Partition { duration, .. }
            | Fault::DropConfirms { duration }
            | Fault::NackConfirms { duration }
            | Fault::Block { duration, .. }
            | Fault::Alarm { duration } => *duration,
            Fault::DelayConfirms { delay, duration } => *duration + *delay,
            Fault::Restart { downtime } => *downtime,
            Fault::KillConnection { .. }
            | Fault::KillAll
            | Fault::CloseConnection { .. }
            | Fault::CloseChannel { .. }
            | Fault::CancelConsumer { .. }
            | Fault::DeleteQueue { .. } => Duration::ZERO,
        }
    }

    /// Whether the fault can leave a dial hanging (a blackholed host), so that
    /// recovery may first wait for the connect timeout.
    pub fn may_hang_dials(&self) -> bool {
        matches!(self, Fault::Partition { .. })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillConnection { pick } => write!(f, "kill connection #{pick}"),
            Fault::KillAll => write!(f, "kill all connections"),
            Fault::CloseConnection { pick, code } => {
                write!(f, "close connection #{pick} with {code}")
            }
            Fault::CloseChannel {
                pick,
                channel,
                code,
            } => write!(
                f,
                "close channel #{channel} of connection #{pick} with {code}"
            ),
            Fault::RefuseDials { host, duration } => {
                write!(f, "refuse dials to host #{host} for {duration:?}")
            }
            Fault::Partition { host, duration } => {
                write!(f, "partition host #{host} for {duration:?}")
            }
            Fault::Restart { downtime } => write!(f, "restart the broker (down {downtime:?})"),
            Fault::DelayConfirms { delay, duration } => {
                write!(f, "delay confirms by {delay:?} for {duration:?}")
            }
            Fault::DropConfirms { duration } => write!(f, "drop confirms for {duration:?}"),
            Fault::NackConfirms { duration } => write!(f, "nack publishes for {duration:?}"),
            Fault::Block { pick, duration } => {
                write!(f, "block connection #{pick} for {duration:?}")
            }
            Fault::Alarm { duration } => write!(f, "resource alarm for {duration:?}"),
            Fault::CancelConsumer { pick } => write!(f, "cancel consumer #{pick}"),
            Fault::DeleteQueue { pick } => write!(f, "delete queue #{pick}"),
        }
    }
}

/// A fault at an offset of virtual time from the start of the simulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledFault {
    /// When it fires, from the start.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// Faults at chosen virtual times.
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_sim::{Fault, FaultPlan};
///
/// let plan = FaultPlan::new()
///     .at(Duration::from_secs(1), Fault::KillAll)
///     .at(Duration::from_secs(3), Fault::Restart { downtime: Duration::from_secs(2) });
/// assert_eq!(plan.len(), 2);
/// assert_eq!(plan.quiet_after(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// The faults, in time order.
    pub faults: Vec<ScheduledFault>,
}

impl FaultPlan {
    /// An empty plan.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Adds a fault at `at` (kept in time order; equal times keep insertion order).
    pub fn at(mut self, at: Duration, fault: Fault) -> FaultPlan {
        self.push(at, fault);
        self
    }

    /// Adds a fault at `at`.
    pub fn push(&mut self, at: Duration, fault: Fault) {
        let i = self.faults.partition_point(|f| f.at <= at);
        self.faults.insert(i, ScheduledFault { at, fault });
    }

    /// How many faults.
    pub fn len(&self) -> usize {
        self.faults.len()
    }

    /// No fault at all.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// When the last fault is over (its start plus its duration), from the start:
    /// from then on nothing goes wrong.
    pub fn quiet_after(&self) -> Duration {
        self.faults
            .iter()
            .map(|f| f.at + f.fault.duration())
            .max()
            .unwrap_or_default()
    }

    /// Whether some fault can leave a dial hanging until the connect timeout.
    pub fn may_hang_dials(&self) -> bool {
        self.faults.iter().any(|f| f.fault.may_hang_dials())
    }

    /// Schedules every fault on the broker's clock, at `origin + at`. `hosts` are
    /// the host keys that host indexes refer to. Each applied fault (and each end
    /// of one) is recorded in `trace` and in the returned [`FaultLog`].
    pub fn install(
        &self,
        broker: &SimBroker,
        origin: std::time::Instant,
        hosts: Vec<String>,
        trace: Trace,
    ) -> FaultLog {
        let injector = Injector {
            broker: broker.clone(),
            hosts,
            trace,
            state: Arc::new(Mutex::new(InjectorState::default())),
        };
        let clock = broker.clock();
        for f in &self.faults {
            let injector = injector.clone();
            let fault = f.fault.clone();
            clock.schedule_at(origin + f.at, move || injector.fire(fault));
        }
        FaultLog {
            state: injector.state,
        }
    }
}

/// What a plan did, as it did it.
#[derive(Debug, Clone)]
pub struct FaultLog {
    state: Arc<Mutex<InjectorState>>,
}

/// One fault as applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFault {
    /// When it fired, from the clock's origin.
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
    /// What it hit (`"conn#3"`, `"rabbit-0:5672"`), or why it hit nothing.
    pub target: String,
    /// Whether it hit something.
    pub hit: bool,
}

impl FaultLog {
    /// Every fault fired so far, in order.
    pub fn applied(&self) -> Vec<AppliedFault> {
        lock(&self.state).applied.clone()
    }
}

#[derive(Debug, Default)]
struct InjectorState {
    applied: Vec<AppliedFault>,
    /// Bumped by every confirm-mode fault; an end only restores `Normal` if no
    /// later confirm fault took over meanwhile.
    confirm_token: u64,
    alarms: u32,
    partitions: BTreeMap<String, u32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone)]
struct Injector {
    broker: SimBroker,
    hosts: Vec<String>,
    trace: Trace,
    state: Arc<Mutex<InjectorState>>,
}

impl Injector {
    fn host(&self, i: usize) -> Option<String> {
        match self.hosts.len() {
            0 => None,
            n => Some(self.hosts[i % n].clone()),
        }
    }

    fn pick_connection(&self, pick: usize) -> Option<SimConnectionId> {
        let open = self.broker.open_connections();
        match open.len() {
            0 => None,
            n => Some(open[pick % n]),
        }
    }

    fn after(&self, delay: Duration, action: impl FnOnce(&Injector) + Send + 'static) {
        let me = self.clone();
        let clock = self.broker.clock();
        clock.schedule_at(clock.now() + delay, move || action(&me));
    }

    fn note(&self, fault: &Fault, target: Option<String>) {
        let elapsed = self.broker.clock().elapsed();
        let hit = target.is_some();
        let target = target.unwrap_or_else(|| "nothing to hit".to_owned());
        self.trace
            .record("fault", format_args!("{fault}: {target}"));
        lock(&self.state).applied.push(AppliedFault {
            at: elapsed,
            fault: fault.clone(),
            target,
            hit,
        });
    }

    fn set_confirms(&self, mode: ConfirmMode, duration: Duration) {
        let token = {
            let mut s = lock(&self.state);
            s.confirm_token += 1;
            s.confirm_token
        };
        self.broker.set_confirm_mode(mode);
        self.after(duration, move |me| {
            if lock(&me.state).confirm_token == token {
                me.broker.set_confirm_mode(ConfirmMode::Normal);
                me.trace
                    .record("fault", format_args!("confirms normal again"));
            }
        });
    }

    fn fire(&self, fault: Fault) {
        let target = match &fault {
            Fault::KillConnection { pick } => self
                .pick_connection(*pick)
                .and_then(|id| self.broker.kill_connection(id).then(|| id.to_string())),
            Fault::KillAll => {
                let n = self.broker.kill_all_connections();
                (n > 0).then(|| format!("{n} connections"))
            }
            Fault::CloseConnection { pick, code } => self.pick_connection(*pick).and_then(|id| {
                self.broker
                    .close_connection(id, *code, "CONNECTION_FORCED - simulated")
                    .then(|| id.to_string())
            }),
            Fault::CloseChannel {
                pick,
                channel,
                code,
            } => self.pick_connection(*pick).and_then(|id| {
                let channels = self.broker.connection(id)?.channels;
                if channels.is_empty() {
                    return None;
                }
                let number = channels[*channel % channels.len()];
                self.broker
                    .close_channel(id, number, *code, "simulated channel error")
                    .then(|| format!("{id} channel {number}"))
            }),
            Fault::RefuseDials { host, duration } => self
                .host(*host)
                .and_then(|h| self.broker.refuse_dials(&h, *duration).then_some(h)),
            Fault::Partition { host, duration } => self.host(*host).and_then(|h| {
                if !self.broker.partition(&h) {
                    return None;
                }
                *lock(&self.state).partitions.entry(h.clone()).or_default() += 1;
                let healed = h.clone();
                self.after(*duration, move |me| {
                    let last = {
                        let mut s = lock(&me.state);
                        let n = s.partitions.entry(healed.clone()).or_default();
                        *n = n.saturating_sub(1);
                        *n == 0
                    };
                    if last {
                        me.broker.heal(&healed);
                        me.trace.record("fault", format_args!("heal {healed}"));
                    }
                });
                Some(h)
            }),
            Fault::Restart { downtime } => {
                self.broker.restart(*downtime);
                Some("broker".to_owned())
            }
            Fault::DelayConfirms { delay, duration } => {
                self.set_confirms(ConfirmMode::Delay(*delay), *duration);
                Some("broker".to_owned())
            }
            Fault::DropConfirms { duration } => {
                self.set_confirms(ConfirmMode::Drop, *duration);
                Some("broker".to_owned())
            }
            Fault::NackConfirms { duration } => {
                self.set_confirms(ConfirmMode::Nack, *duration);
                Some("broker".to_owned())
            }
            Fault::Block { pick, duration } => self.pick_connection(*pick).and_then(|id| {
                if !self
                    .broker
                    .block_connection(id, "low on memory (simulated)")
                {
                    return None;
                }
                self.after(*duration, move |me| {
                    if me.broker.unblock_connection(id) {
                        me.trace.record("fault", format_args!("unblock {id}"));
                    }
                });
                Some(id.to_string())
            }),
            Fault::Alarm { duration } => {
                let first = {
                    let mut s = lock(&self.state);
                    s.alarms += 1;
                    s.alarms == 1
                };
                if first {
                    self.broker.set_alarm("memory alarm (simulated)");
                }
                self.after(*duration, |me| {
                    let last = {
                        let mut s = lock(&me.state);
                        s.alarms = s.alarms.saturating_sub(1);
                        s.alarms == 0
                    };
                    if last {
                        me.broker.clear_alarm();
                        me.trace.record("fault", format_args!("alarm cleared"));
                    }
                });
                Some("broker".to_owned())
            }
            Fault::CancelConsumer { pick } => {
                let tags: Vec<String> = self
                    .broker
                    .queues()
                    .into_iter()
                    .flat_map(|q| q.consumers)
                    .collect();
                match tags.len() {
                    0 => None,
                    n => {
                        let tag = &tags[pick % n];
                        (self.broker.cancel_consumer(tag) > 0).then(|| tag.clone())
                    }
                }
            }
            Fault::DeleteQueue { pick } => {
                let names: Vec<String> = self
                    .broker
                    .queues()
                    .into_iter()
                    .filter(|q| !q.consumers.is_empty())
                    .map(|q| q.name)
                    .collect();
                match names.len() {
                    0 => None,
                    n => {
                        let name = &names[pick % n];
                        self.broker.delete_queue(name).map(|_| name.clone())
                    }
                }
            }
        };
        self.note(&fault, target);
    }
}
