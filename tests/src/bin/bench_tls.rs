//! TLS beside plain, in one run, over both transports: amqp-rebound's
//! throughput and its recovery stall over the broker's plain listener
//! (`AMQP_URL`) and over its TLS listener (`AMQPS_URL`, trusting the test CA in
//! `REBOUND_TLS_DIR`: what `scripts/test` sets up, see `scripts/lib/tls.sh`).
//!
//! 1. **Throughput with confirms**: N messages through amqp-rebound 1 x 1 (the
//!    caller keeps at most `window` unconfirmed), plain and TLS in every round,
//!    the first side alternating; median rates, CPU per message, and the median
//!    TLS / plain ratio of the rounds with a 95% bootstrap interval.
//! 2. **Recovery**: `kills` x `close_all_connections` under a
//!    steady publisher (the same loop as `bench_lapin` and `bench_amqprs`), over
//!    plain and over TLS: stall p50 / p99 / max, lost, duplicates.
//!
//! Then one JSON line with every figure. Takes the broker lock exclusively.
//!
//! ```text
//! AMQPS_URL=amqps://guest:guest@localhost:5671/%2f REBOUND_TLS_DIR=/tmp/amqp-rebound-tls \
//! cargo run --release -p amqp-rebound-tests --bin bench_tls -- \
//!     [--messages 50000] [--window 1024] [--rounds 16] [--kills 20] [--payload 128]
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_core::transport::{ConnectOptions, Transport};
use amqp_rebound_core::{
    Client, Confirmation, Endpoint, Properties, QueueDecl, TlsConfig, TransportError,
};
use amqp_rebound_lapin::LapinTransport;
use amqp_rebound_tests::bench::{self, Args, BoxError, Recovery};
use amqp_rebound_tests::broker::BrokerUrl;
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;

fn main() {
    bench::main("bench_tls", |args, plain| async move {
        let tls = amqp_rebound_tests::tls::require_tls("bench_tls").ok_or(
            "no TLS listener: set AMQPS_URL and REBOUND_TLS_DIR (scripts/test sets one up)",
        )?;
        let config = tls.trusting_ca();
        let mut report = serde_json::Map::new();
        report.insert("bench".into(), json!("bench_tls"));
        report.insert(
            "args".into(),
            json!({
                "messages": args.messages, "window": args.window, "rounds": args.rounds,
                "kills": args.kills, "payload": args.payload,
            }),
        );
        let lapin = compare(
            "lapin",
            &args,
            &plain,
            &tls.url,
            &|| LapinTransport::new(),
            &|| WithTls::new(LapinTransport::new(), &config),
        )
        .await?;
        report.insert("lapin".into(), lapin);
        let amqprs = compare(
            "amqprs",
            &args,
            &plain,
            &tls.url,
            &|| AmqprsTransport::new(),
            &|| WithTls::new(AmqprsTransport::new(), &config),
        )
        .await?;
        report.insert("amqprs".into(), amqprs);
        println!("{}", serde_json::Value::Object(report));
        Ok(())
    });
}

/// A transport that dials with a TLS configuration of its own, whatever the
/// client asks: the recovery loop of `amqp_rebound_tests::bench` builds its
/// clients itself, and this gives them the test CA.
struct WithTls<T> {
    inner: T,
    tls: TlsConfig,
}

impl<T> WithTls<T> {
    fn new(inner: T, tls: &TlsConfig) -> Self {
        WithTls {
            inner,
            tls: tls.clone(),
        }
    }
}

#[async_trait]
impl<T: Transport> Transport for WithTls<T> {
    type Connection = T::Connection;

    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<T::Connection, TransportError> {
        let mut options = options.clone();
        options.tls = Some(self.tls.clone());
        self.inner.connect(endpoint, &options).await
    }

    fn reports_blocked(&self) -> bool {
        self.inner.reports_blocked()
    }

    fn check_message(&self, message: &amqp_rebound_core::Message) -> Result<(), String> {
        self.inner.check_message(message)
    }
}

