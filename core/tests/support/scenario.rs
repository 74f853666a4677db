//! The scenes the telemetry tests share: a client over the in-memory transport
//! on a `LocalPool`, driven Ready, through held confirms, and through an outage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound_core::{Client, ClientBuilder, Properties};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;

use super::{ManualClock, MemoryTransport, drive};

pub const URL: &str = "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f";

pub fn start(builder: ClientBuilder) -> (LocalPool, ManualClock, MemoryTransport, Client) {
    let pool = LocalPool::new();
    let clock = ManualClock::new();
    let transport = MemoryTransport::default();
    let (client, driver) = builder
        .hosts([URL])
        .pool(1, 2)
        .seed(1)
        .connection_name("telemetry-test")
        .build(transport.clone(), clock.clone())
        .expect("valid config");
    pool.spawner().spawn_local(driver).expect("spawn");
    (pool, clock, transport, client)
}

pub fn ready(pool: &mut LocalPool, clock: &ManualClock, client: &Client) {
    assert!(drive(pool, clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
}

/// Publishes `n` messages whose confirms the broker holds for `hold`, and
/// waits for them.
pub fn publish_held(
    pool: &mut LocalPool,
    clock: &ManualClock,
    transport: &MemoryTransport,
    client: &Client,
    n: usize,
    hold: Duration,
) {
    transport.broker().hold_confirms = true;
    let done = spawn_confirmed(pool, client, n);
    pool.run_until_stalled();
    clock.advance(hold);
    transport.release_confirms();
    assert!(drive(pool, clock, Duration::from_secs(5), || *done
        .lock()
        .unwrap()
        == n));
}

/// Kills the connection after it was Ready long enough to count as useful,
/// refuses dials for `down`, and waits for the recovery.
pub fn outage(
    pool: &mut LocalPool,
    clock: &ManualClock,
    transport: &MemoryTransport,
    client: &Client,
    down: Duration,
) {
    clock.advance(Duration::from_millis(200));
    pool.run_until_stalled();
    transport.broker().refuse = Some(amqp_rebound_core::TransportError::Io(
        "connection refused".into(),
    ));
    transport.kill_all();
    drive(pool, clock, down, || false);
    transport.broker().refuse = None;
    ready(pool, clock, client);
}

/// Spawns `n` publishes to the queue `q` on `pool`, each expected to be
/// confirmed; the count of those confirmed so far.
pub fn spawn_confirmed(pool: &LocalPool, client: &Client, n: usize) -> Arc<Mutex<usize>> {
    let done = Arc::new(Mutex::new(0usize));
    for i in 0..n {
        let future = client.publish("", "q", format!("m{i}"), Properties::default());
        let done = Arc::clone(&done);
        pool.spawner()
            .spawn_local(async move {
                future.await.expect("confirmed");
                *done.lock().unwrap() += 1;
            })
            .expect("spawn");
    }
    done
}
