//! Side-by-side figures on the real broker at `AMQP_URL`, in one run:
//!
//! 1. **Throughput with confirms**: N messages through raw lapin (one channel,
//!    pipelined: at most `window` unconfirmed) and through amqp-rebound over
//!    lapin (1 connection x 1 channel, same confirm window; then the default pool,
//!    1 x 4). Each is run `rounds` times, interleaved (raw lapin first in odd
//!    rounds, last in even ones); the medians and the median of the rounds' ratios
//!    rebound / raw are printed (target >= 0.95), with this process's CPU time
//!    per message (user + system, every thread): the machine is shared, so the
//!    rates move with other people's load, the CPU cost much less.
//! 2. **Recovery stall**: a client publishing steadily while
//!    `rabbitmqctl close_all_connections` kills its connection `kills` times; the
//!    stall is the time from the client seeing the loss to the first publish
//!    confirmed on the new connection. p50 / p99 are printed (targets 100 ms /
//!    300 ms).
//!
//! Then one JSON line with every figure. It takes the broker lock exclusively (it
//! kills every connection), so it never overlaps the conformance suite.
//!
//! ```text
//! cargo run --release -p amqp-rebound-tests --bin bench_lapin -- \
//!     [--messages 50000] [--window 1024] [--rounds 5] [--kills 20] [--payload 128]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rebound_core::{
    BackoffConfig, Client, Confirmation, Event, Phase, Properties, QueueDecl, TokioTimer,
};
use amqp_rebound_lapin::LapinTransport;
use amqp_rebound_tests::broker::{self, Access, BrokerLock, BrokerUrl, unique};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ConnectionProperties};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    messages: u32,
    window: usize,
    rounds: usize,
    kills: usize,
    payload: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            messages: 50_000,
            window: 1024,
            rounds: 5,
            kills: 20,
            payload: 128,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("{flag} needs a value"))?
                    .parse::<usize>()
                    .map_err(|e| format!("{flag}: {e}"))
            };
            match flag.as_str() {
                "--messages" => args.messages = value()? as u32,
                "--window" => args.window = value()?.max(1),
                "--rounds" => args.rounds = value()?.max(1),
                "--kills" => args.kills = value()?,
                "--payload" => args.payload = value()?,
                "-h" | "--help" => {
                    return Err(
                        "usage: bench_lapin [--messages N] [--window W] [--rounds R] \
                                [--kills K] [--payload BYTES]"
                            .into(),
                    );
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(args)
    }
}

