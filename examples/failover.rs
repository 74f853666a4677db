//! A host list whose first host is dead: the client skips it and connects to the
//! next one, reporting each step on `watch()`.
//!
//! `cargo run --example failover`

use std::time::Duration;

use amqp_rebound::{Client, Event, Properties};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let good = std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_rebound::DEFAULT_URL.into());
    let good = good
        .split(',')
        .next()
        .unwrap_or(amqp_rebound::DEFAULT_URL)
        .to_string();
    // nothing listens on port 1
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f".to_string();
    let client = amqp_rebound::connect(
        Client::builder()
            .hosts([dead, good])
            .seed(3) // fixed seed: the same host order every run
            .connection_name("amqp-rebound example failover"),
    )?;
    let mut events = client.watch();
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::RecoveryFailed {
                    endpoint,
                    error,
                    retry_in,
                    ..
                } => println!("dial to {endpoint} failed ({error}); next try in {retry_in:?}"),
                Event::StateChanged {
                    object, from, to, ..
                } => {
                    println!("{object}: {from:?} -> {to:?}")
                }
                other => println!("{other:?}"),
            }
        }
    });
    let confirmation = tokio::time::timeout(
        Duration::from_secs(30),
        client.publish("", "rebound-failover", "hello", Properties::default()),
    )
    .await??;
    println!("published through the live host: {confirmation:?}");
    client.close().await;
    watcher.abort();
    Ok(())
}
