//! The real Driver + Client over an in-memory transport, run on
//! `futures::executor::LocalPool` with a manual clock: no tokio anywhere, which is
//! the proof that the driver is runtime-agnostic.

mod support;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use amqp_rebound_core::{
    AckError, Client, Config, ConfigError, Confirmation, ConnectError, ConsumeOptions, Event,
    Properties, PublishError, PublishFuture, PublishOptions, QueueDecl, TransportError,
};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use futures::{FutureExt, StreamExt};
use support::{ManualClock, MemoryTransport, drive};

const URL: &str = "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f";

fn setup(connections: usize, channels: usize) -> (LocalPool, ManualClock, MemoryTransport, Client) {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    let (client, driver) = Client::builder()
        .hosts([URL])
        .pool(connections, channels)
        .seed(1)
        .build(transport.clone(), clock.clone())
        .expect("valid config");
    pool.spawner().spawn_local(driver).expect("spawn");
    (pool, clock, transport, client)
}

type Results = Rc<RefCell<Vec<(u32, Result<Confirmation, PublishError>)>>>;

fn spawn_publishes(pool: &LocalPool, client: &Client, ids: std::ops::Range<u32>) -> Results {
    let results: Results = Rc::default();
    for id in ids {
        let future = client.publish("", "q", id.to_string().into_bytes(), Properties::default());
        collect(pool, &results, id, future);
    }
    results
}

/// Spawns `future`, its result to go into `results` under `id`.
fn collect(pool: &LocalPool, results: &Results, id: u32, future: PublishFuture) {
    let results = Rc::clone(results);
    pool.spawner()
        .spawn_local(async move {
            let result = future.await;
            results.borrow_mut().push((id, result));
        })
        .expect("spawn");
}

/// Spawns `client.close()` and drives until it returned (true) or `limit` of
/// virtual time passed.
fn close_within(
    pool: &mut LocalPool,
    clock: &ManualClock,
    client: &Client,
    limit: Duration,
) -> bool {
    let closed = Rc::new(RefCell::new(false));
    {
        let client = client.clone();
        let closed = Rc::clone(&closed);
        pool.spawner()
            .spawn_local(async move {
                client.close().await;
                *closed.borrow_mut() = true;
            })
            .unwrap();
    }
    drive(pool, clock, limit, || *closed.borrow())
}

/// Spawns `future` on `pool`; its output lands in the returned cell when it ends.
fn spawn_output<T: 'static>(
    pool: &LocalPool,
    future: impl std::future::Future<Output = T> + 'static,
) -> Rc<RefCell<Option<T>>> {
    let out = Rc::new(RefCell::new(None));
    let cell = Rc::clone(&out);
    pool.spawner()
        .spawn_local(async move {
            *cell.borrow_mut() = Some(future.await);
        })
        .expect("spawn");
    out
}

fn all_confirmed(results: &Results) -> bool {
    results
        .borrow()
        .iter()
        .all(|(_, r)| *r == Ok(Confirmation::Confirmed))
}

#[test]
fn publishes_are_confirmed_on_a_non_tokio_executor() {
    let (mut pool, clock, transport, client) = setup(1, 2);
    let results = spawn_publishes(&pool, &client, 0..100);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 100));
    assert!(all_confirmed(&results));
    assert_eq!(transport.broker().received.len(), 100);
    assert_eq!(client.stats().confirmed, 100);
    assert!(client.state().is_ready());
}

#[test]
fn a_publish_is_handed_over_by_the_call_in_call_order_even_if_its_future_is_dropped() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    // futures created in one order and polled in another, one never polled
    let first = client.publish("", "q", "first", Properties::default());
    let dropped = client.publish("", "q", "dropped", Properties::default());
    let third = client.publish("", "q", "third", Properties::default());
    drop(dropped);
    let results: Results = Rc::default();
    for (id, future) in [(3, third), (1, first)] {
        collect(&pool, &results, id, future);
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 2));
    assert_eq!(
        transport.broker().received,
        vec!["first", "dropped", "third"],
        "published in call order, the dropped one too"
    );
    assert!(all_confirmed(&results));
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .stats()
        .confirmed
        == 3));
}

#[test]
fn a_publish_on_an_idle_client_reaches_the_transport_within_the_call() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    // the driver does not run between the call and the check
    let future = client.publish("", "q", "now", Properties::default());
    assert_eq!(
        transport.broker().received,
        vec!["now"],
        "written by the call, on the caller's thread"
    );
    let results: Results = Rc::default();
    collect(&pool, &results, 1, future);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || results
        .borrow()
        .len()
        == 1));
    assert!(all_confirmed(&results));
}

/// Publishers on several threads and the driver on another: whichever of them
/// holds the client's state, each publisher's messages go out in its call order
/// and every one is confirmed.
#[test]
fn publishers_on_many_threads_keep_their_own_order() {
    const THREADS: usize = 4;
    const EACH: usize = 500;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let body = std::thread::spawn(move || {
        let clock = ManualClock::new();
        let transport = MemoryTransport::default();
        let (client, driver) = Client::builder()
            .hosts([URL])
            .confirm_window(64)
            .build(transport.clone(), clock)
            .expect("valid config");
        let driving = std::thread::spawn(move || futures::executor::block_on(driver));
        let publishers: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = client.clone();
                std::thread::spawn(move || {
                    let futures: Vec<PublishFuture> = (0..EACH)
                        .map(|i| client.publish("", "q", format!("{t}-{i}"), Properties::default()))
                        .collect();
                    futures::executor::block_on(futures::future::join_all(futures))
                })
            })
            .collect();
        for publisher in publishers {
            let results = publisher.join().expect("publisher");
            assert!(results.iter().all(|r| *r == Ok(Confirmation::Confirmed)));
        }
        futures::executor::block_on(client.close());
        driving.join().expect("driver");
        let received = transport.broker().received.clone();
        assert_eq!(received.len(), THREADS * EACH, "each message once");
        for t in 0..THREADS {
            let own: Vec<usize> = received
                .iter()
                .filter_map(|m| m.strip_prefix(&format!("{t}-")))
                .map(|i| i.parse().expect("a number"))
                .collect();
            assert_eq!(
                own,
                (0..EACH).collect::<Vec<_>>(),
                "thread {t} in call order"
            );
        }
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => body.join().expect("test body"),
        Err(_) if body.is_finished() => std::panic::resume_unwind(body.join().unwrap_err()),
        Err(_) => panic!("publishers or driver hung for 60 s"),
    }
}

#[test]
fn loss_mid_stream_republishes_unconfirmed_in_order() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    transport.broker().hold_confirms = true;
    let results = spawn_publishes(&pool, &client, 0..5);
    pool.run_until_stalled();
    assert_eq!(transport.broker().received, vec!["0", "1", "2", "3", "4"]);
    transport.kill_all();
    transport.broker().hold_confirms = false;
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 5));
    assert_eq!(
        transport.broker().received,
        vec!["0", "1", "2", "3", "4", "0", "1", "2", "3", "4"],
        "re-published after recovery, in the original order"
    );
    assert!(all_confirmed(&results));
    let stats = client.stats();
    assert_eq!((stats.republished, stats.recoveries), (5, 1));
}

#[test]
fn a_channel_error_leaves_the_other_channels_working() {
    let (mut pool, clock, transport, client) = setup(1, 2);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    transport.close_channel(0, 406);
    pool.run_until_stalled();
    assert_eq!(
        client.state().ready_channels,
        1,
        "only that channel is down"
    );
    assert_eq!(transport.open_connections(), 1, "the connection stays");
    let results = spawn_publishes(&pool, &client, 0..10);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 10));
    assert!(results.borrow().iter().all(|(_, r)| r.is_ok()));
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
    assert_eq!(transport.broker().dials, 1);
}