fn main() {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let url = BrokerUrl::from_env();
    if !broker::broker_reachable(&url) {
        eprintln!("no broker at {}", url.authority());
        std::process::exit(1);
    }
    let _lock = BrokerLock::acquire(Access::Exclusive);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(args, url)) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args, url: BrokerUrl) -> Result<(), BoxError> {
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let admin = raw_connection(&url.url()).await?;
    let admin_channel = admin.create_channel().await?;
    let queue = unique("bench");
    println!(
        "throughput: {} messages of {} B with confirms, window {}, {} rounds (median)",
        args.messages, args.payload, args.window, args.rounds
    );
    let mut raw: Vec<Run> = Vec::new();
    let mut single: Vec<Run> = Vec::new();
    let mut pooled: Vec<Run> = Vec::new();
    for round in 1..=args.rounds {
        // Odd rounds run raw lapin first, even rounds last, so a drift in the
        // machine's load (it is shared) does not favour one side.
        let raw_run = || {
            timed(&admin_channel, &queue, args.messages, || {
                raw_lapin(&url, &queue, args.messages, args.window, &payload)
            })
        };
        let mut r = None;
        if round % 2 == 1 {
            r = Some(raw_run().await?);
        }
        let s = timed(&admin_channel, &queue, args.messages, || {
            rebound(
                &url,
                &queue,
                args.messages,
                args.window,
                &payload,
                Some((1, 1)),
            )
        })
        .await?;
        let p = timed(&admin_channel, &queue, args.messages, || {
            rebound(&url, &queue, args.messages, args.window, &payload, None)
        })
        .await?;
        let r = match r {
            Some(r) => r,
            None => raw_run().await?,
        };
        println!(
            "  round {round}: raw lapin {:>7.0}/s {:>5.1} us   rebound 1x1 {:>7.0}/s {:>5.1} us ({:.3})   \
             rebound 1x4 {:>7.0}/s {:>5.1} us ({:.3})",
            r.rate,
            r.cpu_us,
            s.rate,
            s.cpu_us,
            s.rate / r.rate,
            p.rate,
            p.cpu_us,
            p.rate / r.rate
        );
        raw.push(r);
        single.push(s);
        pooled.push(p);
    }
    let ratios = |runs: &[Run]| {
        let mut v: Vec<f64> = runs
            .iter()
            .zip(&raw)
            .map(|(a, r)| a.rate / r.rate)
            .collect();
        median(&mut v)
    };
    let (single_ratio, pooled_ratio) = (ratios(&single), ratios(&pooled));
    let rates = |runs: &[Run]| median(&mut runs.iter().map(|r| r.rate).collect::<Vec<_>>());
    let cpus = |runs: &[Run]| median(&mut runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>());
    let (raw_cpu, single_cpu, pooled_cpu) = (cpus(&raw), cpus(&single), cpus(&pooled));
    let (raw, single, pooled) = (rates(&raw), rates(&single), rates(&pooled));
    println!("  medians: raw lapin             {raw:>8.0} msg/s   {raw_cpu:>5.1} us CPU/msg");
    println!(
        "           amqp-rebound 1x1      {single:>8.0} msg/s   {single_cpu:>5.1} us CPU/msg   \
         ratio {single_ratio:.3} (median of the rounds' ratios; target >= 0.95)"
    );
    println!(
        "           amqp-rebound pool 1x4 {pooled:>8.0} msg/s   {pooled_cpu:>5.1} us CPU/msg   \
         ratio {pooled_ratio:.3}"
    );
    let _ = admin_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = admin.close(200, "bench done".into()).await;

    let stalls = if args.kills > 0 {
        recovery_stalls(&url, args.kills, &payload).await?
    } else {
        Vec::new()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut sorted: Vec<f64> = stalls.iter().map(|&d| ms(d)).collect();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    if !sorted.is_empty() {
        println!(
            "recovery stall after close_all_connections ({} kills, default pool 1x4, \
             backoff reset_after 1 s):",
            sorted.len()
        );
        println!(
            "  p50 {p50:.1} ms (target <= 100)   p99 {p99:.1} ms (target <= 300)   max {max:.1} ms"
        );
    }
    let samples: Vec<String> = stalls.iter().map(|&d| format!("{:.1}", ms(d))).collect();
    println!(
        "{{\"bench\":\"lapin\",\"messages\":{},\"payload_bytes\":{},\"window\":{},\"rounds\":{},\
         \"raw_lapin_msgs_per_s\":{raw:.0},\"rebound_1x1_msgs_per_s\":{single:.0},\
         \"rebound_default_pool_msgs_per_s\":{pooled:.0},\"ratio_1x1\":{:.3},\
         \"ratio_default_pool\":{:.3},\"raw_lapin_cpu_us_per_msg\":{raw_cpu:.1},\
         \"rebound_1x1_cpu_us_per_msg\":{single_cpu:.1},\
         \"rebound_default_pool_cpu_us_per_msg\":{pooled_cpu:.1},\"stall_kills\":{},\"stall_p50_ms\":{},\
         \"stall_p99_ms\":{},\"stall_max_ms\":{},\"stall_samples_ms\":[{}]}}",
        args.messages,
        args.payload,
        args.window,
        args.rounds,
        single_ratio,
        pooled_ratio,
        sorted.len(),
        json(p50),
        json(p99),
        json(max),
        samples.join(",")
    );
    Ok(())
}

/// One run: messages per second, and this process's CPU time per message (user
/// + system, all threads) in microseconds.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
}

/// CPU time of this process so far (every thread).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Declares a fresh `queue`, runs `publish`, checks the queue holds every
/// message, deletes it.
async fn timed<F, Fut>(
    admin: &lapin::Channel,
    queue: &str,
    messages: u32,
    publish: F,
) -> Result<Run, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Duration, BoxError>>,
{
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    admin
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            arguments.clone(),
        )
        .await?;
    let cpu = process_cpu();
    let took = publish().await?;
    let cpu = process_cpu().saturating_sub(cpu);
    let declared = admin
        .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
        .await?;
    if declared.message_count() < messages {
        return Err(format!(
            "{} messages in the queue, {messages} confirmed",
            declared.message_count()
        )
        .into());
    }
    admin
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    Ok(Run {
        rate: f64::from(messages) / took.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / f64::from(messages),
    })
}

async fn raw_connection(url: &str) -> Result<lapin::Connection, BoxError> {
    let runtime = async_rs::Runtime::tokio_with_handle(tokio::runtime::Handle::current());
    Ok(
        lapin::Connection::connect_with_runtime(url, ConnectionProperties::default(), runtime)
            .await?,
    )
}

