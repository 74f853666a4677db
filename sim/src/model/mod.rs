//! The broker's state and the processing of every frame: the synchronous heart of the
//! simulator. It knows no lock, no task and no timer: [`crate::SimBroker`] wraps it in
//! a lock and puts the clock actions it asks for ([`State::take_timers`]) on the
//! clock; [`crate::transport`] feeds it requests through the per-connection wire
//! queues. Time is read from the one [`VirtualClock`], never moved.
//!
//! - `wire`: the frames, their queues, and what each method does.
//! - `connections`: dials, connections and channels, and closing them.
//! - `entities`: exchanges, queues and bindings ([`Entities`]); `routing`: where a
//!   message goes.
//! - `publish`: publishes, confirms, returns and the ledger.
//! - `consumers`: consumers, dispatch and settling deliveries.
//! - `faults`: hosts, and every fault the broker can be told to inject.
//! - `snapshot`: what tests see; `config`: how a broker is set up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::transport::ChannelEvent;

mod config;
mod connections;
mod consumers;
mod entities;
mod faults;
mod publish;
pub mod routing;
mod snapshot;
mod wire;

pub use config::{BrokerConfig, ConfirmMode};
pub(crate) use connections::DialCheck;
use connections::{Chan, Conn};
pub use connections::{ConnectionStats, SimConnectionId};
use consumers::{Consumer, Settle, Unacked};
pub use entities::{BindingDestination, StoredMessage};
use entities::{Entities, Queue};
use faults::{HostCheck, Hosts};
use publish::Ledger;
pub use publish::LedgerEntry;
pub use snapshot::{BindingSnapshot, BrokerStats, ConnectionInfo, ExchangeSnapshot, QueueSnapshot};
use wire::Down;
pub(crate) use wire::{Op, Reply, Request};

use crate::clock::VirtualClock;

/// What a clock action asks the broker to do.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    FlushUp(u64),
    FlushDown(u64),
    HeartbeatCheck {
        conn: u64,
        host: String,
        epoch: u64,
    },
    DelayedConfirm {
        conn: u64,
        chan: u64,
        delivery_tag: u64,
    },
}

/// A failed method: what it closes.
enum Fail {
    Channel(TransportError),
    Connection(TransportError),
}

fn reply(code: u16, text: impl Into<String>) -> TransportError {
    TransportError::Reply {
        code,
        text: text.into(),
    }
}

fn channel_fail(code: u16, text: impl Into<String>) -> Fail {
    Fail::Channel(reply(code, text))
}

fn not_found_queue(name: &str) -> Fail {
    channel_fail(
        reply_code::NOT_FOUND,
        format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    )
}

fn not_found_exchange(name: &str) -> Fail {
    channel_fail(
        reply_code::NOT_FOUND,
        format!("NOT_FOUND - no exchange '{name}' in vhost '/'"),
    )
}

fn locked(name: &str) -> Fail {
    channel_fail(
        reply_code::RESOURCE_LOCKED,
        format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'"
        ),
    )
}

/// Why queued messages were dropped, for the conservation counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropCause {
    Delete,
    Restart,
}

/// Everything the simulated broker knows.
pub(crate) struct State {
    /// Read for the time only: timers go out through `timers`.
    pub(crate) clock: VirtualClock,
    pub(crate) config: BrokerConfig,
    rng: fastrand::Rng,
    hosts: Hosts,
    alarm: Option<String>,
    confirm_mode: ConfirmMode,
    entities: Entities,
    consumers: BTreeMap<(u64, String), Consumer>,
    conns: BTreeMap<u64, Conn>,
    chans: BTreeMap<u64, Chan>,
    /// Queues whose consumers may take a message.
    dirty: BTreeSet<String>,
    next_conn: u64,
    next_chan: u64,
    restarting: bool,
    stats: BrokerStats,
    trace: Vec<String>,
    /// The fate of every message published through a connection, by id.
    ledger: Ledger,
    /// Clock actions asked for and not yet handed to the owner of the clock (see
    /// [`State::take_timers`]).
    timers: Vec<(Instant, Action)>,
}

impl State {
    pub(crate) fn new(clock: VirtualClock, config: BrokerConfig) -> State {
        let rng = fastrand::Rng::with_seed(config.seed);
        State {
            clock,
            config,
            rng,
            hosts: Hosts::new(),
            alarm: None,
            confirm_mode: ConfirmMode::Normal,
            entities: Entities::with_builtin_exchanges(),
            consumers: BTreeMap::new(),
            conns: BTreeMap::new(),
            chans: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_conn: 1,
            next_chan: 1,
            restarting: false,
            stats: BrokerStats::default(),
            trace: Vec::new(),
            ledger: Ledger::new(),
            timers: Vec::new(),
        }
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    pub(crate) fn log(&mut self, line: impl FnOnce() -> String) {
        if self.config.trace || tracing::enabled!(tracing::Level::DEBUG) {
            let elapsed = self.clock.elapsed();
            let line = line();
            tracing::debug!(sim_time = ?elapsed, "{line}");
            if self.config.trace {
                self.trace.push(format!(
                    "[{:>6}.{:03}s] {line}",
                    elapsed.as_secs(),
                    elapsed.subsec_millis()
                ));
            }
        }
    }

    pub(crate) fn trace(&self) -> Vec<String> {
        self.trace.clone()
    }

    /// Asks for `action` at `at`. The model owns no timer: whoever owns it drains
    /// [`take_timers`](Self::take_timers) after each call and hands the actions back
    /// to [`run_action`](Self::run_action) when they fall due.
    fn schedule(&mut self, at: Instant, action: Action) {
        self.timers.push((at, action));
    }

    /// The clock actions asked for since the last call, in the order asked.
    pub(crate) fn take_timers(&mut self) -> Vec<(Instant, Action)> {
        std::mem::take(&mut self.timers)
    }

    pub(crate) fn run_action(&mut self, action: Action) {
        match action {
            Action::FlushUp(conn) => self.flush_up(conn),
            Action::FlushDown(conn) => self.flush_down(conn),
            Action::HeartbeatCheck { conn, host, epoch } => {
                let same_partition = self.hosts.partition_epoch(&host) == Some(epoch);
                let alive = self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.client_closed.is_none());
                if same_partition && alive {
                    self.log(|| format!("{}: missed heartbeats", SimConnectionId(conn)));
                    self.close_conn_broker(conn, TransportError::HeartbeatTimeout);
                    self.notify_client_closed(conn, TransportError::HeartbeatTimeout);
                }
            }
            Action::DelayedConfirm {
                conn,
                chan,
                delivery_tag,
            } => {
                let event = ChannelEvent::Ack {
                    delivery_tag,
                    multiple: false,
                };
                let open = self.chans.get(&chan).is_some_and(|c| c.broker_open);
                if open {
                    self.send_down(conn, Down::chan(chan, event));
                }
            }
        }
    }

    fn drop_cause(&self) -> DropCause {
        if self.restarting {
            DropCause::Restart
        } else {
            DropCause::Delete
        }
    }
}

/// 503 COMMAND_INVALID (a connection error; core has no name for it).
fn reply_code_command_invalid() -> u16 {
    503
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The random part of a server-made name (`amq.gen-...`, `amq.ctag-...`).
fn random_suffix(rng: &mut fastrand::Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..22)
        .map(|_| char::from(ALPHABET[rng.usize(..ALPHABET.len())]))
        .collect()
}