#[test]
fn blocked_connection_holds_publishes_until_unblocked() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    let mut events = client.watch();
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    transport.block_all(true);
    pool.run_until_stalled();
    let results = spawn_publishes(&pool, &client, 0..3);
    pool.run_until_stalled();
    assert!(
        transport.broker().received.is_empty(),
        "nothing goes out while blocked"
    );
    transport.block_all(false);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 3));
    let mut seen = Vec::new();
    while let Some(Some(e)) = futures::FutureExt::now_or_never(events.next()) {
        seen.push(e);
    }
    assert!(seen.iter().any(|e| matches!(e, Event::Blocked { .. })));
    assert!(seen.iter().any(|e| matches!(e, Event::Unblocked { .. })));
}

#[test]
fn connect_failures_follow_the_backoff_then_recover() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    transport.broker().refuse = Some(TransportError::Io("connection refused".into()));
    let start = clock_now(&clock);
    drive(&mut pool, &clock, Duration::from_secs(10), || false);
    let dials = transport.broker().dials;
    // 50 ms initial doubling to a 10 s cap with full jitter: a handful in 10 s,
    // never a hot loop
    assert!((3..=40).contains(&dials), "{dials} dials in 10 s");
    transport.broker().refuse = None;
    assert!(drive(&mut pool, &clock, Duration::from_secs(11), || client
        .state()
        .is_ready()));
    assert!(clock_now(&clock) > start);
}

fn clock_now(clock: &ManualClock) -> std::time::Instant {
    use amqp_rebound_core::Timer;
    clock.now()
}

#[test]
fn close_while_reconnecting_stops_dialling_and_resolves_everything() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    transport.broker().refuse = Some(TransportError::Io("refused".into()));
    transport.kill_all();
    let results = spawn_publishes(&pool, &client, 0..3);
    drive(&mut pool, &clock, Duration::from_millis(500), || false);
    // the close drains (still dialling) until its timeout, then gives up
    let close_timeout = Config::new(Vec::new()).close_timeout;
    assert!(close_within(
        &mut pool,
        &clock,
        &client,
        close_timeout + Duration::from_millis(100)
    ));
    let dials = transport.broker().dials;
    transport.broker().refuse = None;
    drive(&mut pool, &clock, Duration::from_secs(60), || false);
    assert_eq!(transport.broker().dials, dials, "no dial after close");
    assert_eq!(results.borrow().len(), 3, "every publish resolved");
    assert!(
        results
            .borrow()
            .iter()
            .all(|(_, r)| *r == Err(PublishError::Closed))
    );
    assert!(client.is_closed());
}

/// The client's state outlives its driver (every handle shares it): what the
/// driver ends must end anyway, a watch stream included.
#[test]
fn watch_streams_end_when_the_client_closes_while_handles_live() {
    let (mut pool, clock, _transport, client) = setup(1, 1);
    let mut events = client.watch();
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    assert!(close_within(
        &mut pool,
        &clock,
        &client,
        Duration::from_secs(10)
    ));
    // what was sent before the end, then the end
    let mut seen = 0;
    loop {
        match events.next().now_or_never() {
            Some(Some(_)) => seen += 1,
            Some(None) => break,
            None => panic!("the watch stream is still open after close ({seen} events)"),
        }
        assert!(seen < 10_000, "the watch stream does not end");
    }
    drop(client);
}

#[test]
fn publish_after_close_is_a_closed_error() {
    let (mut pool, clock, _transport, client) = setup(1, 1);
    let out = Rc::new(RefCell::new(None));
    {
        let client = client.clone();
        let out = Rc::clone(&out);
        pool.spawner()
            .spawn_local(async move {
                client.close().await;
                let r = client.publish("", "q", "late", Properties::default()).await;
                *out.borrow_mut() = Some(r);
            })
            .unwrap();
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(10), || out
        .borrow()
        .is_some()));
    assert_eq!(out.borrow().clone(), Some(Err(PublishError::Closed)));
}

#[test]
fn dropping_the_driver_resolves_pending_publishes() {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().refuse = Some(TransportError::Io("refused".into()));
    let (client, driver) = Client::builder()
        .hosts([URL])
        .build(transport, clock)
        .unwrap();
    let mut inner_pool = pool;
    let results = spawn_publishes(&inner_pool, &client, 0..2);
    let handle = inner_pool
        .spawner()
        .spawn_local_with_handle(driver)
        .unwrap();
    inner_pool.run_until_stalled();
    drop(handle); // cancels (drops) the driver
    inner_pool.run_until_stalled();
    assert_eq!(results.borrow().len(), 2);
    assert!(
        results
            .borrow()
            .iter()
            .all(|(_, r)| *r == Err(PublishError::Closed))
    );
}

/// The publishes a dropped driver resolves `Closed` are counted as such by
/// `stats()`, which no longer shows them in the outbox or in flight: the
/// stats say what the futures said.
#[test]
fn stats_after_the_driver_is_dropped_agree_with_the_futures() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    transport.broker().hold_confirms = true;
    // kept out of the pool, whose tasks (the driver's among them) are dropped
    let futures: Vec<PublishFuture> = (0..5)
        .map(|i| client.publish("", "q", i.to_string(), Properties::default()))
        .collect();
    drive(&mut pool, &clock, Duration::from_millis(10), || false);
    assert_eq!(client.stats().in_flight, 5);
    drop(pool);
    let results: Vec<_> = futures
        .into_iter()
        .map(futures::executor::block_on)
        .collect();
    assert!(results.iter().all(|r| *r == Err(PublishError::Closed)));
    let stats = client.stats();
    assert_eq!(
        (stats.closed, stats.outbox_depth, stats.in_flight),
        (5, 0, 0),
        "{stats:?}"
    );
}

/// Dropping the driver (its task aborted, its runtime shut down) resolves every
/// caller still waiting, those of `flush()` and `connected()` included, with
/// `Closed`: here the only dial hangs, so none of them has an answer yet.
#[test]
fn dropping_the_driver_resolves_flush_and_connected_too() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().hang_dials = usize::MAX;
    let (client, driver) = Client::builder()
        .hosts([URL])
        .build(transport, clock)
        .unwrap();
    let results = spawn_publishes(&pool, &client, 0..1);
    let flushed = spawn_output(&pool, {
        let client = client.clone();
        async move { client.flush().await }
    });
    let connected = spawn_output(&pool, {
        let client = client.clone();
        async move { client.connected().await }
    });
    let handle = pool.spawner().spawn_local_with_handle(driver).unwrap();
    pool.run_until_stalled();
    assert!(flushed.borrow().is_none() && connected.borrow().is_none());
    drop(handle); // cancels (drops) the driver
    pool.run_until_stalled();
    assert_eq!(results.borrow().len(), 1);
    assert_eq!(flushed.borrow().clone(), Some(Err(PublishError::Closed)));
    assert!(
        matches!(*connected.borrow(), Some(Err(ConnectError::Closed))),
        "{:?}",
        connected.borrow()
    );
}

