//! Client-side memory per idle channel against the real broker at `AMQP_URL`,
//! measured with a counting global allocator (live bytes: allocated minus freed,
//! every thread of this process, so the transport's own buffers and tasks
//! count):
//!
//! - amqp-rebound over lapin and over amqprs: a Ready client with a 10 x 100
//!   pool against one with 10 x 10, divided by the 900 channels between them
//!   (and per connection, 1 x 10 against 10 x 10 less their channels);
//! - the raw client beside it: the same connections and channels opened directly
//!   (confirm mode on, as the pool's channels are), so the difference is what
//!   amqp-rebound adds.
//!
//! Each figure is the smallest of `--rounds` (default 2) measurements taken
//! 500 ms after everything is open. The core's own figures (per idle channel and
//! per 10k outbox messages, no broker) are `cargo bench -p amqp-rebound-core
//! --bench memory`. Takes the broker lock shared (it only opens connections).
//! Prints the figures and one JSON line.
//!
//! ```text
//! cargo run --release -p amqp-rebound-tests --bin bench_memory -- [--rounds 2]
//! ```

use std::alloc::System;
use std::future::Future;
use std::time::Duration;

use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_core::Client;
use amqp_rebound_core::transport::Transport;
use amqp_rebound_lapin::LapinTransport;
use amqp_rebound_tests::bench::{BoxError, ready, start_client};
use amqp_rebound_tests::broker::{self, Access, BrokerLock, BrokerUrl};
use lapin::options::ConfirmSelectOptions;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not freed so far, by the whole process.
fn live() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

/// How long to let background tasks finish their allocations before reading.
const SETTLE: Duration = Duration::from_millis(500);

/// The pool shapes measured: (connections, channels per connection).
const SHAPES: [(usize, usize); 3] = [(1, 10), (10, 10), (10, 100)];

fn main() {
    let mut rounds = 2usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next().and_then(|v| v.parse().ok())) {
            ("--rounds", Some(n)) => rounds = std::cmp::max(n, 1),
            _ => {
                eprintln!("usage: bench_memory [--rounds N]");
                std::process::exit(2);
            }
        }
    }
    let url = BrokerUrl::from_env();
    if !broker::broker_reachable(&url) {
        eprintln!("no broker at {}", url.authority());
        std::process::exit(1);
    }
    let _lock = BrokerLock::acquire(Access::Shared);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(url, rounds)) {
        eprintln!("bench_memory failed: {e}");
        std::process::exit(1);
    }
}

/// Per-channel and per-connection bytes from the three shapes' totals.
#[derive(Debug, Clone, Copy)]
struct PerUnit {
    channel: f64,
    connection: f64,
}

fn per_unit(totals: &[i64; 3]) -> PerUnit {
    let [c1x10, c10x10, c10x100] = *totals;
    let channel = (c10x100 - c10x10) as f64 / 900.0;
    let connection = ((c10x10 - c1x10) as f64 - 90.0 * channel) / 9.0;
    PerUnit {
        channel,
        connection,
    }
}

/// The smallest live-bytes delta of `rounds` runs of `open` for each shape.
async fn measure<F, Fut>(rounds: usize, open: F) -> Result<[i64; 3], BoxError>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Result<i64, BoxError>>,
{
    let mut best = [i64::MAX; 3];
    for _ in 0..rounds {
        for (i, &(connections, channels)) in SHAPES.iter().enumerate() {
            best[i] = best[i].min(open(connections, channels).await?);
        }
    }
    Ok(best)
}

/// Live bytes of a Ready amqp-rebound client with `connections` x `channels`.
async fn rebound<T: Transport>(
    url: &BrokerUrl,
    transport: T,
    connections: usize,
    channels: usize,
) -> Result<i64, BoxError> {
    tokio::time::sleep(SETTLE).await;
    let before = live();
    let client = start_client(
        url,
        Client::builder().pool(connections, channels),
        transport,
    );
    ready(&client).await?;
    tokio::time::sleep(SETTLE).await;
    let held = live() - before;
    client.close().await;
    Ok(held)
}

