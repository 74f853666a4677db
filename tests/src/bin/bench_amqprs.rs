//! Side-by-side figures on the real broker at `AMQP_URL`, in one run: raw amqprs
//! against amqp-rebound over amqprs (`amqp-rebound-amqprs`).
//!
//! 1. **Throughput with confirms**: N messages through raw amqprs (one channel in
//!    confirm mode, pipelined: at most `window` unconfirmed; amqprs gives no
//!    per-publish future, so a `ChannelCallback` hands `publish_ack` /
//!    `publish_nack`, single or `multiple`, to the publishing loop), through the
//!    adapter alone, and through amqp-rebound (1 x 1, same window; then the
//!    default pool, 1 x 4), interleaved rounds; rates, ratios (target >= 0.95) and CPU time per message.
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
//! report are shared with `bench_lapin` (`amqp_rebound_tests::bench`); this file
//! holds only the raw amqprs client. It takes the broker lock exclusively (it
//! kills every connection and restarts the broker's app), so it never overlaps
//! the conformance suite.
//!
//! ```text
//! cargo run --release -p amqp-rebound-tests --bin bench_amqprs -- \
//!     [--messages 50000] [--window 1024] [--rounds 16] [--kills 20] [--payload 128] \
//!     [--rhythm-ms 1000,6000] [--pool 1x1|default|both] [--restart 3] [--down-ms 5000] \
//!     [--rate 10000] [--only recovery]
//! ```
//!
//! `--only recovery` runs 2 and 3 alone; `--kills 0 --restart 0` runs 1 alone.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_tests::bench::{self, BoxError, RawJob};
use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use tokio::sync::mpsc;

fn main() {
    bench::main("bench_amqprs", |args, url| {
        bench::run("amqprs", args, url, AmqprsTransport::new, raw_amqprs, None)
    });
}

/// A publisher confirm as amqprs reports it.
#[derive(Debug, Clone, Copy)]
struct Confirm {
    delivery_tag: u64,
    multiple: bool,
    ack: bool,
}

/// The channel callback: passes confirms to the publishing loop.
struct Confirms(mpsc::UnboundedSender<Confirm>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Confirm {
            delivery_tag: ack.delivery_tag(),
            // sic: amqprs 2.1 spells it `mutiple`
            multiple: ack.mutiple(),
            ack: true,
        });
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Confirm {
            delivery_tag: nack.delivery_tag(),
            multiple: nack.multiple(),
            ack: false,
        });
    }

    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// Raw amqprs: one channel in confirm mode, at most `window` unconfirmed.
async fn raw_amqprs(job: RawJob) -> Result<Duration, BoxError> {
    let connection = bench::raw_amqprs_connection(&job.url).await?;
    let channel = connection.open_channel(None).await?;
    let (confirms_tx, mut confirms) = mpsc::unbounded_channel();
    channel.register_callback(Confirms(confirms_tx)).await?;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await?;
    let args = BasicPublishArguments::new("", &job.queue);
    // delivery tags sent and not confirmed yet (the channel numbers from 1)
    let mut unconfirmed = BTreeSet::new();
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < u64::from(job.messages) || !unconfirmed.is_empty() {
        while sent < u64::from(job.messages) && unconfirmed.len() < job.window {
            channel
                .basic_publish(
                    BasicProperties::default(),
                    job.payload.to_vec(),
                    args.clone(),
                )
                .await?;
            sent += 1;
            unconfirmed.insert(sent);
        }
        // one confirm (waiting for it), then whatever else has arrived
        let mut next = confirms.recv().await;
        while let Some(confirm) = next {
            if !confirm.ack {
                return Err(format!("nack: {confirm:?}").into());
            }
            if confirm.multiple {
                unconfirmed = unconfirmed.split_off(&(confirm.delivery_tag + 1));
            } else {
                unconfirmed.remove(&confirm.delivery_tag);
            }
            next = confirms.try_recv().ok();
        }
        if confirms.is_closed() && confirms.is_empty() && !unconfirmed.is_empty() {
            return Err("the channel's callback is gone".into());
        }
    }
    let took = start.elapsed();
    channel.close().await?;
    connection.close().await?;
    Ok(took)
}
