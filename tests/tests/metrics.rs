//! The facade's `examples/prometheus.rs`, run against the real broker at
//! `AMQP_URL`: its `/metrics` endpoint, scraped over HTTP, shows the publish
//! counters moving and the reconnect and recovery counters rising after its
//! relay cut the connections. The example kills only its own connections (its
//! relay), so the broker lock is shared.

#[allow(dead_code)] // its `main` is not run here
#[path = "../../examples/prometheus.rs"]
mod example;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use amqp_rebound_core::telemetry::names;
use amqp_rebound_tests::broker::{Access, BrokerLock, BrokerUrl, require_broker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape: each sample's value by its full series (`name{labels}`).
#[derive(Debug, Default)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// The samples of metric `name` (exactly that name), summed over labels.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// The sample of metric `name` whose labels include `label`.
    fn with(&self, name: &str, label: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
            .map(|(_, v)| *v)
    }
}

/// GET /metrics, by hand (HTTP/1.0: the server closes when done).
async fn scrape(addr: SocketAddr) -> Option<Scrape> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1."), "{head}");
    assert!(head.contains(" 200 "), "{head}");
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ')?;
        samples.insert(series.to_owned(), value.parse().ok()?);
    }
    Some(Scrape(samples))
}

/// Scrapes every 200 ms until `done` holds for a scrape, or panics at `limit`.
async fn scrape_until(
    addr: SocketAddr,
    limit: Duration,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = scrape(addr).await {
            if done(&s) {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no scrape within {limit:?} showed {what}; the last: {last:#?}");
}

#[test]
fn the_prometheus_example_shows_the_counters_moving_through_kills() {
    if !require_broker("metrics::the_prometheus_example") {
        return;
    }
    let _lock = BrokerLock::acquire(Access::Shared);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let url = BrokerUrl::from_env().url();
        let addr = example::metrics_address(0).expect("a free port");
        let run = example::run(
            &url,
            addr,
            Duration::from_secs(9),
            Duration::from_millis(2_500),
        );
        let checks = async {
            let published = names::PUBLISHED;
            let confirmed = names::CONFIRMED;
            let first = scrape_until(addr, Duration::from_secs(30), "confirms", |s| {
                s.sum(confirmed) > 0.0
            })
            .await;
            assert_eq!(first.sum(names::RECONNECTS), 0.0, "no kill yet: {first:#?}");
            let client = "client=\"amqp-rebound-prometheus-example\"";
            assert_eq!(
                first.with(names::CONNECTIONS, "state=\"ready\""),
                Some(1.0),
                "{first:#?}"
            );
            assert!(
                first.with(published, client).is_some(),
                "labelled by client"
            );
            // both counters move (a scrape can fall between a batch of confirms
            // and the publishes they make room for: wait for both)
            let second = scrape_until(
                addr,
                Duration::from_secs(10),
                "more publishes and confirms",
                |s| {
                    s.sum(confirmed) > first.sum(confirmed)
                        && s.sum(published) > first.sum(published)
                },
            )
            .await;
            assert!(second.sum(published) > first.sum(published));
            // the relay cuts every connection 2.5 s after the start
            let after_kill = scrape_until(addr, Duration::from_secs(20), "a recovery", |s| {
                s.sum(names::RECONNECTS) >= 1.0 && s.sum(names::RECOVERIES) >= 1.0
            })
            .await;
            assert!(
                after_kill
                    .with(names::RECONNECTS, "host=\"127.0.0.1:")
                    .is_some_and(|v| v >= 1.0),
                "labelled by host: {after_kill:#?}"
            );
            let recovered = scrape_until(addr, Duration::from_secs(10), "confirms after it", |s| {
                s.sum(confirmed) > after_kill.sum(confirmed)
            })
            .await;
            assert!(recovered.sum(&format!("{}_count", names::RECOVERY_STALL)) >= 1.0);
            assert!(recovered.sum(&format!("{}_count", names::CONFIRM_LATENCY)) >= 1.0);
            assert!(recovered.sum(&format!("{}_count", names::DIAL_DURATION)) >= 2.0);
            assert!(
                recovered.0.keys().all(|series| !series.contains("guest:")),
                "no credentials in any label"
            );
            recovered
        };
        let (stats, last) = tokio::join!(run, checks);
        let stats = stats.expect("the example ran");
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(stats.confirmed as f64 >= last.sum(names::CONFIRMED));
        assert_eq!(stats.timed_out, 0, "{stats:?}");
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}
