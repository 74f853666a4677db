//! Memory the core holds, measured with a counting global allocator (live bytes:
//! allocated minus freed, every thread), over the in-memory transport of core's
//! tests, on a single-threaded executor with a manual clock (no runtime):
//!
//! - **per idle channel**: a Ready client (`Client` + `Driver`) with a 10 x 100
//!   pool against one with 10 x 10, divided by the 900 channels between them;
//!   the same for the in-memory transport's own channel objects alone (opened
//!   directly, events streams taken, confirm mode), so that the core's share is
//!   the difference. Per connection likewise (1 x 10 against 10 x 10).
//! - **per 10k outbox messages**: a Ready 1 x 1 client whose broker then goes
//!   away (connection killed, dials refused), so every publish waits in the
//!   outbox; 10,000 publishes of a fresh 128-byte payload each, handed to the
//!   driver (each caller's future is polled once, so the request is sent, and
//!   then dropped: what is left is what the client holds for the message).
//!
//! Prints the figures and one JSON line.
//!
//! `cargo bench -p amqp-rebound-core --bench memory`

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::System;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use amqp_rebound_core::transport::{Channel, ConnectOptions, Connection, Transport};
use amqp_rebound_core::{Client, Endpoint, Properties, TransportError};
use bytes::Bytes;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use support::{ManualClock, MemoryTransport, drive};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const OUTBOX_MESSAGES: usize = 10_000;
const PAYLOAD: usize = 128;

/// Bytes allocated and not freed so far, by the whole process.
fn live() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

/// A Ready client with `connections` x `channels` over a fresh in-memory
/// transport, its driver on `pool`.
fn ready_client(
    connections: usize,
    channels: usize,
    capacity: usize,
) -> (Client, MemoryTransport, ManualClock, LocalPool) {
    let transport = MemoryTransport::default();
    let clock = ManualClock::new();
    let (client, driver) = Client::builder()
        .hosts([URL])
        .pool(connections, channels)
        .outbox_capacity(capacity)
        .build(transport.clone(), clock.clone())
        .expect("a valid configuration");
    let mut pool = LocalPool::new();
    pool.spawner()
        .spawn_local(driver)
        .expect("spawn the driver");
    let ready = drive(&mut pool, &clock, Duration::from_secs(60), || {
        client.state().is_ready()
    });
    assert!(ready, "the client did not become Ready");
    pool.run_until_stalled();
    (client, transport, clock, pool)
}

/// Closes the client, discarding what its outbox holds (a close that drains
/// would wait for the manual clock), and lets its driver finish.
fn shut(client: Client, mut pool: LocalPool) {
    pool.run_until(client.close_discarding());
    drop(client);
    pool.run_until_stalled();
}

/// Live bytes of a Ready idle client with `connections` x `channels`, and
/// everything under it (transport objects, the in-memory broker's state).
fn idle_client(connections: usize, channels: usize) -> i64 {
    let before = live();
    let (client, transport, clock, pool) = ready_client(connections, channels, 10_000);
    let held = live() - before;
    shut(client, pool);
    drop((transport, clock));
    held
}

/// Live bytes of the in-memory transport alone with `connections` x `channels`
/// open, each with its events stream taken and confirm mode on (what the driver
/// does with them).
fn raw_transport(connections: usize, channels: usize) -> i64 {
    let before = live();
    let transport = MemoryTransport::default();
    let endpoint = Endpoint::parse(URL).expect("endpoint");
    let held = futures::executor::block_on(async {
        let mut keep = Vec::new();
        for _ in 0..connections {
            let conn = transport
                .connect(&endpoint, &ConnectOptions::default())
                .await
                .expect("connect");
            let conn_events = conn.events();
            let mut chans = Vec::new();
            for _ in 0..channels {
                let ch = conn.open_channel().await.expect("channel");
                ch.confirm_select().await.expect("confirm mode");
                chans.push((ch.events(), ch));
            }
            keep.push((conn_events, conn, chans));
        }
        let held = live() - before;
        drop(keep);
        held
    });
    drop(transport);
    held
}