/// Live bytes of raw lapin with `connections` x `channels` in confirm mode.
async fn raw_lapin(url: &BrokerUrl, connections: usize, channels: usize) -> Result<i64, BoxError> {
    tokio::time::sleep(SETTLE).await;
    let before = live();
    let mut keep = Vec::new();
    for _ in 0..connections {
        let connection = amqp_rebound_tests::bench::raw_lapin_connection(url).await?;
        let mut chans = Vec::new();
        for _ in 0..channels {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            chans.push(channel);
        }
        keep.push((connection, chans));
    }
    tokio::time::sleep(SETTLE).await;
    let held = live() - before;
    for (connection, chans) in keep {
        drop(chans);
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(held)
}

/// Live bytes of raw amqprs with `connections` x `channels` in confirm mode,
/// each with a channel callback (which confirms need).
async fn raw_amqprs(url: &BrokerUrl, connections: usize, channels: usize) -> Result<i64, BoxError> {
    use amqprs::callbacks::DefaultChannelCallback;
    use amqprs::channel::ConfirmSelectArguments;
    tokio::time::sleep(SETTLE).await;
    let before = live();
    let mut keep = Vec::new();
    for _ in 0..connections {
        let connection = amqp_rebound_tests::bench::raw_amqprs_connection(url).await?;
        let mut chans = Vec::new();
        for _ in 0..channels {
            let channel = connection.open_channel(None).await?;
            channel.register_callback(DefaultChannelCallback).await?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await?;
            chans.push(channel);
        }
        keep.push((connection, chans));
    }
    tokio::time::sleep(SETTLE).await;
    let held = live() - before;
    for (connection, chans) in keep {
        for channel in chans {
            let _ = channel.close().await;
        }
        let _ = connection.close().await;
    }
    Ok(held)
}

async fn run(url: BrokerUrl, rounds: usize) -> Result<(), BoxError> {
    // warm-up: one-time allocations (lazily built statics, thread-locals)
    rebound(&url, LapinTransport::new(), 1, 1).await?;
    rebound(&url, AmqprsTransport::new(), 1, 1).await?;
    raw_lapin(&url, 1, 1).await?;
    raw_amqprs(&url, 1, 1).await?;

    let lapin_raw = measure(rounds, |c, n| raw_lapin(&url, c, n)).await?;
    let lapin_rebound = measure(rounds, |c, n| rebound(&url, LapinTransport::new(), c, n)).await?;
    let amqprs_raw = measure(rounds, |c, n| raw_amqprs(&url, c, n)).await?;
    let amqprs_rebound =
        measure(rounds, |c, n| rebound(&url, AmqprsTransport::new(), c, n)).await?;

    println!("client-side memory (live bytes, counting allocator), smallest of {rounds} rounds");
    let mut json = Vec::new();
    for (name, raw, rebound) in [
        ("lapin", lapin_raw, lapin_rebound),
        ("amqprs", amqprs_raw, amqprs_rebound),
    ] {
        let (r, b) = (per_unit(&raw), per_unit(&rebound));
        println!(
            "  {name:<6} per idle channel: raw {:>7.0} B   amqp-rebound {:>7.0} B   (+{:.0} B)",
            r.channel,
            b.channel,
            b.channel - r.channel
        );
        println!(
            "  {name:<6} per connection:   raw {:>7.0} B   amqp-rebound {:>7.0} B   (+{:.0} B)",
            r.connection,
            b.connection,
            b.connection - r.connection
        );
        println!(
            "  {name:<6} totals 1x10 / 10x10 / 10x100: raw {raw:?}   amqp-rebound {rebound:?}"
        );
        json.push(format!(
            "\"{name}\":{{\"raw_per_idle_channel_bytes\":{:.0},\"rebound_per_idle_channel_bytes\":{:.0},\
             \"raw_per_connection_bytes\":{:.0},\"rebound_per_connection_bytes\":{:.0},\
             \"raw_totals_1x10_10x10_10x100\":[{},{},{}],\"rebound_totals_1x10_10x10_10x100\":[{},{},{}]}}",
            r.channel,
            b.channel,
            r.connection,
            b.connection,
            raw[0],
            raw[1],
            raw[2],
            rebound[0],
            rebound[1],
            rebound[2]
        ));
    }
    println!(
        "{{\"bench\":\"memory\",\"rounds\":{rounds},{}}}",
        json.join(",")
    );
    Ok(())
}
