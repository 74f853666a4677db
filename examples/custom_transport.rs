//! A transport of your own: implement `Transport`, `Connection` and `Channel`
//! (here a loopback that confirms everything at once, in `shared/loopback.rs`)
//! and the whole client — pool, outbox, confirms, topology — runs over it.
//!
//! `cargo run --example custom_transport`

#[path = "shared/loopback.rs"]
mod loopback;

use amqp_rebound::{Client, Properties, QueueDecl};
use loopback::{LoopbackTransport, ThreadTimer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transport = LoopbackTransport::default();
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:secret@loopback:5672/%2f"])
        .pool(1, 2)
        .build(transport.clone(), ThreadTimer)?;
    let mut pool = futures::executor::LocalPool::new();
    futures::task::LocalSpawnExt::spawn_local(&pool.spawner(), driver)?;
    pool.run_until(async {
        client.declare_queue(QueueDecl::durable("demo")).await?;
        for n in 0..10 {
            let confirmation = client
                .publish("", "demo", format!("message {n}"), Properties::default())
                .await?;
            println!("message {n}: {confirmation:?}");
        }
        println!("stats: {:?}", client.stats());
        client.close().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    println!(
        "the transport saw {} publishes",
        transport.published.lock().unwrap().len()
    );
    Ok(())
}