/// Raw lapin: one channel in confirm mode, at most `window` unconfirmed.
async fn raw_lapin(
    url: &BrokerUrl,
    queue: &str,
    messages: u32,
    window: usize,
    payload: &[u8],
) -> Result<Duration, BoxError> {
    let connection = raw_connection(&url.url()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    for _ in 0..messages {
        if pending.len() >= window {
            check_ack(pending.next().await)?;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default(),
            )
            .await?;
        pending.push(confirm);
    }
    while !pending.is_empty() {
        check_ack(pending.next().await)?;
    }
    let took = start.elapsed();
    connection.close(200, "done".into()).await?;
    Ok(took)
}

fn check_ack(confirm: Option<lapin::Result<lapin::Confirmation>>) -> Result<(), BoxError> {
    match confirm {
        Some(Ok(lapin::Confirmation::Ack(_))) => Ok(()),
        other => Err(format!("not an ack: {other:?}").into()),
    }
}

fn start_client(url: &BrokerUrl, builder: amqp_rebound_core::ClientBuilder) -> Client {
    let (client, driver) = builder
        .hosts([url.url()])
        .build(LapinTransport::new(), TokioTimer)
        .expect("a valid configuration");
    tokio::spawn(driver);
    client
}

async fn ready(client: &Client) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !client.state().is_ready() {
        if Instant::now() > deadline {
            return Err("the client did not become Ready".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// amqp-rebound over lapin: `pool` (or the default), the same confirm window;
/// the caller keeps twice the window of publishes outstanding so the outbox
/// never runs dry.
async fn rebound(
    url: &BrokerUrl,
    queue: &str,
    messages: u32,
    window: usize,
    payload: &Bytes,
    pool: Option<(usize, usize)>,
) -> Result<Duration, BoxError> {
    let mut builder = Client::builder().confirm_window(window);
    if let Some((connections, channels)) = pool {
        builder = builder.pool(connections, channels);
    }
    let client = start_client(url, builder);
    ready(&client).await?;
    let start = Instant::now();
    let mut results = futures::stream::iter(0..messages)
        .map(|_| client.publish("", queue, payload.clone(), Properties::default()))
        .buffer_unordered(window * 2);
    while let Some(result) = results.next().await {
        if result != Ok(Confirmation::Confirmed) {
            return Err(format!("not confirmed: {result:?}").into());
        }
    }
    let took = start.elapsed();
    drop(results);
    client.close().await;
    Ok(took)
}

/// `kills` times: the broker closes every connection while the client publishes
/// at a steady 2,000/s; the stall is from the client seeing the loss to the first
/// publish confirmed on the new connection.
async fn recovery_stalls(
    url: &BrokerUrl,
    kills: usize,
    payload: &Bytes,
) -> Result<Vec<Duration>, BoxError> {
    // The backoff counter resets once a connection has been Ready for
    // `reset_after` (default 30 s); 1 s lets every kill here be a first failure,
    // which is what is measured (the kills are >= 1.2 s apart).
    let backoff = BackoffConfig {
        reset_after: Duration::from_secs(1),
        ..BackoffConfig::default()
    };
    let client = start_client(url, Client::builder().backoff(backoff));
    ready(&client).await?;
    let queue = unique("bench-stall");
    let mut decl = QueueDecl {
        name: queue.clone(),
        ..QueueDecl::default()
    };
    decl.arguments
        .insert("x-expires".into(), AMQPValue::LongInt(600_000));
    decl.arguments
        .insert("x-max-length".into(), AMQPValue::LongInt(10_000));
    client.declare_queue(decl).await?;
    let mut events = client.watch();

    // the publisher: each confirm with the recovery count the client had by then
    let (confirms_tx, mut confirms) = futures::channel::mpsc::unbounded::<(Instant, u64, bool)>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let client = client.clone();
        let payload = payload.clone();
        let queue = queue.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut ticks = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
                if stopping && in_flight.is_empty() {
                    break;
                }
                let next = start + Duration::from_micros(500 * ticks);
                tokio::select! {
                    () = tokio::time::sleep_until(next), if !stopping && in_flight.len() < 4096 => {
                        ticks += 1;
                        let client = client.clone();
                        let payload = payload.clone();
                        let queue = queue.clone();
                        in_flight.push(async move {
                            let result = client
                                .publish("", &queue, payload, Properties::default())
                                .await;
                            (result == Ok(Confirmation::Confirmed), client.stats().recoveries)
                        });
                    }
                    Some((ok, recoveries)) = in_flight.next(), if !in_flight.is_empty() => {
                        let _ = confirms_tx.unbounded_send((Instant::now(), recoveries, ok));
                    }
                }
            }
        })
    };

    let mut stalls = Vec::with_capacity(kills);
    for kill in 1..=kills {
        // steady: Ready for more than reset_after, confirms flowing
        let calm = Instant::now();
        ready(&client).await?;
        tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(calm.elapsed())).await;
        while confirms.next().now_or_never().flatten().is_some() {}
        let before = client.stats().recoveries;
        let killer = tokio::spawn(broker::close_all_connections("bench_lapin: kill"));
        let lost = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(event) = events.next().await {
                if let Event::StateChanged {
                    to: Phase::Reconnecting,
                    ..
                } = event
                {
                    return Some(Instant::now());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or("no connection loss seen after the kill")?;
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some((at, recoveries, ok)) = confirms.next().await {
                if ok && recoveries > before {
                    return Some(at);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or("no confirm after the kill")?;
        killer.await?;
        let stall = back.saturating_duration_since(lost);
        println!(
            "  kill {kill:>2}: stall {:.1} ms",
            stall.as_secs_f64() * 1e3
        );
        stalls.push(stall);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(35), publisher).await;
    let _ = client.delete_queue(queue.as_str()).await;
    client.close().await;
    Ok(stalls)
}

use futures::FutureExt;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A number for JSON: `null` when it is not finite.
fn json(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "null".into()
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
