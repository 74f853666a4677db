//! Bugs of core that this simulator found, one reproducer each, kept as
//! regression tests (all about server-named queues: a
//! channel-only reopen re-declaring a live queue, an auto-delete queue gone with
//! its only consumers' channel, and one broker cancel per consumer re-declaring
//! the queue once each). `Scenario::avoid_known_core_bugs` is off by default.

use std::time::Duration;

use amqp_rebound_core::ExchangeKind;
use amqp_rebound_sim::{
    BindingSpec, ConsumerSpec, ExchangeSpec, Fault, FaultPlan, PublisherSpec, QueueSpec, Scenario,
    Settings, Shape, Simulation, Target, Workload,
};

/// One durable queue `q0` and one server-named queue, both bound to a fanout
/// exchange, one consumer each (c0 on q0, c1 on the server-named one), one
/// publisher.
fn two_queues(consumers_on_server_named: usize) -> Workload {
    let mut consumers = vec![ConsumerSpec {
        queue: 0,
        prefetch: None,
        ack_delay: Duration::ZERO,
    }];
    for _ in 0..consumers_on_server_named {
        consumers.push(ConsumerSpec {
            queue: 1,
            prefetch: None,
            ack_delay: Duration::ZERO,
        });
    }
    Workload {
        exchanges: vec![ExchangeSpec {
            name: "ex0".into(),
            kind: ExchangeKind::Fanout,
            durable: true,
        }],
        queues: vec![
            QueueSpec {
                name: Some("q0".into()),
                durable: true,
            },
            QueueSpec {
                name: None,
                durable: false,
            },
        ],
        bindings: vec![
            BindingSpec {
                queue: 0,
                exchange: 0,
                key: String::new(),
            },
            BindingSpec {
                queue: 1,
                exchange: 0,
                key: String::new(),
            },
        ],
        consumers,
        publishers: vec![PublisherSpec {
            target: Target::Exchange {
                exchange: 0,
                key: String::new(),
            },
            messages: 20,
            start: Duration::from_millis(100),
            interval: Duration::from_millis(200),
            mandatory: false,
            persistent: true,
        }],
    }
}

/// A channel-level error (406) on the channel that carries the only consumer of
/// an auto-delete server-named queue: the broker deletes the queue with its last
/// consumer; the reopened channel's replay sends `basic.consume` for the old name
/// and fails with 404, again and again, so the channel never gets Ready (only a
/// connection loss, whose replay re-declares the queue, ends the loop).
///
/// Where: `core/src/supervisor/topology.rs`, `start_replay` (only channel 0 replays
/// entities) and `on_topology_done` (a failed `Step::Consume` just fails the
/// channel). A fix: when a consumer's server-named, auto-delete queue may have gone
/// with its channel (its consumers all lived there), replay the queue's entity and
/// its bindings on that channel before the consume, as `on_consumer_cancelled`
/// does.
#[test]
fn a_channel_error_under_the_last_consumer_of_a_server_named_queue_recovers() {
    let scenario = Scenario {
        seed: 5,
        settings: Settings {
            connections: 1,
            channels: 2,
            hosts: 1,
            ..Settings::default()
        },
        workload: two_queues(1),
        // c0 lives on channel 0, c1 on channel 1 (AMQP channel 2).
        plan: FaultPlan::new().at(
            Duration::from_secs(1),
            Fault::CloseChannel {
                pick: 0,
                channel: 1,
                code: 406,
            },
        ),
    };
    let outcome = Simulation::new(&scenario).run();
    outcome.check_liveness().unwrap();
    outcome.check_topology_restored().unwrap();
}

/// A channel-level error on channel 0 of a connection that owns a server-named
/// queue: channel 0 replays every entity, so the queue is declared again with
/// `""`, under a new name, although the old queue still exists (its connection
/// is alive). Bindings follow the new name; the consumer on another channel stays
/// on the old queue, and the old binding keeps routing to it: the registry and the
/// broker disagree, and messages for the queue's current name reach nobody.
///
/// Where: `core/src/supervisor/topology.rs`, `start_replay` with
/// `Registry::replay_plan` (`core/src/topology.rs`): a channel-only reopen replays
/// server-named queues as if the connection were new. A fix: on a channel-only
/// reopen, skip entities that live as long as the connection (exclusive and
/// server-named queues whose consumers are not on that channel), or re-subscribe
/// every consumer of a renamed queue.
#[test]
fn a_channel_0_reopen_keeps_a_live_server_named_queue() {
    let scenario = Scenario {
        seed: 5,
        settings: Settings {
            connections: 1,
            channels: 2,
            hosts: 1,
            ..Settings::default()
        },
        workload: two_queues(1),
        plan: FaultPlan::new().at(
            Duration::from_secs(1),
            Fault::CloseChannel {
                pick: 0,
                channel: 0,
                code: 406,
            },
        ),
    };
    let outcome = Simulation::new(&scenario).run();
    outcome.check_topology_restored().unwrap();
}

/// Two consumers on one server-named queue, and the broker deletes the queue:
/// each consumer gets `basic.cancel`, and each cancel makes core re-declare the
/// queue with `""`: two new queues, the first consumer re-subscribed to the first,
/// the second (and the registry's name) to the second. The same happens when the
/// broker cancels one of the two consumers without deleting the queue.
///
/// Where: `core/src/supervisor/topology.rs`, `on_consumer_cancelled`: it re-declares
/// a server-named queue once per cancelled consumer, and re-subscribes only the
/// consumer that was cancelled. A fix: re-declare once per queue instance and move
/// every consumer of the queue handle to the new name.
#[test]
fn a_deleted_server_named_queue_with_two_consumers_comes_back_as_one() {
    let scenario = Scenario {
        seed: 5,
        settings: Settings {
            connections: 1,
            channels: 1,
            hosts: 1,
            ..Settings::default()
        },
        workload: two_queues(2),
        plan: FaultPlan::new().at(Duration::from_secs(1), Fault::DeleteQueue { pick: 0 }),
    };
    let outcome = Simulation::new(&scenario).run();
    outcome.check_topology_restored().unwrap();
}

/// The random scenarios that found these bugs: the property-test shape without
/// `avoid_known_core_bugs`. Seeds 4, 92, 97, 105, 163, 171, 181, 185, 213, 238 and
/// 242 of this shape fail (Invariant 7).
#[test]
fn the_seeds_that_found_them_pass() {
    let shape = Shape {
        avoid_known_core_bugs: false,
        ..Shape::small()
    };
    for seed in [4, 92, 97, 105, 163, 171, 181, 185, 213, 238, 242] {
        let outcome = Simulation::new(&Scenario::from_seed(seed, &shape)).run();
        outcome.check_all().unwrap();
    }
}