/// A close before first contact answers `connected()` with `Closed`, and from
/// the call on (while the close drains) the client says it is closed.
#[test]
fn close_before_first_contact_answers_connected_and_says_closed_at_once() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().hang_dials = usize::MAX;
    // the dial outlives the close, so only the close can answer `connected()`
    let close_timeout = Duration::from_secs(1);
    let (client, driver) = Client::builder()
        .hosts([URL])
        .connect_timeout(Duration::from_secs(60))
        .close_timeout(close_timeout)
        .build(transport, clock.clone())
        .unwrap();
    pool.spawner().spawn_local(driver).unwrap();
    // a message waits for a channel, so the close has something to drain
    let _results = spawn_publishes(&pool, &client, 0..1);
    let connected = spawn_output(&pool, {
        let client = client.clone();
        async move { client.connected().await }
    });
    drive(&mut pool, &clock, Duration::from_millis(100), || false);
    assert!(connected.borrow().is_none());
    assert!(!client.is_closed() && !client.state().closed);
    let closing = spawn_output(&pool, {
        let client = client.clone();
        async move { client.close().await }
    });
    pool.run_until_stalled();
    assert!(closing.borrow().is_none(), "the close drains first");
    assert!(client.is_closed(), "is_closed() once close() was called");
    assert!(
        client.state().closed,
        "state().closed once close() was called"
    );
    assert!(drive(
        &mut pool,
        &clock,
        close_timeout + Duration::from_secs(1),
        || closing.borrow().is_some() && connected.borrow().is_some()
    ));
    assert!(
        matches!(*connected.borrow(), Some(Err(ConnectError::Closed))),
        "{:?}",
        connected.borrow()
    );
}

/// Acks taken before `close()` reach the broker before the connection closes,
/// even when they are slow to write: the connection's close waits for its
/// channels' closes, which write what was queued on them first (else the broker
/// requeues deliveries the application acked).
#[test]
fn acks_taken_before_close_are_written_before_the_connection_closes() {
    let (mut pool, clock, transport, client) = setup(1, 2);
    let acked = Rc::new(RefCell::new(0));
    {
        let client = client.clone();
        let acked = Rc::clone(&acked);
        let transport = transport.clone();
        pool.spawner()
            .spawn_local(async move {
                client
                    .declare_queue(QueueDecl::durable("jobs"))
                    .await
                    .unwrap();
                let mut consumer = client
                    .consume("jobs", ConsumeOptions::default())
                    .await
                    .unwrap();
                for n in 0..3 {
                    client
                        .publish("", "jobs", n.to_string(), Properties::default())
                        .await
                        .unwrap();
                }
                transport.broker().hold_acks = true;
                for _ in 0..3 {
                    let received = consumer.next().await.unwrap().unwrap();
                    received.ack().await.unwrap();
                    *acked.borrow_mut() += 1;
                }
            })
            .unwrap();
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || *acked
        .borrow()
        == 3));
    let closing = spawn_output(&pool, {
        let client = client.clone();
        async move { client.close().await }
    });
    drive(&mut pool, &clock, Duration::from_secs(1), || false);
    assert!(
        !transport
            .broker()
            .log
            .contains(&"connection close".to_string()),
        "the connection closed with acks unwritten: {:?}",
        transport.broker().log
    );
    transport.release_acks();
    assert!(drive(&mut pool, &clock, Duration::from_secs(10), || {
        closing.borrow().is_some()
    }));
    let log = transport.broker().log.clone();
    let close = log.iter().position(|e| e == "connection close");
    let acks: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].starts_with("ack "))
        .collect();
    assert_eq!(acks.len(), 3, "{log:?}");
    assert!(
        close.is_some_and(|close| acks.iter().all(|&a| a < close)),
        "{log:?}"
    );
}

/// Messages the broker received, each once (re-sends counted once).
fn unique_received(transport: &MemoryTransport) -> std::collections::BTreeSet<String> {
    transport.broker().received.iter().cloned().collect()
}

#[test]
fn close_drains_every_accepted_publish_across_a_recovery() {
    let (mut pool, clock, transport, client) = setup(1, 2);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    // the broker goes away with messages in flight, and more are accepted
    // while it is gone; every future is dropped
    transport.broker().hold_confirms = true;
    for i in 0..50u32 {
        drop(client.publish("", "q", i.to_string().into_bytes(), Properties::default()));
    }
    pool.run_until_stalled();
    transport.broker().refuse = Some(TransportError::Io("refused".into()));
    transport.kill_all();
    for i in 50..500u32 {
        drop(client.publish("", "q", i.to_string().into_bytes(), Properties::default()));
    }
    let closed = Rc::new(RefCell::new(false));
    {
        let (client, closed) = (client.clone(), Rc::clone(&closed));
        pool.spawner()
            .spawn_local(async move {
                let summary = client.close().await;
                assert_eq!(summary.unresolved, 0, "every accepted message confirmed");
                *closed.borrow_mut() = true;
            })
            .unwrap();
    }
    drive(&mut pool, &clock, Duration::from_millis(500), || false);
    assert!(!*closed.borrow(), "close returned with messages owed");
    assert!(
        client
            .publish("", "q", b"late".to_vec(), Properties::default())
            .now_or_never()
            .is_some_and(|r| r == Err(PublishError::Closed))
            || client.is_closed(),
        "nothing new is accepted while draining"
    );
    {
        let mut broker = transport.broker();
        broker.refuse = None;
        broker.hold_confirms = false;
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || *closed
        .borrow()));
    let received = unique_received(&transport);
    let missing: Vec<u32> = (0..500u32)
        .filter(|i| !received.contains(&i.to_string()))
        .collect();
    assert!(missing.is_empty(), "never published: {missing:?}");
    assert!(!received.contains("late"));
    assert_eq!(client.stats().confirmed, 500);
    assert_eq!(
        transport.open_connections(),
        0,
        "the connection closed cleanly"
    );
}

#[test]
fn close_gives_up_at_its_timeout_and_close_discarding_at_once() {
    for discard in [false, true] {
        let pool = LocalPool::new();
        let clock = ManualClock::new();
        let transport = MemoryTransport::default();
        transport.broker().refuse = Some(TransportError::Io("refused".into()));
        let (client, driver) = Client::builder()
            .hosts([URL])
            .close_timeout(Duration::from_secs(2))
            .build(transport.clone(), clock.clone())
            .unwrap();
        let mut pool = pool;
        pool.spawner().spawn_local(driver).unwrap();
        let results = spawn_publishes(&pool, &client, 0..10);
        let start = clock_now(&clock);
        let closed = Rc::new(RefCell::new(None));
        {
            let (client, closed, clock) = (client.clone(), Rc::clone(&closed), clock.clone());
            pool.spawner()
                .spawn_local(async move {
                    let summary = if discard {
                        client.close_discarding().await
                    } else {
                        client.close().await
                    };
                    *closed.borrow_mut() = Some((clock_now(&clock), summary.unresolved));
                })
                .unwrap();
        }
        assert!(drive(&mut pool, &clock, Duration::from_secs(10), || closed
            .borrow()
            .is_some()));
        let (at, unresolved) = closed.borrow().unwrap();
        assert_eq!(unresolved, 10, "the close says what it gave up on");
        let took = at - start;
        if discard {
            assert!(took < Duration::from_millis(10), "discarding took {took:?}");
        } else {
            assert_eq!(
                took,
                Duration::from_secs(2),
                "drained until the close timeout"
            );
        }
        assert_eq!(results.borrow().len(), 10);
        assert!(
            results
                .borrow()
                .iter()
                .all(|(_, r)| *r == Err(PublishError::Closed))
        );
    }
}

/// A message that timed out in flight is resolved: the close owes it nothing
/// and does not hold the connection open for its confirm until the close
/// timeout, whether it timed out before the close or while the close waited
/// for it.
#[test]
fn close_does_not_wait_for_the_confirm_of_a_message_that_already_timed_out() {
    for (before_the_close, discard) in [(true, false), (false, false), (false, true)] {
        let (mut pool, clock, transport, client) = setup(1, 1);
        assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
            .state()
            .is_ready()));
        transport.broker().hold_confirms = true;
        let results: Results = Rc::default();
        let short = client.publish_message(
            amqp_rebound_core::Message::new("", "q", b"short".to_vec()),
            PublishOptions::default().timeout(Duration::from_millis(100)),
        );
        collect(&pool, &results, 0, short);
        if before_the_close {
            drive(&mut pool, &clock, Duration::from_secs(1), || {
                results.borrow().len() == 1
            });
        } else {
            pool.run_until_stalled();
        }
        let start = clock_now(&clock);
        let closed = spawn_output(&pool, {
            let client = client.clone();
            async move {
                if discard {
                    client.close_discarding().await
                } else {
                    client.close().await
                }
            }
        });
        assert!(drive(&mut pool, &clock, Duration::from_secs(10), || closed
            .borrow()
            .is_some()));
        let took = clock_now(&clock) - start;
        assert_eq!(*results.borrow(), vec![(0, Err(PublishError::TimedOut))]);
        assert_eq!(closed.borrow().unwrap().unresolved, 0);
        assert!(
            took <= Duration::from_millis(100),
            "close (discarding: {discard}) took {took:?} (timed out before the close: \
             {before_the_close}): it waited out its 5 s timeout for a confirm nobody is owed"
        );
    }
}

