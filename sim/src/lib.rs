//! `amqp-rebound-sim`: deterministic simulation of amqp-rebound.
//!
//! Run the whole client against an in-memory broker under injected faults, in
//! virtual time, driven by one seed so that every failing case replays bit for bit.
//!
//! - [`VirtualClock`]: core's [`Timer`](amqp_rebound_core::Timer) over simulated
//!   time, which moves only when the test moves it.
//! - [`SimBroker`]: an in-memory AMQP 0-9-1 broker with a synchronous API for
//!   fault injection and inspection.
//! - [`SimTransport`], [`SimConnection`], [`SimChannel`]: core's
//!   [`Transport`](amqp_rebound_core::Transport), [`Connection`](amqp_rebound_core::Connection)
//!   and [`Channel`](amqp_rebound_core::Channel) over simulated brokers.
//!
//! - [`FaultPlan`]: [`Fault`]s at virtual times (kill, refuse, partition, restart,
//!   channel errors, confirm trouble, blocking, consumer cancels, queue deletes),
//!   scheduled on the clock.
//! - [`Scenario`]: a [`Workload`], a plan and [`Settings`], all named by one seed
//!   ([`Scenario::from_seed`]); [`strategies`] generate them for proptest.
//! - [`Simulation`]: the real `Client` and `Driver` on a `LocalPool` against the
//!   simulated broker, in virtual time; its [`Outcome`] checks the
//!   [`Invariant`]s ([`Outcome::check_all`], [`check_same_trace`]) and prints the seed
//!   of a failure (`REBOUND_SEED=<n>` replays it).
//! - [`InstrumentedTransport`]: counts dials and publishes, and plants a
//!   [`ClientBug`] to show that the checks catch bugs.
//! - The `rebound-chaos` binary: a publisher + consumer workload under random
//!   faults, with a report (`cargo run --release -p amqp-rebound-sim --bin
//!   rebound-chaos`), and `--bench-mode` for the simulator's figures.
//!
//! ```
//! use amqp_rebound_sim::{Scenario, Shape, Simulation};
//!
//! let scenario = Scenario::from_seed(3, &Shape::small()); // 10+ faults in 20 s
//! let outcome = Simulation::new(&scenario).run();
//! outcome.check_all().unwrap();
//! assert!(outcome.trace.contains("fault:"));
//! ```
//!
//! No thread, no wall clock, no runtime: futures complete when the clock fires the
//! timers they wait on, so everything runs under `futures::executor::LocalPool` (or
//! any executor), stepped with [`VirtualClock::run_until`]. All state lives in
//! ordered maps; the only randomness is the broker's `fastrand::Rng`, seeded from
//! [`BrokerConfig::seed`].
//!
//! # The model
//!
//! One virtual host, no permissions. Per broker:
//!
//! - **Exchanges**: direct, fanout, topic (`*` one word, `#` zero or more), headers
//!   (`x-match` all / any); the default exchange `""` routes to the queue named by
//!   the routing key; `amq.direct`, `amq.fanout`, `amq.topic`, `amq.headers` and
//!   `amq.match` exist from the start. Exchange-to-exchange bindings; auto-delete
//!   exchanges go with their last binding; internal exchanges refuse publishes.
//! - **Queues**: durable or transient; exclusive (owned by one connection, others
//!   get 405 RESOURCE_LOCKED, deleted when the owner closes); auto-delete (deleted
//!   when the last consumer goes); server-named `amq.gen-...` when declared with
//!   `""`. Redeclaring with other flags or arguments: 406 PRECONDITION_FAILED.
//!   Names starting with `amq.`: 403.
//! - **Errors as RabbitMQ sends them**: 404 for binding, consuming or publishing to
//!   what does not exist (a publish to a missing exchange closes the channel; no
//!   call returns it), 406 for an unknown delivery tag (the channel closes), 403 for
//!   the default exchange or a queue in exclusive use, 530 (connection) for a reused
//!   consumer tag or too many channels, 503 (connection) for an unknown exchange
//!   type. Deleting what does not exist succeeds.
//! - **Consumers**: round-robin per queue, prefetch per consumer (`global = false`:
//!   `basic.qos` applies to consumers started after it; [`ConsumeOptions::prefetch`]
//!   sets it first), `no_ack`, exclusive consumers. Delivery tags count from 1 per
//!   channel. ack / nack / reject with `multiple` (tag 0 with `multiple` = all);
//!   requeued messages go back to the head of their queue flagged `redelivered`. A
//!   closed channel or connection requeues its unacked messages. A deleted queue
//!   sends `basic.cancel` to its consumers.
//! - **Publisher confirms** per channel, numbered 1, 2, 3 from `confirm.select`;
//!   an ack once the message is routed, unroutable ones included; a mandatory
//!   unroutable message comes back as `basic.return` (312 NO_ROUTE) before its
//!   ack.
//! - **Flow control**: `connection.blocked` / `unblocked`, per connection or by a
//!   broker-wide alarm; a blocked connection stops reading at its next publish
//!   (the frames behind it wait too), as RabbitMQ does.
//! - **The wire**: every connection carries its frames in order, each direction
//!   after a configurable latency (default 1 ms); a call takes a round trip, a
//!   publish returns at once.
//! - **Hosts**: a broker serves one or more `host:port`s; a transport holds one or
//!   more brokers. Faults per host (refuse, partition) or per broker (restart).
//! - **Authentication**: one user and password; anything else fails the dial with
//!   [`TransportError::Auth`](amqp_rebound_core::TransportError::Auth).
//!
//! # Faults
//!
//! On [`SimBroker`]: [`kill_connection`](SimBroker::kill_connection) (TCP reset),
//! [`close_connection`](SimBroker::close_connection) (broker `connection.close`,
//! e.g. 320), [`close_channel`](SimBroker::close_channel) (any reply code),
//! [`refuse_dials`](SimBroker::refuse_dials), [`partition`](SimBroker::partition) /
//! [`heal`](SimBroker::heal) (blackhole; missed heartbeats after 2x the interval),
//! [`restart`](SimBroker::restart) (320 for all, non-durable state lost, down for a
//! while), [`set_confirm_mode`](SimBroker::set_confirm_mode) (delay, drop or nack
//! confirms), [`block_connection`](SimBroker::block_connection) /
//! [`set_alarm`](SimBroker::set_alarm), [`cancel_consumer`](SimBroker::cancel_consumer),
//! [`delete_queue`](SimBroker::delete_queue), [`set_latency`](SimBroker::set_latency),
//! [`set_credentials`](SimBroker::set_credentials).
//!
//! # Not modelled
//!
//! Virtual hosts and permissions; frame sizes, channel flow (`channel.flow`) and
//! credit flow; transactions; `basic.get`, `basic.recover`, `queue.purge`,
//! passive declares and `nowait` (core's traits have none of them); queue arguments
//! (TTL, max-length, dead-lettering, priorities, quorum and stream queues: they are
//! stored and compared on redeclare, never acted on); alternate exchanges;
//! `immediate`; `consumer priorities`; the `user_id` check is the only property
//! check. Heartbeats are not frames: a partitioned connection is declared dead at
//! exactly twice its interval, on both sides at once. A restart is instantaneous
//! apart from its downtime; disk writes never fail. There is one node: "cluster"
//! means one broker behind several addresses. Publish sequence numbers are the
//! broker's count; the client must count the same way (from `confirm.select`).
//!
//! [`ConsumeOptions::prefetch`]: amqp_rebound_core::ConsumeOptions::prefetch

