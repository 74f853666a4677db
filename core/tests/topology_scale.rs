//! Topology requests cost time linear in the registry's size, not quadratic:
//! an application with thousands of bound queues is not stalled by its own
//! bookkeeping (every publish and delivery of the client waits for it).
mod common;

use std::time::{Duration, Instant};

use amqp_rebound_core::{
    ConnectionId, ExchangeDecl, ExchangeKind, FieldTable, QueueDecl, TopologyOp, TransportError,
};
use common::ready_world;

/// 2,000 durable queues, each bound to one exchange by its handle (as
/// `client.bind_queue(&queue, ..)` does), then a reconnect: declaring them
/// takes well under a second of the supervisor's time (about 8 s in a release
/// build, minutes in a debug one, when each bind resolved every other
/// binding's queue handle by a scan of the registry), and the replay declares
/// each entity once.
#[test]
fn binding_thousands_of_queues_by_handle_stays_linear() {
    const N: usize = 2_000;
    let mut w = ready_world(1, 1);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Topic)))
        .unwrap();
    #[allow(clippy::disallowed_methods)] // the test measures the machine's time
    let started = Instant::now();
    for k in 0..N {
        let (_, h) = w
            .app(|s, now| s.declare_queue(now, QueueDecl::durable(format!("q{k}"))))
            .unwrap();
        w.app(|s, now| s.bind_queue(now, h.into(), "x", &format!("k{k}"), FieldTable::default()))
            .unwrap();
    }
    w.run_for(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "BUG: declaring {N} bound queues took {took:?} of CPU"
    );
    w.topology_log.clear();
    w.kill(ConnectionId(0), TransportError::Io("reset".into()));
    w.run_until_ready(Duration::from_secs(600)).unwrap();
    let binds = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::BindQueue { .. }))
        .count();
    assert_eq!(binds, N);
    assert_eq!(w.topology_log.len(), 1 + 2 * N);
}

/// The same with every queue bound with one key (a fanout exchange, as a
/// broadcast to many queues binds them): the bindings match on exchange, key
/// and arguments, and only the queue tells them apart.
#[test]
fn binding_thousands_of_queues_by_handle_with_one_key_stays_linear() {
    const N: usize = 2_000;
    let mut w = ready_world(1, 1);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Fanout)))
        .unwrap();
    #[allow(clippy::disallowed_methods)] // the test measures the machine's time
    let started = Instant::now();
    for k in 0..N {
        let (_, h) = w
            .app(|s, now| s.declare_queue(now, QueueDecl::durable(format!("q{k}"))))
            .unwrap();
        w.app(|s, now| s.bind_queue(now, h.into(), "x", "", FieldTable::default()))
            .unwrap();
    }
    w.run_for(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "BUG: declaring {N} queues bound with one key took {took:?} of CPU"
    );
    let binds = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::BindQueue { .. }))
        .count();
    assert_eq!(binds, N);
}