#[test]
fn close_discarding_fails_the_unsent_at_once_and_takes_the_confirms_of_those_in_flight() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    let (client, driver) = Client::builder()
        .hosts([URL])
        .pool(1, 1)
        .confirm_window(10)
        .close_timeout(Duration::from_secs(5))
        .build(transport.clone(), clock.clone())
        .unwrap();
    pool.spawner().spawn_local(driver).unwrap();
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    // 10 written and awaiting their confirms, 20 waiting for room in the window
    transport.broker().hold_confirms = true;
    let results = spawn_publishes(&pool, &client, 0..30);
    pool.run_until_stalled();
    assert_eq!(transport.broker().received.len(), 10);
    let start = clock_now(&clock);
    let closed = spawn_output(&pool, {
        let (client, clock) = (client.clone(), clock.clone());
        async move {
            let summary = client.close_discarding().await;
            (clock_now(&clock), summary.unresolved)
        }
    });
    pool.run_until_stalled();
    assert_eq!(
        results.borrow().len(),
        20,
        "the unsent resolve at the call, the ones in flight wait for their confirms"
    );
    assert!(
        results
            .borrow()
            .iter()
            .all(|(id, r)| *id >= 10 && *r == Err(PublishError::Closed))
    );
    transport.release_confirms();
    assert!(drive(&mut pool, &clock, Duration::from_secs(10), || closed
        .borrow()
        .is_some()));
    let (at, unresolved) = closed.borrow().unwrap();
    assert!(
        at - start < Duration::from_millis(100),
        "the close waited {:?} although every confirm came",
        at - start
    );
    assert_eq!(unresolved, 20, "only the unsent are given up on");
    let confirmed: Vec<u32> = results
        .borrow()
        .iter()
        .filter(|(_, r)| *r == Ok(Confirmation::Confirmed))
        .map(|&(id, _)| id)
        .collect();
    assert_eq!(confirmed, (0..10).collect::<Vec<_>>());
    assert_eq!(
        transport.broker().received.len(),
        10,
        "nothing unsent went out"
    );
    assert_eq!(transport.open_connections(), 0, "closed cleanly");
}

#[test]
fn dropping_the_last_handle_drains_before_the_driver_ends() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().refuse = Some(TransportError::Io("refused".into()));
    let (client, driver) = Client::builder()
        .hosts([URL])
        .build(transport.clone(), clock.clone())
        .unwrap();
    let ended = Rc::new(RefCell::new(false));
    {
        let ended = Rc::clone(&ended);
        pool.spawner()
            .spawn_local(async move {
                driver.await;
                *ended.borrow_mut() = true;
            })
            .unwrap();
    }
    for i in 0..100u32 {
        drop(client.publish("", "q", i.to_string().into_bytes(), Properties::default()));
    }
    drop(client);
    drive(&mut pool, &clock, Duration::from_millis(300), || false);
    assert!(!*ended.borrow(), "the driver ended with messages owed");
    transport.broker().refuse = None;
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || *ended
        .borrow()));
    assert_eq!(unique_received(&transport).len(), 100);
    assert_eq!(transport.open_connections(), 0);
}

#[test]
fn flush_waits_for_what_was_accepted_before_it_and_counts_what_was_not_confirmed() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    let flushed = |pool: &LocalPool| {
        let client = client.clone();
        spawn_output(pool, async move { client.flush().await })
    };
    // nothing accepted: at once
    let none = flushed(&pool);
    pool.run_until_stalled();
    assert_eq!(none.borrow().clone().unwrap().unwrap().not_confirmed, 0);

    transport.broker().hold_confirms = true;
    let results = spawn_publishes(&pool, &client, 0..10);
    let short = client.publish_message(
        amqp_rebound_core::Message::new("", "q", b"short".to_vec()),
        PublishOptions::default().timeout(Duration::from_millis(100)),
    );
    collect(&pool, &results, 10, short);
    let first = flushed(&pool);
    // published after the flush: not waited for
    let later = spawn_publishes(&pool, &client, 100..101);
    drive(&mut pool, &clock, Duration::from_millis(500), || false);
    assert!(first.borrow().is_none(), "flushed before the confirms");
    transport.release_confirms();
    transport.broker().hold_confirms = true;
    pool.run_until_stalled();
    let report = first.borrow().clone().unwrap().unwrap();
    assert_eq!(report.not_confirmed, 1, "the one that timed out");
    assert_eq!(results.borrow().len(), 11);

    // failures that resolved before the call count too: a flush after
    // fire-and-forget publishes that all failed does not say "all confirmed"
    for i in 0..3u32 {
        drop(client.publish_message(
            amqp_rebound_core::Message::new("", "q", i.to_string().into_bytes()),
            PublishOptions::default().timeout(Duration::from_millis(100)),
        ));
    }
    drive(&mut pool, &clock, Duration::from_millis(500), || false);
    assert_eq!(client.stats().timed_out, 4);
    transport.release_confirms();
    pool.run_until_stalled();
    assert_eq!(later.borrow().len(), 1, "the later publish resolved");
    let second = flushed(&pool);
    pool.run_until_stalled();
    let report = second.borrow().clone().unwrap().unwrap();
    assert_eq!(
        report.not_confirmed, 4,
        "every message accepted before it: the earlier one and the three dropped"
    );
    // the difference between two flushes counts the messages between them
    let results = spawn_publishes(&pool, &client, 200..205);
    pool.run_until_stalled();
    let third = flushed(&pool);
    pool.run_until_stalled();
    assert!(all_confirmed(&results));
    assert_eq!(third.borrow().clone().unwrap().unwrap().not_confirmed, 4);
}

#[test]
fn first_contact_reports_the_cause_after_one_round_and_timeouts_carry_it() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    transport.broker().refuse = Some(TransportError::Auth(
        "ACCESS_REFUSED - Login was refused".into(),
    ));
    let contact = {
        let client = client.clone();
        spawn_output(&pool, async move { client.connected().await })
    };
    let start = clock_now(&clock);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || contact
        .borrow()
        .is_some()));
    assert!(
        clock_now(&clock) - start < Duration::from_millis(100),
        "one round, no wait"
    );
    let got = contact.borrow().clone().unwrap();
    assert!(
        matches!(
            &got,
            Err(amqp_rebound_core::ConnectError::Transport(TransportError::Auth(text)))
                if text.contains("ACCESS_REFUSED")
        ),
        "{got:?}"
    );
    let late = client.publish_message(
        amqp_rebound_core::Message::new("", "q", b"x".to_vec()),
        PublishOptions::default().timeout(Duration::from_secs(3)),
    );
    let results: Results = Rc::default();
    collect(&pool, &results, 0, late);
    drive(&mut pool, &clock, Duration::from_secs(4), || {
        !results.borrow().is_empty()
    });
    assert!(
        matches!(
            &results.borrow()[0].1,
            Err(PublishError::Unreachable(TransportError::Auth(_)))
        ),
        "{:?}",
        results.borrow()
    );
    // once the broker lets us in, connected() is Ok and stays so
    transport.broker().refuse = None;
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
    let again = {
        let client = client.clone();
        spawn_output(&pool, async move { client.connected().await })
    };
    pool.run_until_stalled();
    assert_eq!(again.borrow().clone(), Some(Ok(())));
}

