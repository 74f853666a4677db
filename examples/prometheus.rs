//! Serves the client's metrics to Prometheus while it publishes through
//! connection kills.
//!
//! ```text
//! cargo run --example prometheus --features metrics -- [PORT] [SECONDS]
//! curl -s http://127.0.0.1:PORT/metrics | grep amqp_rebound
//! ```
//!
//! `PORT` is where `/metrics` is served on 127.0.0.1 (default 0: a free port,
//! printed); `SECONDS` how long it publishes (default 30). The broker is
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! The client reaches the broker through a TCP relay in this process, which
//! cuts its connections every 3 s: the reconnect, recovery and stall metrics
//! move without touching any other client of the broker (and without
//! `rabbitmqctl`).
//!
//! The recorder is installed before the client is built: the client registers
//! its hot-path metrics once, when it is built.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rebound::{AMQPValue, Client, FieldTable, Properties, QueueDecl, Stats};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Upper bounds (seconds) of the histograms' buckets: from a fast confirm to a
/// long outage. Set, they are Prometheus histograms (aggregatable across
/// instances) rather than summaries.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args().nth(1).map_or(Ok(0), |a| a.parse())?;
    let seconds: u64 = std::env::args().nth(2).map_or(Ok(30), |a| a.parse())?;
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_rebound::DEFAULT_URL.into());
    let addr = metrics_address(port)?;
    println!("serving metrics on http://{addr}/metrics");
    let stats = run(
        &url,
        addr,
        Duration::from_secs(seconds),
        Duration::from_secs(3),
    )
    .await?;
    println!("{stats:?}");
    Ok(())
}

/// 127.0.0.1:`port`, or a port free now for 0 (the exporter binds it itself and
/// cannot say which one it got).
pub fn metrics_address(port: u16) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    listener.local_addr()
}

/// Serves the metrics on `metrics`, and publishes to the broker at `url` for
/// `duration` through a relay that cuts every connection each `kill_every`.
pub async fn run(
    url: &str,
    metrics: SocketAddr,
    duration: Duration,
    kill_every: Duration,
) -> Result<Stats, Box<dyn std::error::Error>> {
    PrometheusBuilder::new()
        .with_http_listener(metrics)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install()?;

    let relay = Relay::start(url).await?;
    let client = amqp_rebound::connect(
        Client::builder()
            .hosts([relay.url.as_str()])
            .connection_name("amqp-rebound-prometheus-example"),
    )?;
    client.connected().await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(10_000));
    arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    let queue = client
        .declare_queue(QueueDecl {
            name: "amqp-rebound.prometheus-example".into(),
            arguments,
            ..QueueDecl::default()
        })
        .await?;

    let publishing = async {
        // 20 messages every 10 ms, at most 2,000 awaiting their confirm
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut in_flight = FuturesUnordered::new();
        let mut i = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick(), if in_flight.len() < 2_000 => {
                    for _ in 0..20 {
                        i += 1;
                        in_flight.push(client.publish(
                            "",
                            &queue.name(),
                            format!("message {i}"),
                            Properties::default(),
                        ));
                    }
                }
                Some(result) = in_flight.next() => {
                    if let Err(e) = result {
                        eprintln!("publish failed: {e}");
                    }
                }
            }
        }
    };
    let killing = async {
        loop {
            tokio::time::sleep(kill_every).await;
            let cut = relay.cut();
            println!("relay: cut {cut} connections; {:?}", client.state());
        }
    };
    tokio::select! {
        () = publishing => {}
        () = killing => {}
        () = tokio::time::sleep(duration) => {}
    }
    let stats = client.stats();
    client.close().await;
    Ok(stats)
}

/// A TCP relay in front of the broker: `cut()` drops every connection through
/// it, as a network failure would.
struct Relay {
    /// `url` with the relay's address instead of the broker's.
    url: String,
    live: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(url: &str) -> Result<Relay, Box<dyn std::error::Error>> {
        let mut proxied = url::Url::parse(url)?;
        let host = proxied.host_str().ok_or("the broker URL has no host")?;
        let port = proxied.port().unwrap_or(5672);
        let broker = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or("the broker's host does not resolve")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        proxied
            .set_host(Some("127.0.0.1"))
            .map_err(|e| e.to_string())?;
        proxied
            .set_port(Some(local.port()))
            .map_err(|()| "the broker URL takes no port")?;
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let tasks = Arc::clone(&live);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut tasks = tasks.lock().unwrap_or_else(|p| p.into_inner());
                tasks.retain(|t| !t.is_finished());
                tasks.push(task.abort_handle());
            }
        });
        Ok(Relay {
            url: proxied.to_string(),
            live,
        })
    }

    /// Drops every connection through the relay; how many.
    fn cut(&self) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let n = live.iter().filter(|t| !t.is_finished()).count();
        for task in live.drain(..) {
            task.abort();
        }
        n
    }
}
