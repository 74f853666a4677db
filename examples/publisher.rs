//! Publishes confirmed messages through lapin to the broker at `AMQP_URL` and
//! prints what happened. Kill the broker's connections while it runs
//! (`rabbitmqctl close_all_connections`): every message still ends confirmed.
//!
//! `cargo run --example publisher -- [messages]` (default 10,000)

use std::time::Instant;

use amqp_rebound::{Client, Properties, QueueDecl};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        None => 10_000,
        Some(arg) => arg
            .parse()
            .map_err(|e| format!("[messages] must be a whole number, not {arg:?}: {e}"))?,
    };
    let client = amqp_rebound::connect(
        Client::builder()
            .from_env()
            .connection_name("amqp-rebound example publisher"),
    )?;
    let queue = client
        .declare_queue(QueueDecl::durable("rebound-example"))
        .await?;
    let start = Instant::now();
    // keep up to 1,000 publishes in flight: confirms are pipelined
    let mut in_flight = FuturesUnordered::new();
    let mut confirmed = 0;
    for i in 0..n {
        let client = client.clone();
        let queue = queue.name();
        in_flight.push(async move {
            let properties = Properties::default()
                .persistent()
                .with_message_id(i.to_string());
            client
                .publish("", &queue, format!("message {i}"), properties)
                .await
        });
        if in_flight.len() >= 1_000 {
            in_flight.next().await.transpose()?;
            confirmed += 1;
        }
    }
    while let Some(result) = in_flight.next().await {
        result?;
        confirmed += 1;
    }
    let took = start.elapsed();
    println!(
        "{confirmed} messages confirmed in {took:.2?} ({:.0} msg/s)",
        confirmed as f64 / took.as_secs_f64()
    );
    println!("{:?}", client.stats());
    client.close().await;
    Ok(())
}