#[test]
fn a_pool_wider_than_the_brokers_channel_max_is_refused_at_first_contact() {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().channel_max = Some(3);
    let (client, driver) = Client::builder()
        .hosts([URL])
        .pool(1, 4)
        .build(transport.clone(), clock.clone())
        .unwrap();
    let mut pool = pool;
    pool.spawner().spawn_local(driver).unwrap();
    let contact = {
        let client = client.clone();
        spawn_output(&pool, async move { client.connected().await })
    };
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || contact
        .borrow()
        .is_some()));
    assert_eq!(
        contact.borrow().clone().unwrap(),
        Err(amqp_rebound_core::ConnectError::Transport(
            TransportError::ChannelLimit { wanted: 4, max: 3 }
        ))
    );
    // it keeps trying, at the backoff cap (refused), never opening a channel
    drive(&mut pool, &clock, Duration::from_secs(30), || false);
    let dials = transport.broker().dials;
    assert!((10..=40).contains(&dials), "{dials} dials in 30 s");
    assert_eq!(transport.broker().over_channel_max, 0);
    assert_eq!(transport.open_channels(), 0);
    assert_eq!(
        transport.open_connections(),
        0,
        "refused connections are closed"
    );
    // within the limit it works
    transport.broker().channel_max = Some(4);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
}

#[test]
fn builder_errors_are_typed_and_never_show_the_password() {
    let build = |b: amqp_rebound_core::ClientBuilder| {
        b.build(MemoryTransport::default(), ManualClock::new())
            .map(|_| ())
    };
    assert_eq!(build(Client::builder()), Err(ConfigError::EmptyHostList));
    assert_eq!(
        build(Client::builder().hosts([URL]).pool(0, 1)),
        Err(ConfigError::ZeroConnections)
    );
    assert_eq!(
        build(Client::builder().hosts([URL]).pool(1, 0)),
        Err(ConfigError::ZeroChannels)
    );
    assert_eq!(
        build(Client::builder().hosts([URL]).confirm_window(0)),
        Err(ConfigError::Zero("confirm window"))
    );
    let bad = build(Client::builder().hosts(["amqp://guest:s3cr3t-pw@:99999"])).unwrap_err();
    assert!(matches!(bad, ConfigError::InvalidUri { .. }));
    assert!(!format!("{bad} {bad:?}").contains("s3cr3t-pw"));
}

#[test]
fn consumers_receive_and_stale_acks_are_refused_after_recovery() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    let outcome = Rc::new(RefCell::new(Vec::new()));
    {
        let client = client.clone();
        let outcome = Rc::clone(&outcome);
        let transport = transport.clone();
        pool.spawner()
            .spawn_local(async move {
                let queue = client
                    .declare_queue(QueueDecl::durable("jobs"))
                    .await
                    .unwrap();
                assert_eq!(queue.name(), "jobs");
                let mut consumer = client
                    .consume(&queue, ConsumeOptions::default())
                    .await
                    .unwrap();
                client
                    .publish("", "jobs", "a", Properties::default())
                    .await
                    .unwrap();
                let first = consumer.next().await.unwrap().unwrap();
                first.ack().await.unwrap();
                outcome.borrow_mut().push(format!(
                    "acked {}",
                    String::from_utf8_lossy(first.payload())
                ));
                client
                    .publish("", "jobs", "b", Properties::default())
                    .await
                    .unwrap();
                let second = consumer.next().await.unwrap().unwrap();
                transport.kill_all();
                // wait until the consumer is back (it receives c after recovery)
                client
                    .publish("", "jobs", "c", Properties::default())
                    .await
                    .unwrap();
                let third = consumer.next().await.unwrap().unwrap();
                let stale = format!("{:?}", second.ack().await);
                outcome.borrow_mut().push(stale);
                let fresh = format!("{:?}", third.ack().await);
                outcome.borrow_mut().push(fresh);
                assert!(third.generation() > second.generation());
            })
            .unwrap();
    }
    assert!(drive(
        &mut pool,
        &clock,
        Duration::from_secs(10),
        || outcome.borrow().len() == 3
    ));
    assert_eq!(
        *outcome.borrow(),
        vec![
            "acked a".to_string(),
            format!("{:?}", Err::<(), _>(AckError::Stale)),
            "Ok(())".to_string()
        ]
    );
}

#[test]
fn per_publish_timeout_and_no_wait_backpressure() {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    transport.broker().refuse = Some(TransportError::Io("refused".into()));
    let (client, driver) = Client::builder()
        .hosts([URL])
        .outbox_capacity(1)
        .build(transport, clock.clone())
        .unwrap();
    let mut pool = pool;
    pool.spawner().spawn_local(driver).unwrap();
    let out = Rc::new(RefCell::new(Vec::new()));
    for (n, options) in [
        PublishOptions::default().timeout(Duration::from_secs(2)),
        PublishOptions::default().no_wait(),
    ]
    .into_iter()
    .enumerate()
    {
        let client = client.clone();
        let out = Rc::clone(&out);
        pool.spawner()
            .spawn_local(async move {
                let message = amqp_rebound_core::Message::new("", "q", format!("{n}"));
                let r = client.publish_message(message, options).await;
                out.borrow_mut().push((n, r));
            })
            .unwrap();
        pool.run_until_stalled();
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(3), || out
        .borrow()
        .len()
        == 2));
    let out = out.borrow();
    assert!(out.contains(&(1, Err(PublishError::Backpressure { capacity: 1 }))));
    // never connected: the timeout says why
    assert!(out.contains(&(
        0,
        Err(PublishError::Unreachable(TransportError::Io(
            "refused".into()
        )))
    )));
}

/// A tracing writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_password_never_appears_in_tracing_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let (mut pool, clock, transport, client) = setup(1, 2);
        transport.broker().refuse = Some(TransportError::Auth("ACCESS_REFUSED".into()));
        drive(&mut pool, &clock, Duration::from_secs(30), || false);
        transport.broker().refuse = None;
        assert!(drive(&mut pool, &clock, Duration::from_secs(30), || client
            .state()
            .is_ready()));
        transport.kill_all();
        assert!(drive(&mut pool, &clock, Duration::from_secs(30), || client
            .stats()
            .recoveries
            == 1));
    });
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("dial"),
        "tracing captured nothing useful: {text}"
    );
    assert!(text.contains("guest:***@"), "endpoints are shown redacted");
    assert!(
        !text.contains("s3cr3t-pw"),
        "password leaked into tracing output"
    );
}

/// A [`MemoryTransport`] whose client cannot hear of `connection.blocked`.
struct DeafToBlocking(MemoryTransport);

#[async_trait::async_trait]
impl amqp_rebound_core::transport::Transport for DeafToBlocking {
    type Connection = <MemoryTransport as amqp_rebound_core::transport::Transport>::Connection;

    async fn connect(
        &self,
        endpoint: &amqp_rebound_core::Endpoint,
        options: &amqp_rebound_core::transport::ConnectOptions,
    ) -> Result<Self::Connection, TransportError> {
        amqp_rebound_core::transport::Transport::connect(&self.0, endpoint, options).await
    }

    fn reports_blocked(&self) -> bool {
        false
    }
}

#[test]
fn the_client_tells_whether_its_transport_reports_blocking() {
    let (_pool, _clock, _transport, client) = setup(1, 1);
    assert!(client.reports_blocked(), "the trait's default");
    let (client, _driver) = Client::builder()
        .hosts([URL])
        .build(
            DeafToBlocking(MemoryTransport::default()),
            ManualClock::new(),
        )
        .expect("valid config");
    assert!(!client.reports_blocked());
}

