//! The driver on an executor that is not tokio: `futures::executor::ThreadPool`
//! for the driver and the application, and a `Timer` built on plain threads. The
//! core never assumes a runtime; only the transport you pick might (lapin and
//! amqprs need tokio; this example uses the loopback transport).
//!
//! `cargo run --example custom_runtime`

#[path = "shared/loopback.rs"]
mod loopback;

use amqp_rebound::{Client, Properties};
use futures::task::SpawnExt;
use loopback::{LoopbackTransport, ThreadTimer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let executor = futures::executor::ThreadPool::new()?;
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:guest@loopback:5672/%2f"])
        .build(LoopbackTransport::default(), ThreadTimer)?;
    let driver = executor.spawn_with_handle(driver)?;
    let confirmed = futures::executor::block_on(async {
        let mut confirmed = 0;
        for n in 0..100 {
            client
                .publish("", "jobs", format!("{n}"), Properties::default())
                .await?;
            confirmed += 1;
        }
        client.close().await;
        Ok::<_, amqp_rebound::PublishError>(confirmed)
    })?;
    futures::executor::block_on(driver);
    println!("{confirmed} messages confirmed on a futures ThreadPool, no tokio");
    Ok(())
}
