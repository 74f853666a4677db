//! Failover stall across the 3-node cluster of `scripts/cluster`: the time from
//! the loss of the client's connection (its node's app stopped) to the next
//! confirmed publish, over many node stops, per transport. Prints p50 / p99.
//! Targets: p50 <= 500 ms, p99 <= 1.5 s.
//!
//! The stall is measured from the moment the client sees its connection lost
//! (the node closes it about 0.2 s into `stop_app`) to the first publish
//! confirmed after its channel is Ready again. A bench, not a test (a few
//! minutes); it ends with one JSON line of the figures:
//!
//! ```text
//! scripts/cluster up
//! cargo run --release -p amqp-rebound-tests --bin bench_cluster -- [--stops 12] [--transport lapin|amqprs|all] [--reset-ms MS]
//! scripts/cluster down
//! ```
//!
//! `--reset-ms` overrides the backoff's `reset_after` (default: the library's).
//!
//! The client publishes 1,000 persistent messages a second (at most 1,000
//! unresolved) to a quorum queue capped at 10,000 messages (`x-max-length`, the
//! oldest dropped), on a pool of 1 connection x 4 channels. For each stop the
//! bench finds the node the client's connection is on (`list_connections`),
//! stops its app, measures, starts it again and waits for it to boot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::{
    BackoffConfig, Client, Confirmation, Event, FieldTable, Properties, QueueDecl, Transport,
};
use amqp_rebound_tests::cluster::{
    Cluster, EventLog, client, is_channel_ready, lock, quantile, unique,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

#[derive(Debug)]
struct Args {
    stops: usize,
    transports: Vec<String>,
    reset_after: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        stops: 12,
        transports: vec!["lapin".into(), "amqprs".into()],
        reset_after: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--stops" => args.stops = value()?.parse().map_err(|e| format!("--stops: {e}"))?,
            "--transport" => {
                args.transports = match value()?.as_str() {
                    "all" => vec!["lapin".into(), "amqprs".into()],
                    t @ ("lapin" | "amqprs") => vec![t.into()],
                    t => return Err(format!("--transport: unknown transport {t}")),
                }
            }
            "--reset-ms" => {
                let ms = value()?.parse().map_err(|e| format!("--reset-ms: {e}"))?;
                args.reset_after = Some(Duration::from_millis(ms));
            }
            "-h" | "--help" => {
                return Err(
                    "usage: bench_cluster [--stops N] [--transport lapin|amqprs|all] \
                            [--reset-ms MS]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.stops == 0 {
        return Err("--stops must be at least 1".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut figures = Vec::new();
    for transport in &args.transports {
        let figure = runtime.block_on(async {
            match transport.as_str() {
                "lapin" => {
                    failover_stall(amqp_rebound_lapin::LapinTransport::new, "lapin", &args).await
                }
                _ => {
                    failover_stall(amqp_rebound_amqprs::AmqprsTransport::new, "amqprs", &args).await
                }
            }
        });
        figures.push(figure);
    }
    println!("{{\"cluster_failover\":[{}]}}", figures.join(","));
}

/// When each confirm arrived, and the failures.
#[derive(Default)]
struct Confirms {
    at: Vec<Instant>,
    failed: Vec<String>,
}

/// Runs the stops for one transport; returns its figures as a JSON object.
async fn failover_stall<T: Transport>(
    make: impl Fn() -> T,
    transport: &str,
    args: &Args,
) -> String {
    let test = format!("bench_cluster::{transport}");
    let cluster = Cluster::acquire(&test);
    let stops = args.stops;
    let reset_after = args.reset_after;
    let started = Instant::now();
    let name = unique(&format!("{transport}-bench"));
    let client = client(make(), &name, |b| {
        let b = b.pool(1, 4).publish_timeout(Duration::from_secs(120));
        match reset_after {
            Some(reset_after) => b.backoff(BackoffConfig {
                reset_after,
                ..BackoffConfig::default()
            }),
            None => b,
        }
    });
    let events = EventLog::start(&client);
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(10_000));
    client
        .declare_queue(QueueDecl {
            arguments,
            ..QueueDecl::durable(&name)
        })
        .await
        .expect("declare the bench queue");

    let confirms = Arc::new(Mutex::new(Confirms::default()));
    let publisher = tokio::spawn(publish_steadily(
        client.clone(),
        name.clone(),
        Arc::clone(&confirms),
    ));

    let mut stalls = Vec::new();
    let mut reconnects = Vec::new();
    for stop in 1..=stops {
        let (node, since, lost) = cluster.stop_client_node(&name, &events).await;
        let ready = events
            .wait_for(
                lost,
                Duration::from_secs(60),
                "channel ready",
                is_channel_ready,
            )
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = loop {
            let found = {
                let c = lock(&confirms);
                let i = c.at.partition_point(|t| *t <= ready);
                c.at.get(i).copied()
            };
            if let Some(first) = found {
                break first;
            }
            assert!(
                Instant::now() < deadline,
                "no confirm within 60 s of recovery"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let first_delay = events
            .snapshot()
            .into_iter()
            .find_map(|(at, e)| match e {
                // the loss's own report comes just before the state change
                Event::RecoveryFailed { retry_in, .. } if at >= since => Some(retry_in),
                _ => None,
            })
            .unwrap_or_default();
        stalls.push(first - lost);
        reconnects.push(ready - lost);
        eprintln!(
            "{test}: stop {stop:>2}: {node}: stall {:>5} ms (channel ready after {:>5} ms; \
             backoff delay after the loss {:>5} ms)",
            (first - lost).as_millis(),
            (ready - lost).as_millis(),
            first_delay.as_millis()
        );
        cluster.start_app(node).await;
    }
    publisher.abort();
    let failed = lock(&confirms).failed.clone();
    assert!(failed.is_empty(), "publishes failed: {failed:?}");
    let p = |q| quantile(&stalls, q).as_millis();
    let r = |q| quantile(&reconnects, q).as_millis();
    eprintln!(
        "{test}: failover stall over {stops} node stops: p50 {} ms, p99 {} ms, max {} ms \
         (loss -> channel ready: p50 {} ms, p99 {} ms); backoff reset_after {:?}; total {:.1} s",
        p(0.5),
        p(0.99),
        p(1.0),
        r(0.5),
        r(0.99),
        reset_after.unwrap_or(BackoffConfig::default().reset_after),
        started.elapsed().as_secs_f64()
    );
    let _ = client.delete_queue(name.as_str()).await;
    client.close().await;
    format!(
        "{{\"transport\":\"{transport}\",\"stops\":{stops},\"stall_p50_ms\":{},\
         \"stall_p99_ms\":{},\"stall_max_ms\":{},\"ready_p50_ms\":{},\"ready_p99_ms\":{},\
         \"reset_after_ms\":{}}}",
        p(0.5),
        p(0.99),
        p(1.0),
        r(0.5),
        r(0.99),
        reset_after
            .unwrap_or(BackoffConfig::default().reset_after)
            .as_millis()
    )
}

/// One publish per millisecond, at most 1,000 unresolved, until aborted.
async fn publish_steadily(client: Client, queue: String, confirms: Arc<Mutex<Confirms>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = tick.tick(), if in_flight.len() < 1_000 => {
                let (client, queue) = (client.clone(), queue.clone());
                in_flight.push(async move {
                    client
                        .publish("", &queue, vec![b'b'; 64], Properties::default().persistent())
                        .await
                });
            }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                let mut c = lock(&confirms);
                match result {
                    Ok(Confirmation::Confirmed) => c.at.push(Instant::now()),
                    other => c.failed.push(format!("{other:?}")),
                }
            }
        }
    }
}