/// A dial given up at the connect timeout that answers later (a broker that was
/// paused and resumes) is closed, and the connection dialled meanwhile goes on
/// untouched: no reconnect, every publish confirmed.
#[test]
fn a_dial_answering_after_its_timeout_is_closed_and_the_live_connection_goes_on() {
    let (mut pool, clock, transport, client) = setup(1, 2);
    transport.broker().hang_dials = 1;
    assert!(
        drive(&mut pool, &clock, Duration::from_secs(10), || client
            .state()
            .is_ready()),
        "the second dial connects once the first times out"
    );
    assert_eq!(transport.broker().dials, 2);
    let reconnects = client.stats().reconnects;
    transport.release_dials();
    pool.run_until_stalled();
    assert_eq!(
        transport.open_connections(),
        1,
        "the late connection is closed"
    );
    let results = spawn_publishes(&pool, &client, 0..10);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || {
        results.borrow().len() == 10
    }));
    assert!(all_confirmed(&results), "{:?}", results.borrow());
    assert_eq!(client.stats().reconnects, reconnects, "no reconnect");
    assert!(client.state().is_ready());
}

/// The publish reply slots in use, as the client's `Debug` shows them.
fn reply_slots(client: &Client) -> usize {
    let debug = format!("{client:?}");
    let at = debug
        .find("slots: ")
        .expect("the client's Debug shows its reply slots");
    debug[at + "slots: ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

#[test]
fn every_publish_reply_slot_is_freed_whether_its_future_is_read_dropped_or_kept() {
    let (mut pool, clock, _transport, client) = setup(1, 1);
    assert!(drive(&mut pool, &clock, Duration::from_secs(1), || client
        .state()
        .is_ready()));
    // dropped before its resolution: freed by the resolution
    for i in 0..10 {
        drop(client.publish("", "q", format!("dropped {i}"), Properties::default()));
    }
    // read: freed by the reading
    let results = spawn_publishes(&pool, &client, 0..10);
    // kept unpolled past its resolution: freed when dropped
    let kept: Vec<PublishFuture> = (0..10)
        .map(|i| client.publish("", "q", format!("kept {i}"), Properties::default()))
        .collect();
    assert_eq!(reply_slots(&client), 30);
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || {
        client.stats().confirmed == 30 && results.borrow().len() == 10
    }));
    assert!(all_confirmed(&results));
    assert_eq!(
        reply_slots(&client),
        10,
        "the kept futures' results wait for them"
    );
    drop(kept);
    assert_eq!(reply_slots(&client), 0);
    // after close: resolved Closed at the call, freed when read or dropped
    assert!(close_within(
        &mut pool,
        &clock,
        &client,
        Duration::from_secs(5)
    ));
    let late = client.publish("", "q", "late", Properties::default());
    drop(client.publish("", "q", "later", Properties::default()));
    assert_eq!(
        late.now_or_never(),
        Some(Err(PublishError::Closed)),
        "a publish after close resolves Closed"
    );
    assert_eq!(reply_slots(&client), 0);
}

