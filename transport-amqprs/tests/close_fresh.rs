//! Closing clients while their channels' first requests are in flight panics
//! none of amqprs's tasks. amqprs's channel dispatcher `unwrap`s the reply
//! channel of a request whose future was dropped while it registered; the
//! adapter runs every request to its end in a task of its own. Against the real
//! broker at `AMQP_URL`; its own binary, because it counts every panic of the
//! process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_core::{Client, TokioTimer};
use amqp_rebound_tests::broker::{Access, BrokerLock, BrokerUrl, broker_reachable};

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_fresh_clients_panics_no_amqprs_task() {
    let _lock = BrokerLock::acquire(Access::Shared);
    let broker = BrokerUrl::from_env();
    assert!(
        broker_reachable(&broker),
        "no broker at {}: this test needs one",
        broker.authority()
    );
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let baseline = tasks();
    for i in 0..30u64 {
        let (client, driver) = Client::builder()
            .hosts([broker.url()])
            .pool(2, 4)
            .build(AmqprsTransport::new(), TokioTimer)
            .expect("config");
        tokio::spawn(driver);
        // closed while its channels open and select confirms, or once Ready
        if i % 2 == 0 {
            let ready = tokio::time::timeout(Duration::from_secs(10), client.connected()).await;
            assert!(matches!(ready, Ok(Ok(()))), "{ready:?}");
        } else {
            tokio::time::sleep(Duration::from_millis(i)).await;
        }
        tokio::time::timeout(Duration::from_secs(10), client.close())
            .await
            .expect("the close returns");
    }
    // every task of the clients and of amqprs ran to its end (a panic among
    // them has happened by then). The last closes wait for the broker's
    // close-ok: the check polls every 10 ms rather than spinning (a spin takes
    // a core from the broker that must answer them, on a 2-core machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tasks() > baseline && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tasks(), baseline, "tasks of the closed clients still run");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "amqprs tasks panicked");
}
