//! Publish-to-confirm through `Client` + `Driver` over an in-memory transport that
//! confirms at once, against calling that transport directly, with a window of
//! 1024 messages in flight, on a single-threaded executor (no runtime).
//!
//! Prints messages/s for both and the driver's overhead per message.
//!
//! `cargo bench -p amqp-rebound-core --bench driver`
//!
//! With `--features metrics` the client records its metrics into a Prometheus
//! recorder (not scraped during the run); `BENCH_RECORDER=none` leaves the
//! `metrics` facade without a recorder instead. Run both builds one after the
//! other to compare:
//!
//! `cargo bench -p amqp-rebound-core --bench driver; cargo bench -p amqp-rebound-core --bench driver --features metrics`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use amqp_rebound_core::transport::{Channel, ChannelEvent, ConnectOptions, Connection, Transport};
use amqp_rebound_core::{Client, Endpoint, Message, Properties};
use futures::StreamExt;
use futures::executor::LocalPool;
use futures::stream::FuturesUnordered;
use futures::task::LocalSpawnExt;
use support::{ManualClock, MemoryTransport};

const WINDOW: usize = 1024;

/// Raw transport: publish with a window of WINDOW unconfirmed, count acks.
async fn raw(n: usize) -> Duration {
    let transport = MemoryTransport::default();
    let endpoint = Endpoint::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("endpoint");
    let conn = transport
        .connect(&endpoint, &ConnectOptions::default())
        .await
        .expect("connect");
    let ch = conn.open_channel().await.expect("channel");
    ch.confirm_select().await.expect("confirms");
    let mut events = ch.events();
    let message = Message::new("", "bench", vec![0u8; 64]);
    #[allow(clippy::disallowed_methods)] // benchmark wall time
    let start = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < n {
        while sent < n && sent - acked < WINDOW {
            ch.publish(&message).await.expect("publish");
            sent += 1;
        }
        if let Some(ChannelEvent::Ack { .. }) = events.next().await {
            acked += 1;
        }
        // the in-memory broker keeps what it gets; drop it so memory stays flat
        transport.broker().queues.clear();
        transport.broker().received.clear();
    }
    start.elapsed()
}

/// Through the client: WINDOW publishes in flight at any time.
fn client(n: usize) -> Duration {
    let transport = MemoryTransport::default();
    let clock = ManualClock::new();
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"])
        .pool(1, 1)
        .confirm_window(WINDOW)
        .build(transport.clone(), clock)
        .expect("config");
    let driver = futures::FutureExt::remote_handle(driver);
    let (driver, _keep) = driver;
    let run = async move {
        let payload = bytes::Bytes::from(vec![0u8; 64]);
        // wait until ready with one publish
        client
            .publish("", "bench", payload.clone(), Properties::default())
            .await
            .expect("first publish");
        #[allow(clippy::disallowed_methods)] // benchmark wall time
        let start = Instant::now();
        let mut inflight = FuturesUnordered::new();
        let mut sent = 0;
        let mut done = 0;
        while done < n {
            while sent < n && inflight.len() < WINDOW {
                let c = client.clone();
                let p = payload.clone();
                inflight
                    .push(async move { c.publish("", "bench", p, Properties::default()).await });
                sent += 1;
            }
            if let Some(r) = inflight.next().await {
                r.expect("confirmed");
                done += 1;
                if done % 4096 == 0 {
                    transport.broker().queues.clear();
                    transport.broker().received.clear();
                }
            }
        }
        let took = start.elapsed();
        client.close().await;
        took
    };
    let mut pool = LocalPool::new();
    pool.spawner().spawn_local(driver).expect("spawn");
    pool.run_until(run)
}

/// Which recorder the client's metrics go to (the `metrics` feature), for the
/// printout.
fn recorder() -> &'static str {
    #[cfg(feature = "metrics")]
    {
        if std::env::var("BENCH_RECORDER").as_deref() == Ok("none") {
            return "metrics feature on, no recorder";
        }
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).expect("the first recorder");
        "metrics feature on, Prometheus recorder"
    }
    #[cfg(not(feature = "metrics"))]
    "metrics feature off"
}

fn main() {
    let mode = recorder();
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // warm up both paths once
    futures::executor::block_on(raw(10_000));
    client(10_000);
    let mut raw_rates = Vec::new();
    let mut client_rates = Vec::new();
    for _ in 0..5 {
        let r = futures::executor::block_on(raw(n));
        let c = client(n);
        raw_rates.push(n as f64 / r.as_secs_f64());
        client_rates.push(n as f64 / c.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (raw, client) = (median(&mut raw_rates), median(&mut client_rates));
    let overhead_ns = (1.0 / client - 1.0 / raw) * 1e9;
    println!("messages per run: {n}, window {WINDOW}, median of 5 runs; {mode}");
    println!("raw in-memory transport: {raw:>12.0} msg/s");
    println!("client + driver:         {client:>12.0} msg/s");
    println!("driver overhead:         {overhead_ns:>12.0} ns/message");
    println!(
        "{{\"raw_msgs_per_s\":{raw:.0},\"client_msgs_per_s\":{client:.0},\"overhead_ns_per_msg\":{overhead_ns:.0},\"mode\":\"{mode}\"}}"
    );
}