/// Counts the wake-ups of a waker.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl futures::task::ArcWake for Wakes {
    fn wake_by_ref(arc_self: &std::sync::Arc<Self>) {
        arc_self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Wakes {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

thread_local! {
    /// This thread is polling a publisher's future (see [`Watched`]).
    static PUBLISHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The manual clock, counting the timers made while a publisher's future is
/// polled: a publisher's thread may be outside the driver's runtime, where
/// making one of its timers panics.
#[derive(Clone)]
struct Watched(ManualClock, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl amqp_rebound_core::Timer for Watched {
    fn now(&self) -> std::time::Instant {
        clock_now(&self.0)
    }
    fn sleep_until(&self, deadline: std::time::Instant) -> amqp_rebound_core::transport::Sleep {
        if PUBLISHING.get() {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.0.sleep_until(deadline)
    }
}

/// A client whose driver is polled by hand, and what the tests of the relay
/// look at.
struct HandDriven {
    transport: MemoryTransport,
    client: Client,
    clock: ManualClock,
    driver: std::pin::Pin<Box<amqp_rebound_core::Driver>>,
    driver_wakes: std::sync::Arc<Wakes>,
    /// Timers made while a publisher was polled.
    publisher_timers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HandDriven {
    /// Ready, confirms held, the driver left with nothing to do.
    fn new() -> HandDriven {
        let clock = ManualClock::new();
        let transport = MemoryTransport::default();
        transport.broker().hold_confirms = true;
        let publisher_timers = std::sync::Arc::default();
        let (client, driver) = Client::builder()
            .hosts([URL])
            .pool(1, 1)
            .seed(1)
            .build(
                transport.clone(),
                Watched(clock.clone(), std::sync::Arc::clone(&publisher_timers)),
            )
            .expect("valid config");
        let mut hand = HandDriven {
            transport,
            client,
            clock,
            driver: Box::pin(driver),
            driver_wakes: std::sync::Arc::default(),
            publisher_timers,
        };
        for _ in 0..100 {
            hand.poll_driver();
            if hand.client.state().is_ready() {
                break;
            }
            hand.clock.advance_to_next();
        }
        assert!(hand.client.state().is_ready());
        hand
    }

    fn poll_driver(&mut self) {
        let waker = futures::task::waker(std::sync::Arc::clone(&self.driver_wakes));
        assert!(
            self.driver
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker))
                .is_pending()
        );
    }

    fn publish(&self, payload: &str) -> PublishFuture {
        self.client
            .publish("", "q", payload.to_owned(), Properties::default())
    }

    /// Releases the held confirms; the next ones are held again.
    fn confirm(&self) {
        self.transport.release_confirms();
        self.transport.broker().hold_confirms = true;
    }

    /// One confirm handed to a waiting publisher while no guard is armed:
    /// the driver is woken too, and arms its guard.
    fn arm_guard(&mut self) {
        let wakes = std::sync::Arc::new(Wakes::default());
        let mut warm = self.publish("warm-up");
        assert!(poll_as(&wakes, &mut warm).is_pending());
        let before = self.driver_wakes.count();
        self.confirm();
        assert_eq!(wakes.count(), 1, "the confirm woke its publisher");
        assert_eq!(
            self.driver_wakes.count(),
            before + 1,
            "and, the first hand-off, the driver to arm its guard"
        );
        self.poll_driver();
        assert_eq!(
            poll_as(&wakes, &mut warm),
            std::task::Poll::Ready(Ok(Confirmation::Confirmed))
        );
        assert!(self.guard_armed());
    }

    /// Whether the driver's timer looks at the channels within 10 ms.
    fn guard_armed(&self) -> bool {
        self.clock
            .next_deadline()
            .is_some_and(|at| at <= clock_now(&self.clock) + Duration::from_millis(10))
    }

    /// Advances to the driver's next timer and polls it.
    fn tick(&mut self) {
        assert!(self.clock.advance_to_next());
        self.poll_driver();
    }

    /// With the guard armed, `b` and then `a` wait for their confirms, and
    /// both confirms come: the wake-up goes to `a` alone (the last to wait),
    /// and not to the driver. Each future with its wake-up count.
    fn hand_off_to_a(&mut self) -> (Waiting, Waiting) {
        self.arm_guard();
        let (a_wakes, b_wakes) = (
            std::sync::Arc::new(Wakes::default()),
            std::sync::Arc::new(Wakes::default()),
        );
        let mut b = self.publish("b");
        assert!(poll_as(&b_wakes, &mut b).is_pending());
        let mut a = self.publish("a");
        assert!(poll_as(&a_wakes, &mut a).is_pending());
        let before = self.driver_wakes.count();
        self.confirm();
        assert_eq!(a_wakes.count(), 1, "the wake-up went to the last to wait");
        assert_eq!(b_wakes.count(), 0, "b's confirm is not taken yet");
        assert_eq!(self.driver_wakes.count(), before, "the guard is armed");
        ((a, a_wakes), (b, b_wakes))
    }
}

/// A publish's future and the wake-ups of its task.
type Waiting = (PublishFuture, std::sync::Arc<Wakes>);

/// Polls `future` as a publisher's task whose waker counts into `wakes`.
fn poll_as(
    wakes: &std::sync::Arc<Wakes>,
    future: &mut PublishFuture,
) -> std::task::Poll<Result<Confirmation, PublishError>> {
    let waker = futures::task::waker(std::sync::Arc::clone(wakes));
    PUBLISHING.set(true);
    let poll = future.poll_unpin(&mut std::task::Context::from_waker(&waker));
    PUBLISHING.set(false);
    poll
}

/// A confirm wakes the publisher waiting for it, whose next poll takes it on
/// its own task: one wake-up, not one of the driver's task and then one of the
/// caller's. That poll takes the channels' events only and makes no timer.
/// A publisher woken so and dropped before it polls hands the wake-up to the
/// driver; with no publisher waiting, the driver is woken, as for any other
/// source.
#[test]
fn a_confirm_wakes_its_waiting_publisher_not_the_driver() {
    let mut hand = HandDriven::new();
    hand.arm_guard();
    let publisher = std::sync::Arc::new(Wakes::default());

    let mut first = hand.publish("first");
    assert!(poll_as(&publisher, &mut first).is_pending());
    let before = hand.driver_wakes.count();
    hand.confirm();
    assert_eq!(publisher.count(), 1, "the confirm woke the publisher");
    assert_eq!(hand.driver_wakes.count(), before, "and not the driver");
    // the guard's time comes before the driver runs: a full poll of the
    // driver on the publisher's task would make the driver's next timer there
    hand.clock.advance(Duration::from_millis(20));
    assert_eq!(
        poll_as(&publisher, &mut first),
        std::task::Poll::Ready(Ok(Confirmation::Confirmed)),
        "read without a poll of the driver"
    );
    assert_eq!(publisher.count(), 1, "the run did not wake its own task");
    assert_eq!(hand.client.stats().confirmed, 2);
    assert_eq!(
        hand.publisher_timers
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no timer made on the publisher's task"
    );

    // woken in the driver's place, then dropped: the driver takes over
    let mut second = hand.publish("second");
    assert!(poll_as(&publisher, &mut second).is_pending());
    let before = (publisher.count(), hand.driver_wakes.count());
    hand.confirm();
    assert_eq!(publisher.count(), before.0 + 1);
    assert_eq!(hand.driver_wakes.count(), before.1);
    drop(second);
    assert_eq!(
        hand.driver_wakes.count(),
        before.1 + 1,
        "the dropped publisher's wake-up went to the driver"
    );
    hand.poll_driver();
    assert_eq!(hand.client.stats().confirmed, 3, "its confirm was taken");

    // nobody waiting: the driver is woken
    let third = hand.publish("third");
    let before = (publisher.count(), hand.driver_wakes.count());
    hand.confirm();
    assert_eq!(publisher.count(), before.0);
    assert_eq!(hand.driver_wakes.count(), before.1 + 1);
    hand.poll_driver();
    assert_eq!(third.now_or_never(), Some(Ok(Confirmation::Confirmed)));
}

/// A publisher handed a channel's wake-up and never polled again (polled once
/// by hand, then kept) holds the other publishers' confirms for at most the
/// guard's 10 ms; the guard stops looking one look after the last hand-off.
#[test]
fn a_woken_publisher_never_polled_again_holds_the_others_for_at_most_the_grace() {
    let mut hand = HandDriven::new();
    let ((mut a, a_wakes), (mut b, b_wakes)) = hand.hand_off_to_a();
    let before = hand.driver_wakes.count();
    // `a` is never polled again: the guard's look takes the confirms
    assert!(hand.guard_armed());
    hand.tick();
    assert!(
        hand.driver_wakes.count() > before,
        "the timer woke the driver"
    );
    assert_eq!(b_wakes.count(), 1);
    assert_eq!(
        poll_as(&b_wakes, &mut b),
        std::task::Poll::Ready(Ok(Confirmation::Confirmed))
    );
    assert_eq!(
        poll_as(&a_wakes, &mut a),
        std::task::Poll::Ready(Ok(Confirmation::Confirmed))
    );
    // no more hand-offs: one more look, then none
    hand.tick();
    assert!(
        !hand.guard_armed(),
        "no timer looks at the channels after the hand-offs stopped"
    );
}

/// The guard costs nothing without hand-offs: a publisher waiting for a
/// confirm that does not come (a slow broker, an outage) arms no timer, and a
/// future polled once with a no-op waker and kept leaves none running after its
/// confirm was taken.
#[test]
fn without_hand_offs_no_timer_looks_at_the_channels() {
    let mut hand = HandDriven::new();
    let wakes = std::sync::Arc::new(Wakes::default());
    let mut waiting = hand.publish("waiting");
    assert!(poll_as(&wakes, &mut waiting).is_pending());
    hand.poll_driver();
    assert!(!hand.guard_armed(), "waiting alone arms no guard");
    drop(waiting);
    hand.confirm();
    hand.poll_driver();

    let mut kept = hand.publish("kept");
    assert_eq!((&mut kept).now_or_never(), None);
    hand.confirm();
    hand.poll_driver();
    for _ in 0..3 {
        if !hand.guard_armed() {
            break;
        }
        hand.tick();
    }
    assert!(
        !hand.guard_armed(),
        "the guard stops once the kept future's confirm was taken"
    );
    assert_eq!(kept.now_or_never(), Some(Ok(Confirmation::Confirmed)));
}

/// Publishers on plain threads (`block_on`), outside the runtime the driver
/// and its timer belong to: a confirm taken on a publisher's thread runs
/// nothing of the driver's that needs that runtime (making a tokio timer
/// there panics).
#[cfg(feature = "tokio")]
#[test]
fn publishers_on_threads_outside_the_drivers_runtime_are_confirmed() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a runtime");
    let (client, driver) = Client::builder()
        .hosts([URL])
        .pool(1, 1)
        .seed(1)
        .build(MemoryTransport::default(), amqp_rebound_core::TokioTimer)
        .expect("valid config");
    let driver = runtime.spawn(driver);
    let (done, finished) = std::sync::mpsc::channel();
    let publishers: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    let confirm = futures::executor::block_on(client.publish(
                        "",
                        "q",
                        format!("{t}-{i}"),
                        Properties::default(),
                    ));
                    assert_eq!(confirm, Ok(Confirmation::Confirmed));
                }
                let _ = done.send(());
            })
        })
        .collect();
    drop(done);
    for _ in 0..4 {
        // a panicked publisher drops its sender; a lost wake-up hangs one
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("every publisher finished in time");
    }
    for publisher in publishers {
        publisher.join().expect("no publisher panicked");
    }
    assert_eq!(client.stats().confirmed, 2000);
    runtime.block_on(async {
        client.close().await;
        driver.await.expect("the driver ended");
    });
}

/// A run handed to one publisher is taken by whichever publisher is polled
/// first: here not the woken one, which is never polled again.
#[test]
fn any_publishers_poll_takes_a_run_handed_to_another() {
    let mut hand = HandDriven::new();
    let ((mut a, a_wakes), (mut b, b_wakes)) = hand.hand_off_to_a();
    let before = hand.driver_wakes.count();
    // b is polled (spuriously, say) before a: it takes the run a was handed
    assert_eq!(
        poll_as(&b_wakes, &mut b),
        std::task::Poll::Ready(Ok(Confirmation::Confirmed)),
        "b's confirm taken on b's poll, without the driver"
    );
    assert_eq!(hand.driver_wakes.count(), before);
    assert_eq!(hand.client.stats().confirmed, 3);
    assert_eq!(
        poll_as(&a_wakes, &mut a),
        std::task::Poll::Ready(Ok(Confirmation::Confirmed))
    );
}