pub mod broker;
pub mod clock;
pub mod fault;
pub mod instrument;
mod model;
#[cfg(feature = "proxy")]
pub mod proxy;
pub use model::routing;
pub mod scenario;
pub mod simulation;
pub mod trace;
pub mod transport;

pub use amqp_rebound_core as core;
pub use broker::{
    BindingDestination, BindingSnapshot, BrokerConfig, BrokerStats, ConfirmMode, ConnectionInfo,
    ConnectionStats, ExchangeSnapshot, LedgerEntry, QueueSnapshot, SimBroker, SimConnectionId,
    StoredMessage, host_key, normalize_host,
};
pub use clock::VirtualClock;
pub use fault::{AppliedFault, Fault, FaultLog, FaultPlan, ScheduledFault};
pub use instrument::{ClientBug, InstrumentedTransport, Instruments};
pub use scenario::{
    BindingSpec, ConsumerSpec, ExchangeSpec, PublisherSpec, QueueSpec, Scenario, Settings, Shape,
    Target, Workload, strategies,
};
pub use simulation::{
    AckCounts, CloseReport, Invariant, Outcome, PublishOutcome, PublishRecord, Simulation, Spawner,
    Violation, WorkloadRecords, check_same_trace, id_of, payload_of, seed_from_env, start_workload,
    with_bug,
};
pub use trace::{SimTime, Trace};
pub use transport::{SimChannel, SimConnection, SimTransport};
