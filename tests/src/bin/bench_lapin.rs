//! Side-by-side figures on the real broker at `AMQP_URL`, in one run: raw lapin
//! against amqp-rebound over lapin (`amqp-rebound-lapin`).
//!
//! 1. **Throughput with confirms**: N messages through raw lapin (one channel,
//!    at most `window` unconfirmed; the baseline is pipelined lapin,
//!    `buffered(window)` over publish-then-await-confirm futures, and the second,
//!    labelled "await-each", awaits each `basic_publish` before the next), through
//!    the adapter alone, and through amqp-rebound (1 x 1, same window; then the
//!    default pool, 1 x 4), interleaved rounds (five sides: use a multiple of 10
//!    rounds); rates, ratios to pipelined lapin with 95% intervals, and CPU time
//!    per message.
//! 2. **Recovery with the library's defaults**: `kills` x
//!    `close_all_connections`, one every 1 s (dense) and one every 6 s (sparse),
//!    under a publisher of 10,000 msg/s (at most 1,024 unresolved), for a 1 x 1
//!    client and the default pool: per kill the longest confirm pause (targets
//!    p50 50 ms / p99 200 ms), whether the loss met a Ready client, the publishes
//!    in flight at the loss and the re-sends, lost (must be 0) and duplicates.
//! 3. **Broker restart**: `restart` x `rabbitmqctl stop_app`, 5 s down,
//!    `start_app`, per pool shape: from the broker accepting again to the first
//!    confirm (targets p50 1 s / p99 2.5 s). The app is restarted even when the
//!    bench fails.
//!
//! Then one JSON line with every figure. The rounds, the kill loop and the
//! report are shared with `bench_amqprs` (`amqp_rebound_tests::bench`); this file
//! holds only the raw lapin client. It takes the broker lock exclusively (it kills
//! every connection and restarts the broker's app), so it never overlaps the
//! conformance suite.
//!
//! ```text
//! cargo run --release -p amqp-rebound-tests --bin bench_lapin -- \
//!     [--messages 50000] [--window 1024] [--rounds 20] [--kills 20] [--payload 128] \
//!     [--rhythm-ms 1000,6000] [--pool 1x1|default|both] [--restart 3] [--down-ms 5000] \
//!     [--rate 10000] [--only recovery]
//! ```
//!
//! `--only recovery` runs 2 and 3 alone; `--kills 0 --restart 0` runs 1 alone.

use std::time::{Duration, Instant};

use amqp_rebound_lapin::LapinTransport;
use amqp_rebound_tests::bench::{self, BoxError, RawJob};
use futures::FutureExt;
use futures::stream::{self, FuturesUnordered, StreamExt};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

fn main() {
    bench::main("bench_lapin", |args, url| {
        bench::run(
            "lapin",
            args,
            url,
            LapinTransport::new,
            raw_lapin,
            Some("await-each"),
        )
    });
}

/// Raw lapin: one channel in confirm mode, at most `window` unconfirmed.
///
/// The baseline is pipelined lapin, as a lapin user who cares about throughput
/// writes it: a stream of publish-then-await-confirm futures run through
/// `buffered(window)`, so up to `window` publishes are written and confirmed
/// concurrently and the confirms are taken in order. The second baseline
/// (`job.second`, labelled "await-each") awaits each `basic_publish` (it returns
/// once lapin's I/O loop has written the frames) before the next, keeping its
/// confirm future in a window, as lapin's documentation shows.
async fn raw_lapin(job: RawJob) -> Result<Duration, BoxError> {
    let connection = bench::raw_lapin_connection(&job.url).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publish = || {
        channel.basic_publish(
            "".into(),
            job.queue.as_str().into(),
            BasicPublishOptions::default(),
            &job.payload,
            BasicProperties::default(),
        )
    };
    let start = Instant::now();
    if job.second {
        let mut pending = FuturesUnordered::new();
        for _ in 0..job.messages {
            if pending.len() >= job.window {
                check_ack(pending.next().await)?;
            }
            let confirm = publish().await?;
            pending.push(confirm.boxed());
        }
        while !pending.is_empty() {
            check_ack(pending.next().await)?;
        }
    } else {
        let mut confirms = stream::iter(0..job.messages)
            .map(|_| async { publish().await?.await })
            .buffered(job.window);
        while let Some(confirm) = confirms.next().await {
            check_ack(Some(confirm))?;
        }
    }
    let took = start.elapsed();
    connection.close(200, "done".into()).await?;
    Ok(took)
}

fn check_ack(confirm: Option<lapin::Result<lapin::Confirmation>>) -> Result<(), BoxError> {
    match confirm {
        Some(Ok(lapin::Confirmation::Ack(_))) => Ok(()),
        other => Err(format!("not an ack: {other:?}").into()),
    }
}