/// Live bytes added by `n` publishes of a fresh `PAYLOAD`-byte payload each
/// waiting in the outbox of a 1 x 1 client whose broker is gone.
fn outbox(n: usize) -> i64 {
    let (client, transport, clock, mut pool) = ready_client(1, 1, 2 * n);
    transport.broker().refuse = Some(TransportError::Io("broker gone".into()));
    transport.kill_all();
    pool.run_until_stalled();
    assert!(!client.state().is_ready(), "the connection should be down");
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let before = live();
    for i in 0..n {
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let mut publish = Box::pin(client.publish("", "bench", payload, Properties::default()));
        // sends the request to the driver, then waits for the confirm: drop it
        assert!(matches!(publish.as_mut().poll(&mut cx), Poll::Pending));
        drop(publish);
        if i % 1024 == 1023 {
            pool.run_until_stalled();
        }
    }
    pool.run_until_stalled();
    let held = live() - before;
    assert_eq!(
        client.stats().outbox_depth,
        n,
        "every message in the outbox"
    );
    shut(client, pool);
    drop((transport, clock));
    held
}

fn main() {
    // warm-up: one-time allocations (thread-locals, lazily built statics) out of
    // the way
    idle_client(1, 1);
    raw_transport(1, 1);
    outbox(100);

    let one = idle_client(1, 1);
    let (c1x10, c10x10, c10x100) = (
        idle_client(1, 10),
        idle_client(10, 10),
        idle_client(10, 100),
    );
    let (r1x10, r10x10, r10x100) = (
        raw_transport(1, 10),
        raw_transport(10, 10),
        raw_transport(10, 100),
    );
    let per_channel = (c10x100 - c10x10) as f64 / 900.0;
    let raw_per_channel = (r10x100 - r10x10) as f64 / 900.0;
    let per_connection = ((c10x10 - c1x10) as f64 - 90.0 * per_channel) / 9.0;
    let raw_per_connection = ((r10x10 - r1x10) as f64 - 90.0 * raw_per_channel) / 9.0;

    let outbox_runs: Vec<i64> = (0..3).map(|_| outbox(OUTBOX_MESSAGES)).collect();
    let held = *outbox_runs.iter().min().expect("three runs");
    let payloads = (OUTBOX_MESSAGES * PAYLOAD) as i64;
    // the shared message itself: an Arc<Message> (two counts + the struct)
    let message_struct = 16 + std::mem::size_of::<amqp_rebound_core::Message>();

    println!("memory held (live bytes, counting allocator), in-memory transport, no runtime");
    println!("  Ready idle client 1x1:           {one:>9} B");
    println!(
        "  per idle channel:                {per_channel:>9.0} B   (10x100 vs 10x10; transport's own \
         objects {raw_per_channel:.0} B, core {:.0} B)",
        per_channel - raw_per_channel
    );
    println!(
        "  per idle connection:             {per_connection:>9.0} B   (1x10 vs 10x10 less their channels; \
         transport {raw_per_connection:.0} B, core {:.0} B)",
        per_connection - raw_per_connection
    );
    println!(
        "  per {OUTBOX_MESSAGES} outbox messages:      {held:>9} B   ({PAYLOAD}-byte payloads: {payloads} B \
         of it; {:.0} B per message besides its payload; runs {outbox_runs:?})",
        (held - payloads) as f64 / OUTBOX_MESSAGES as f64
    );
    println!(
        "    of which the Arc<Message> itself is {message_struct} B per message; the rest is the \
         outbox's and the replies' bookkeeping (entries, queues, reply slots, routing key)"
    );
    println!(
        "{{\"idle_client_1x1_bytes\":{one},\"per_idle_channel_bytes\":{per_channel:.0},\
         \"per_idle_channel_transport_bytes\":{raw_per_channel:.0},\
         \"per_idle_channel_core_bytes\":{:.0},\"per_idle_connection_bytes\":{per_connection:.0},\
         \"per_idle_connection_transport_bytes\":{raw_per_connection:.0},\
         \"per_idle_connection_core_bytes\":{:.0},\"outbox_messages\":{OUTBOX_MESSAGES},\
         \"outbox_payload_bytes\":{PAYLOAD},\"outbox_bytes\":{held},\
         \"outbox_bytes_per_message_besides_payload\":{:.0},\
         \"outbox_arc_message_bytes\":{message_struct}}}",
        per_channel - raw_per_channel,
        per_connection - raw_per_connection,
        (held - payloads) as f64 / OUTBOX_MESSAGES as f64
    );
}