/// A publish the driver must take (its state is busy, or requests are queued
/// ahead of it) still fails at the call when the call could tell: bad
/// properties, a name past 255 bytes, a zero timeout, a closed client.
#[test]
fn a_publish_the_driver_takes_still_fails_bad_input_at_the_call() {
    let (mut pool, clock, _transport, client) = setup(1, 1);
    drive(&mut pool, &clock, Duration::from_secs(5), || {
        client.state().is_ready()
    });
    // more requests queued than one call runs ahead of its publish: each
    // publish goes to the driver, which is not polled before the asserts
    let mut watches = Vec::new();
    let mut queue_ahead = || watches.extend((0..300).map(|_| client.watch()));
    let long = "x".repeat(256);
    let mut bad_property = Properties::default();
    bad_property.content_type = Some(long.clone());
    let cases = [
        (bad_property, "", "q"),
        (Properties::default(), "", long.as_str()),
        (Properties::default(), long.as_str(), "q"),
    ];
    for (i, (properties, exchange, routing_key)) in cases.into_iter().enumerate() {
        queue_ahead();
        let result = client
            .publish(exchange, routing_key, b"p".to_vec(), properties)
            .now_or_never();
        assert!(
            matches!(result, Some(Err(PublishError::Invalid(_)))),
            "case {i}: {result:?}"
        );
    }
    queue_ahead();
    let zero = client.publish_message(
        amqp_rebound_core::Message::new("", "q", b"p".to_vec()),
        PublishOptions::default().timeout(Duration::ZERO),
    );
    assert_eq!(zero.now_or_never(), Some(Err(PublishError::TimedOut)));
    // a good one is taken by the driver, not refused
    let good = client.publish("", "q", b"p".to_vec(), Properties::default());
    let results: Results = Rc::default();
    collect(&pool, &results, 0, good);
    drive(&mut pool, &clock, Duration::from_secs(5), || {
        !results.borrow().is_empty()
    });
    assert_eq!(results.borrow()[0].1, Ok(Confirmation::Confirmed));
}

/// Once a refusal told the broker's size limit, a larger message fails at the
/// call, also when the driver takes the publish.
#[test]
fn a_payload_over_the_size_limit_a_refusal_told_fails_at_the_call() {
    let (mut pool, clock, transport, client) = setup(1, 1);
    drive(&mut pool, &clock, Duration::from_secs(5), || {
        client.state().is_ready()
    });
    transport.broker().hold_confirms = true;
    let results: Results = Rc::default();
    let big = client.publish("", "q", vec![7u8; 200_000], Properties::default());
    collect(&pool, &results, 0, big);
    drive(&mut pool, &clock, Duration::from_secs(1), || {
        transport.broker().received.len() == 1
    });
    transport.close_channel_with(
        0,
        406,
        "PRECONDITION_FAILED - message size 200000 is larger than configured max size 131072",
    );
    drive(&mut pool, &clock, Duration::from_secs(5), || {
        !results.borrow().is_empty()
    });
    assert!(
        matches!(
            results.borrow()[0].1,
            Err(PublishError::Rejected { code: 406, .. })
        ),
        "{:?}",
        results.borrow()
    );
    // on the call's thread (the state is free), and through the driver
    let here = client.publish("", "q", vec![7u8; 131_073], Properties::default());
    assert!(matches!(
        here.now_or_never(),
        Some(Err(PublishError::Invalid(_)))
    ));
    let _watches: Vec<_> = (0..300).map(|_| client.watch()).collect();
    let queued = client.publish("", "q", vec![7u8; 131_073], Properties::default());
    let result = queued.now_or_never();
    assert!(
        matches!(result, Some(Err(PublishError::Invalid(ref e))) if e.contains("131072")),
        "{result:?}"
    );
    // at the limit is taken
    let at = client.publish("", "q", vec![7u8; 131_072], Properties::default());
    assert_eq!(at.now_or_never(), None);
}

/// Consumes "jobs" with `options`, publishes five messages and takes (and
/// acks) the first; then, if `cancelled`, the broker cancels the consumer for
/// good (the queue is not the client's: `declared` false); then `close()`,
/// with the other four still unread in the consumer. Returns what each item
/// read after the close was, then "end".
fn items_after_close(options: ConsumeOptions, declared: bool, cancelled: bool) -> Vec<String> {
    let (mut pool, clock, transport, client) = setup(1, 1);
    let seen = Rc::new(RefCell::new(Vec::new()));
    {
        let seen = Rc::clone(&seen);
        pool.spawner()
            .spawn_local(async move {
                if declared {
                    client
                        .declare_queue(QueueDecl::durable("jobs"))
                        .await
                        .unwrap();
                }
                let no_ack = options.no_ack;
                let mut consumer = client.consume("jobs", options).await.unwrap();
                for i in 0..5 {
                    client
                        .publish("", "jobs", format!("m{i}"), Properties::default())
                        .await
                        .unwrap();
                }
                let first = consumer.next().await.unwrap().unwrap();
                if !no_ack {
                    first.ack().await.unwrap();
                }
                if cancelled {
                    transport.cancel_consumer(first.consumer_tag());
                    // a round trip through the driver: the cancel is taken
                    client
                        .publish("", "elsewhere", "x", Properties::default())
                        .await
                        .unwrap();
                }
                client.close().await;
                while let Some(item) = consumer.next().await {
                    let item = match item {
                        Ok(r) if no_ack => {
                            format!("delivery {}", String::from_utf8_lossy(r.payload()))
                        }
                        Ok(r) => format!("delivery, its ack {:?}", r.ack().await),
                        Err(e) => format!("{e:?}"),
                    };
                    seen.borrow_mut().push(item);
                }
                seen.borrow_mut().push("end".to_string());
            })
            .unwrap();
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(10), || seen
        .borrow()
        .last()
        .is_some_and(|s| s == "end")));
    seen.take()
}

#[test]
fn after_close_an_acking_consumer_hands_out_nothing_its_application_could_not_ack() {
    // the four deliveries it held are unacked at the broker, which takes them
    // back with the connection: handed out, each would be worked on, its ack
    // refused (`Closed`), and delivered again
    assert_eq!(
        items_after_close(
            ConsumeOptions {
                prefetch: Some(10),
                ..ConsumeOptions::default()
            },
            true,
            false
        ),
        ["Closed", "end"]
    );
    // an auto-ack consumer's are the application's alone: all handed out
    assert_eq!(
        items_after_close(
            ConsumeOptions {
                no_ack: true,
                ..ConsumeOptions::default()
            },
            true,
            false
        ),
        [
            "delivery m1",
            "delivery m2",
            "delivery m3",
            "delivery m4",
            "Closed",
            "end"
        ]
    );
}

/// A consumer the broker cancelled for good (its queue, which the client did
/// not declare, was deleted) still holds the deliveries it had not handed out.
/// Read after `close()`, they would be worked on with each ack refused
/// (`Closed`) and the broker delivering them again, as for a live consumer:
/// they go too, and the error that ended it comes next.
#[test]
fn after_close_a_consumer_that_ended_before_hands_out_nothing_its_application_could_not_ack() {
    let options = ConsumeOptions {
        prefetch: Some(10),
        ..ConsumeOptions::default()
    };
    assert_eq!(
        items_after_close(options, false, true),
        ["CancelledByBroker", "end"]
    );
}
