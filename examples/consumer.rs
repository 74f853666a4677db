//! Consumes from the example queue (fill it with the `publisher` example), acking
//! each message, until `[messages]` arrived or the queue stays empty for 2 s.
//!
//! `cargo run --example consumer -- [messages]` (default 10,000)

use std::time::Duration;

use amqp_rebound::{AckError, Client, ConsumeOptions, QueueDecl};

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
            .connection_name("amqp-rebound example consumer"),
    )?;
    let queue = client
        .declare_queue(QueueDecl::durable("rebound-example"))
        .await?;
    let options = ConsumeOptions {
        prefetch: Some(500),
        ..ConsumeOptions::default()
    };
    let mut consumer = client.consume(&queue, options).await?;
    let (mut received, mut stale) = (0, 0);
    while received < n {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await else {
            break; // nothing for 2 s: the queue is drained
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        match delivery.ack().await {
            Ok(()) => received += 1,
            // its channel was recovered: the broker redelivers it
            Err(AckError::Stale) => stale += 1,
            Err(e) => return Err(e.into()),
        }
    }
    println!("received and acked {received} messages ({stale} stale acks refused)");
    client.close().await;
    Ok(())
}