/// Throughput and recovery over plain and TLS for one transport; prints them and
/// returns them as JSON.
async fn compare<P, PM, S, SM>(
    name: &str,
    args: &Args,
    plain: &BrokerUrl,
    tls: &BrokerUrl,
    plain_transport: &PM,
    tls_transport: &SM,
) -> Result<serde_json::Value, BoxError>
where
    P: Transport,
    PM: Fn() -> P,
    S: Transport,
    SM: Fn() -> S,
{
    println!(
        "{name}: throughput, {} messages of {} B with confirms, window {}, rebound 1x1, {} rounds",
        args.messages, args.payload, args.window, args.rounds
    );
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let (mut plains, mut tlss) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // the first side alternates, so neither gets the broker's first or
        // second place in every round
        let (p, s) = if round % 2 == 1 {
            let p = publish_run(plain_transport(), plain, args, &payload).await?;
            (p, publish_run(tls_transport(), tls, args, &payload).await?)
        } else {
            let s = publish_run(tls_transport(), tls, args, &payload).await?;
            (
                publish_run(plain_transport(), plain, args, &payload).await?,
                s,
            )
        };
        println!(
            "  round {round}: plain {:>7.0}/s {:>5.1} us   tls {:>7.0}/s {:>5.1} us ({:.3})",
            p.0,
            p.1,
            s.0,
            s.1,
            s.0 / p.0
        );
        plains.push(p);
        tlss.push(s);
    }
    let mut ratios: Vec<f64> = plains.iter().zip(&tlss).map(|(p, s)| s.0 / p.0).collect();
    let ratio_ci = bench::median_interval(&ratios);
    let ratio = bench::median(&mut ratios);
    let med = |runs: &[(f64, f64)], cpu: bool| {
        bench::median(
            &mut runs
                .iter()
                .map(|r| if cpu { r.1 } else { r.0 })
                .collect::<Vec<_>>(),
        )
    };
    let (plain_rate, plain_cpu) = (med(&plains, false), med(&plains, true));
    let (tls_rate, tls_cpu) = (med(&tlss, false), med(&tlss, true));
    println!(
        "{name}: median plain {plain_rate:.0}/s {plain_cpu:.1} us/msg, tls {tls_rate:.0}/s \
         {tls_cpu:.1} us/msg; tls / plain {ratio:.3} (95% interval {:.3}-{:.3})",
        ratio_ci.0, ratio_ci.1
    );
    let mut recoveries = Vec::new();
    for (side, url) in [("plain", plain), ("tls", tls)] {
        let recovery = if side == "plain" {
            bench::recovery(
                &format!("tls-{name}-plain"),
                url,
                Duration::from_secs(1),
                bench::Pool::Default,
                args.kills,
                false,
                10_000,
                args.payload,
                plain_transport,
            )
            .await?
        } else {
            bench::recovery(
                &format!("tls-{name}-tls"),
                url,
                Duration::from_secs(1),
                bench::Pool::Default,
                args.kills,
                false,
                10_000,
                args.payload,
                tls_transport,
            )
            .await?
        };
        println!(
            "{name} {side}: recovery over {} kills: stall p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
             lost {}, duplicates {}, not confirmed {}",
            recovery.kills.len(),
            recovery.p50_ms,
            recovery.p99_ms,
            recovery.max_ms,
            recovery.lost(),
            recovery.duplicates(),
            recovery.not_confirmed
        );
        recoveries.push((side, recovery));
    }
    let recovery_json = |r: &Recovery| {
        json!({
            "kills": r.kills.len(), "stall_p50_ms": bench::number(r.p50_ms, 1),
            "stall_p99_ms": bench::number(r.p99_ms, 1), "stall_max_ms": bench::number(r.max_ms, 1),
            "lost": r.lost(), "duplicates": r.duplicates(), "not_confirmed": r.not_confirmed,
        })
    };
    Ok(json!({
        "plain": {
            "rate": bench::number(plain_rate, 0), "cpu_us": bench::number(plain_cpu, 2),
            "rates": plains.iter().map(|r| bench::number(r.0, 0)).collect::<Vec<_>>(),
            "recovery": recovery_json(&recoveries[0].1),
        },
        "tls": {
            "rate": bench::number(tls_rate, 0), "cpu_us": bench::number(tls_cpu, 2),
            "rates": tlss.iter().map(|r| bench::number(r.0, 0)).collect::<Vec<_>>(),
            "recovery": recovery_json(&recoveries[1].1),
        },
        "ratio_tls_plain": bench::number(ratio, 3),
        "ratio_tls_plain_ci95": [bench::number(ratio_ci.0, 3), bench::number(ratio_ci.1, 3)],
    }))
}

/// One throughput run: a 1 x 1 client, `args.messages` publishes to a
/// server-named queue with at most `args.window` unconfirmed, every one
/// confirmed. Returns the rate (messages per second, first publish to last
/// confirm) and the process's CPU time per message in microseconds.
async fn publish_run<T: Transport>(
    transport: T,
    url: &BrokerUrl,
    args: &Args,
    payload: &Bytes,
) -> Result<(f64, f64), BoxError> {
    let client = bench::start_client(
        url,
        Client::builder().pool(1, 1).confirm_window(args.window),
        transport,
    );
    bench::ready(&client).await?;
    let queue = client.declare_queue(QueueDecl::server_named()).await?;
    let queue = queue.name();
    let cpu = bench::process_cpu();
    let start = Instant::now();
    let mut in_flight = VecDeque::with_capacity(args.window);
    let mut sent = 0;
    while sent < args.messages || !in_flight.is_empty() {
        while sent < args.messages && in_flight.len() < args.window {
            in_flight.push_back(client.publish("", &queue, payload.clone(), Properties::default()));
            sent += 1;
        }
        if let Some(oldest) = in_flight.pop_front() {
            let result = oldest.await;
            if result != Ok(Confirmation::Confirmed) {
                return Err(format!("not confirmed: {result:?}").into());
            }
        }
    }
    let took = start.elapsed();
    let cpu = bench::process_cpu().saturating_sub(cpu);
    client.close().await;
    let messages = f64::from(args.messages);
    Ok((
        messages / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / messages,
    ))
}
