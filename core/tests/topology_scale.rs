//! Topology requests cost time linear in the registry's size, not quadratic:
//! an application with thousands of bound queues is not stalled by its own
//! bookkeeping (every publish and delivery of the client waits for it).
mod common;

use std::time::{Duration, Instant};

use amqp_rebound_core::{
    ConnectionId, ExchangeDecl, ExchangeKind, FieldTable, QueueDecl, TopologyOp, TransportError,
};
use common::ready_world;

const N: usize = 2_000;

/// Declares `N` durable queues, each bound by its handle to one exchange of
/// `kind` with `key(k)`, and lets the world take them; fails if that took 20 s
/// of the machine's time or more.
fn bind_queues_by_handle(kind: ExchangeKind, key: impl Fn(usize) -> String) -> common::World {
    let mut w = ready_world(1, 1);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", kind)))
        .unwrap();
    #[allow(clippy::disallowed_methods)] // the test measures the machine's time
    let started = Instant::now();
    for k in 0..N {
        let (_, h) = w
            .app(|s, now| s.declare_queue(now, QueueDecl::durable(format!("q{k}"))))
            .unwrap();
        let key = key(k);
        w.app(|s, now| s.bind_queue(now, h.into(), "x", &key, FieldTable::default()))
            .unwrap();
    }
    w.run_for(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "BUG: declaring {N} bound queues took {took:?} of CPU"
    );
    w
}

fn binds(w: &common::World) -> usize {
    w.topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::BindQueue { .. }))
        .count()
}

/// 2,000 durable queues, each bound to one exchange by its handle (as
/// `client.bind_queue(&queue, ..)` does), then a reconnect: declaring them
/// takes well under a second of the supervisor's time (about 8 s in a release
/// build, minutes in a debug one, when each bind resolved every other
/// binding's queue handle by a scan of the registry), and the replay declares
/// each entity once.
#[test]
fn binding_thousands_of_queues_by_handle_stays_linear() {
    let mut w = bind_queues_by_handle(ExchangeKind::Topic, |k| format!("k{k}"));
    w.topology_log.clear();
    w.kill(ConnectionId(0), TransportError::Io("reset".into()));
    w.run_until_ready(Duration::from_secs(600)).unwrap();
    assert_eq!(binds(&w), N);
    assert_eq!(w.topology_log.len(), 1 + 2 * N);
}

/// The same with every queue bound with one key (a fanout exchange, as a
/// broadcast to many queues binds them): the bindings match on exchange, key
/// and arguments, and only the queue tells them apart.
#[test]
fn binding_thousands_of_queues_by_handle_with_one_key_stays_linear() {
    let w = bind_queues_by_handle(ExchangeKind::Fanout, |_| String::new());
    assert_eq!(binds(&w), N);
}
