//! What the real-broker bench binaries (`src/bin/bench_lapin.rs`,
//! `src/bin/bench_amqprs.rs`) share; each binary holds only its raw client.
//!
//! One run of a binary measures, against the broker at `AMQP_URL`:
//!
//! 1. **Throughput with confirms** ([`throughput`]): N messages through the raw
//!    client (one channel, pipelined: at most `window` unconfirmed), through
//!    amqp-rebound's adapter for that client alone (its `Transport` trait, no
//!    `Client`: where the adapter's cost shows) and through amqp-rebound over it
//!    (1 connection x 1 channel, same confirm window; then the default pool,
//!    1 x 4). Each is run `rounds` times, interleaved, the order of the sides
//!    changing from round to round (use a multiple of 4 rounds: every side then
//!    runs in every position, and after every other side, equally often); the
//!    medians and
//!    the median of the rounds' ratios rebound / raw are printed (target >= 0.95),
//!    with this process's CPU time per message (user + system, every thread): the
//!    machine is shared, so the rates move with other people's load, the CPU cost
//!    much less.
//! 2. **Recovery stall, lost, duplicates** ([`recovery`]): a client publishing
//!    steadily (2,000/s, each payload numbered) while
//!    `rabbitmqctl close_all_connections` kills its connection `kills` times. The
//!    stall is the time from the client seeing the loss to the first publish
//!    confirmed on the new connection; p50 / p99 are printed (targets 100 ms /
//!    300 ms). Afterwards the queue is read back: a message confirmed but absent
//!    is *lost* (must be 0), a number present twice or more counts its extra
//!    copies as *duplicates* (at-least-once: a message re-published after a loss
//!    that had in fact reached the queue). Both per kill: each kill owns the
//!    numbers published from the start of its turn to the start of the next.
//!
//! Then [`report`] prints one JSON line with every figure. [`main`] takes the broker
//! lock exclusively (the kills hit every connection), so a run never overlaps the
//! conformance suite.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::transport::{Channel, ChannelEvent, ConnectOptions, Connection, Transport};
use amqp_rebound_core::{
    BackoffConfig, Client, ClientBuilder, Confirmation, ConsumeOptions, Endpoint, Event, Message,
    Phase, Properties, QueueDecl, TokioTimer,
};
use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::broker::{self, Access, BrokerLock, BrokerUrl, unique};

/// Any error, for the benches' plumbing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The command line of a bench binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Messages per throughput run (`--messages`, default 50,000).
    pub messages: u32,
    /// Unconfirmed messages allowed, raw and rebound alike (`--window`, 1024).
    pub window: usize,
    /// Throughput rounds (`--rounds`, 16: a multiple of 4, see [`throughput`]).
    pub rounds: usize,
    /// Connection kills for the recovery figures (`--kills`, 20; 0 skips them).
    pub kills: usize,
    /// Payload size in bytes (`--payload`, 128; at least 8 in the kill part,
    /// which numbers each message in its first 8 bytes).
    pub payload: usize,
    /// Run one side only, `rounds` times, and print its rate and CPU per
    /// message (`--only raw|adapter|single|pool`): for a profiler, which cannot
    /// tell the sides of a full run apart. No ratios, no kills, no JSON.
    pub only: Option<Only>,
    /// `--raw-queued`: see [`RawJob::queued`].
    pub raw_queued: bool,
}

/// A side of the throughput comparison, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// The raw client.
    Raw,
    /// The transport adapter alone.
    Adapter,
    /// amqp-rebound 1x1.
    Single,
    /// amqp-rebound with the default pool.
    Pool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            messages: 50_000,
            window: 1024,
            rounds: 16,
            kills: 20,
            payload: 128,
            only: None,
            raw_queued: false,
        }
    }
}

impl Args {
    /// Parses `args` (without the program name); `program` is for the usage text.
    pub fn parse(program: &str, args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("{flag} needs a value"))?
                    .parse::<usize>()
                    .map_err(|e| format!("{flag}: {e}"))
            };
            match flag.as_str() {
                "--messages" => {
                    parsed.messages = u32::try_from(value()?)
                        .map_err(|_| "--messages: too large".to_string())?
                        .max(1);
                }
                "--window" => parsed.window = value()?.max(1),
                "--rounds" => parsed.rounds = value()?.max(1),
                "--kills" => parsed.kills = value()?,
                "--payload" => parsed.payload = value()?,
                "--raw-queued" => parsed.raw_queued = true,
                "--only" => {
                    parsed.only = Some(match it.next().as_deref() {
                        Some("raw") => Only::Raw,
                        Some("adapter") => Only::Adapter,
                        Some("single") => Only::Single,
                        Some("pool") => Only::Pool,
                        other => {
                            return Err(format!(
                                "--only takes raw, adapter, single or pool, not {other:?}"
                            ));
                        }
                    });
                }
                "-h" | "--help" => {
                    return Err(format!(
                        "usage: {program} [--messages N] [--window W] [--rounds R] \
                         [--kills K] [--payload BYTES] [--only raw|adapter|single|pool] \
                         [--raw-queued]"
                    ));
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(parsed)
    }
}

/// A bench binary's `main`: parses the command line, checks the broker is
/// reachable, takes the broker lock exclusively, and runs `bench` on a tokio
/// runtime with two workers. Exits 2 on a bad command line, 1 on failure.
pub fn main<F, Fut>(program: &str, bench: F)
where
    F: FnOnce(Args, BrokerUrl) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let args = match Args::parse(program, std::env::args().skip(1)) {
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
    if let Err(e) = runtime.block_on(bench(args, url)) {
        eprintln!("{program} failed: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// statistics

/// CPU time of this process so far (user + system, every thread).
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A 95% percentile-bootstrap interval for the median of `values` (2,000
/// resamples, a fixed seed: the same values give the same interval); NaNs when
/// empty.
pub fn median_interval(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| {
            let mut sample: Vec<f64> = (0..values.len())
                .map(|_| values[rng.usize(..values.len())])
                .collect();
            median(&mut sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (percentile(&medians, 0.025), percentile(&medians, 0.975))
}

/// The median (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A raw lapin connection to `url` on the current tokio runtime (the baseline the
/// benches compare against).
pub async fn raw_lapin_connection(url: &BrokerUrl) -> Result<lapin::Connection, BoxError> {
    let runtime = async_rs::Runtime::tokio_with_handle(tokio::runtime::Handle::current());
    let connection = lapin::Connection::connect_with_runtime(
        &url.url(),
        lapin::ConnectionProperties::default(),
        runtime,
    )
    .await?;
    Ok(connection)
}

/// A raw amqprs connection to `url` (the baseline the benches compare against).
pub async fn raw_amqprs_connection(
    url: &BrokerUrl,
) -> Result<amqprs::connection::Connection, BoxError> {
    let endpoint = Endpoint::parse(&url.url())?;
    let mut open = amqprs::connection::OpenConnectionArguments::new(
        endpoint.host(),
        endpoint.port(),
        endpoint.username(),
        endpoint.password(),
    );
    open.virtual_host(endpoint.vhost());
    Ok(amqprs::connection::Connection::open(&open).await?)
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A number for JSON, rounded to `decimals`; `null` when it is not finite.
pub fn number(value: f64, decimals: i32) -> serde_json::Value {
    if value.is_finite() {
        let scale = 10f64.powi(decimals);
        serde_json::json!((value * scale).round() / scale)
    } else {
        serde_json::Value::Null
    }
}

// ---------------------------------------------------------------------------
// throughput

/// One run: messages per second, and this process's CPU time per message (user
/// + system, all threads) in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Confirmed messages per second.
    pub rate: f64,
    /// CPU microseconds per message.
    pub cpu_us: f64,
}

/// What a raw client's run gets, owned so that it can move into its future.
#[derive(Debug, Clone)]
pub struct RawJob {
    /// The broker.
    pub url: BrokerUrl,
    /// The queue to publish to (on the default exchange); declared already.
    pub queue: String,
    /// How many messages.
    pub messages: u32,
    /// At most this many unconfirmed at any time.
    pub window: usize,
    /// The payload of every message.
    pub payload: Bytes,
    /// `--raw-queued`: the raw client does not wait for each publish to be
    /// written before the next (for lapin: `basic_publish` polled once, which
    /// queues the frames, and awaited later with its confirm), as the lapin
    /// adapter does. Without it the raw client is used as its documentation
    /// shows. amqprs's `basic_publish` never waits for the write: no difference.
    pub queued: bool,
}

/// One side's runs and their medians.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// Every round's run, in order.
    pub runs: Vec<Run>,
    /// Median rate.
    pub rate: f64,
    /// Median CPU per message.
    pub cpu_us: f64,
    /// Median of the rounds' ratios to the raw client's rate (1 for the raw side).
    pub ratio: f64,
    /// A 95% interval for that median: the rounds' ratios spread widely on this
    /// shared machine, so one run's median says less than it seems.
    pub ratio_ci: (f64, f64),
}

impl Side {
    fn of(runs: Vec<Run>, raw: &[Run]) -> Side {
        let rate = median(&mut runs.iter().map(|r| r.rate).collect::<Vec<_>>());
        let cpu_us = median(&mut runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>());
        let mut ratios: Vec<f64> = runs.iter().zip(raw).map(|(a, r)| a.rate / r.rate).collect();
        let ratio_ci = median_interval(&ratios);
        let ratio = median(&mut ratios);
        Side {
            runs,
            rate,
            cpu_us,
            ratio,
            ratio_ci,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.runs.iter().map(|r| number(r.rate, 0)).collect())
    }
}

/// The throughput figures of one run of a bench binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    /// The raw client.
    pub raw: Side,
    /// The transport adapter alone (amqp-rebound's `Transport` over the raw
    /// client, no `Client` or driver): one channel, the same window, acks read
    /// from its events stream. Splits the gap between raw and 1x1 into the
    /// adapter's share and the client's.
    pub adapter: Side,
    /// amqp-rebound, 1 connection x 1 channel.
    pub single: Side,
    /// amqp-rebound, the default pool.
    pub pooled: Side,
}

/// The throughput part: `args.rounds` rounds of raw (`raw`, given a [`RawJob`],
/// returns the time from the first publish to the last confirm), the adapter
/// alone, amqp-rebound 1x1 and amqp-rebound with the default pool over
/// `transport()`, each into a fresh queue that is checked to hold every message
/// afterwards.
pub async fn throughput<T, M, R, Fut>(
    name: &str,
    args: &Args,
    url: &BrokerUrl,
    transport: &M,
    raw: R,
) -> Result<Throughput, BoxError>
where
    T: Transport,
    M: Fn() -> T,
    R: Fn(RawJob) -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    let sides = Sides::open(args, url, transport, raw).await?;
    println!(
        "throughput: {} messages of {} B with confirms, window {}, {} rounds (median)",
        args.messages, args.payload, args.window, args.rounds
    );
    let (mut raws, mut adapters, mut singles, mut pooleds) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // The side order of round k is row k of a Williams square: over four
        // rounds every side runs in every position once and right after every
        // other side once, so neither a position nor what the run before left the
        // broker doing (the clean-up of the queue just deleted, say), nor a drift
        // in the machine's load (it is shared), favours a side. (With raw first
        // in odd rounds and last in even ones, as before, 52 rounds of
        // bench_amqprs gave the adapter a median ratio of 0.990 when it ran
        // first, 0.968 when it ran second, and amqp-rebound 1x1 0.943 / 0.970 as
        // it ran second or third.)
        let (mut r, mut a, mut s, mut p) = (None, None, None, None);
        for &index in &ORDERS[(round - 1) % ORDERS.len()] {
            let side = SIDES[index];
            let run = Some(sides.run(side).await?);
            match side {
                Only::Raw => r = run,
                Only::Adapter => a = run,
                Only::Single => s = run,
                Only::Pool => p = run,
            }
        }
        let (Some(r), Some(a), Some(s), Some(p)) = (r, a, s, p) else {
            return Err("a side did not run".into());
        };
        println!(
            "  round {round}: raw {name} {:>7.0}/s {:>5.1} us   adapter {:>7.0}/s {:>5.1} us ({:.3})   \
             rebound 1x1 {:>7.0}/s {:>5.1} us ({:.3})   rebound 1x4 {:>7.0}/s {:>5.1} us ({:.3})",
            r.rate,
            r.cpu_us,
            a.rate,
            a.cpu_us,
            a.rate / r.rate,
            s.rate,
            s.cpu_us,
            s.rate / r.rate,
            p.rate,
            p.cpu_us,
            p.rate / r.rate
        );
        raws.push(r);
        adapters.push(a);
        singles.push(s);
        pooleds.push(p);
    }
    let result = Throughput {
        adapter: Side::of(adapters, &raws),
        single: Side::of(singles, &raws),
        pooled: Side::of(pooleds, &raws),
        raw: Side::of(raws.clone(), &raws),
    };
    let (raw, adapter, single, pooled) =
        (&result.raw, &result.adapter, &result.single, &result.pooled);
    let label = format!("raw {name}");
    println!(
        "  medians: {label:<22}{:>8.0} msg/s   {:>5.1} us CPU/msg",
        raw.rate, raw.cpu_us
    );
    println!(
        "           adapter alone         {:>8.0} msg/s   {:>5.1} us CPU/msg   ratio {:.3}",
        adapter.rate, adapter.cpu_us, adapter.ratio
    );
    println!(
        "           amqp-rebound 1x1      {:>8.0} msg/s   {:>5.1} us CPU/msg   \
         ratio {:.3} (median of the rounds' ratios, 95% interval {:.3}-{:.3}; target >= 0.95)",
        single.rate, single.cpu_us, single.ratio, single.ratio_ci.0, single.ratio_ci.1
    );
    println!(
        "           amqp-rebound pool 1x4 {:>8.0} msg/s   {:>5.1} us CPU/msg   ratio {:.3}",
        pooled.rate, pooled.cpu_us, pooled.ratio
    );
    sides.close().await;
    Ok(result)
}

/// The sides of a throughput round.
const SIDES: [Only; 4] = [Only::Raw, Only::Adapter, Only::Single, Only::Pool];

/// The order of the sides in rounds 1, 2, 3, 4 (then again): a Williams square,
/// balanced for position and for the side run just before.
const ORDERS: [[usize; 4]; 4] = [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]];

/// `--only`: one side, `args.rounds` times, rate and CPU per message printed.
async fn one_side<T, M, R, Fut>(
    name: &str,
    only: Only,
    args: &Args,
    url: &BrokerUrl,
    transport: &M,
    raw: R,
) -> Result<(), BoxError>
where
    T: Transport,
    M: Fn() -> T,
    R: Fn(RawJob) -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    let sides = Sides::open(args, url, transport, raw).await?;
    for round in 1..=args.rounds {
        let run = sides.run(only).await?;
        println!(
            "  round {round}: {name} {only:?} {:>7.0}/s {:>5.1} us CPU/msg",
            run.rate, run.cpu_us
        );
    }
    sides.close().await;
    Ok(())
}

/// What every side of the comparison shares: the admin connection, the queue
/// (declared fresh for each run), the job and the ways to connect.
struct Sides<'a, C: Connection, M, R> {
    admin: Admin<C>,
    decl: QueueDecl,
    job: RawJob,
    url: &'a BrokerUrl,
    transport: &'a M,
    raw: R,
}

impl<'a, T, M, R, Fut> Sides<'a, T::Connection, M, R>
where
    T: Transport,
    M: Fn() -> T,
    R: Fn(RawJob) -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    async fn open(
        args: &Args,
        url: &'a BrokerUrl,
        transport: &'a M,
        raw: R,
    ) -> Result<Self, BoxError> {
        let admin = Admin::open(transport(), url, "bench admin").await?;
        let decl = bench_queue(unique("bench"));
        let job = RawJob {
            url: url.clone(),
            queue: decl.name.clone(),
            messages: args.messages,
            window: args.window,
            payload: Bytes::from(vec![b'x'; args.payload]),
            queued: args.raw_queued,
        };
        Ok(Sides {
            admin,
            decl,
            job,
            url,
            transport,
            raw,
        })
    }

    /// One run of `side` into a fresh queue, checked to hold every message.
    async fn run(&self, side: Only) -> Result<Run, BoxError> {
        let (admin, decl, job, messages) = (&self.admin, &self.decl, &self.job, self.job.messages);
        let transport = self.transport;
        match side {
            Only::Raw => timed(admin, decl, messages, || (self.raw)(job.clone())).await,
            Only::Adapter => timed(admin, decl, messages, || adapter(transport(), job)).await,
            Only::Single => {
                timed(admin, decl, messages, || {
                    rebound(transport(), self.url, job, Some((1, 1)))
                })
                .await
            }
            Only::Pool => {
                timed(admin, decl, messages, || {
                    rebound(transport(), self.url, job, None)
                })
                .await
            }
        }
    }

    async fn close(self) {
        let _ = self.admin.channel.delete_queue(&self.decl.name).await;
        self.admin.close().await;
    }
}

/// The transport adapter alone: one channel in confirm mode through
/// amqp-rebound's `Transport` trait, at most `job.window` unconfirmed, acks
/// (single or multiple) read from the channel's events stream.
async fn adapter<T: Transport>(transport: T, job: &RawJob) -> Result<Duration, BoxError> {
    let endpoint = Endpoint::parse(&job.url.url())?;
    let connection = transport
        .connect(&endpoint, &ConnectOptions::named("bench adapter"))
        .await?;
    let channel = connection.open_channel().await?;
    let mut events = channel.events();
    channel.confirm_select().await?;
    let message = Message::new("", job.queue.as_str(), job.payload.clone());
    let messages = u64::from(job.messages);
    // delivery tags sent and not confirmed yet (the channel numbers from 1)
    let mut unconfirmed = BTreeSet::new();
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < messages || !unconfirmed.is_empty() {
        while sent < messages && unconfirmed.len() < job.window {
            channel.publish(&message).await?;
            sent += 1;
            unconfirmed.insert(sent);
        }
        // one event (waiting for it), then whatever else has arrived
        let mut next = events.next().await;
        loop {
            match next {
                Some(ChannelEvent::Ack {
                    delivery_tag,
                    multiple,
                }) => {
                    if multiple {
                        unconfirmed = unconfirmed.split_off(&(delivery_tag + 1));
                    } else {
                        unconfirmed.remove(&delivery_tag);
                    }
                }
                Some(ChannelEvent::Nack { delivery_tag, .. }) => {
                    return Err(format!("nack of {delivery_tag}").into());
                }
                Some(ChannelEvent::Closed(e)) => return Err(format!("channel closed: {e}").into()),
                None => return Err("the channel's events ended".into()),
                Some(_) => {}
            }
            match events.next().now_or_never() {
                Some(event) => next = event,
                None => break,
            }
        }
    }
    let took = start.elapsed();
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(took)
}

/// A classic queue that expires 10 minutes after its last use (so a crashed run
/// leaves nothing behind for long).
fn bench_queue(name: String) -> QueueDecl {
    let mut decl = QueueDecl {
        name,
        ..QueueDecl::default()
    };
    decl.arguments
        .insert("x-expires".into(), AMQPValue::LongInt(600_000));
    decl
}

/// A connection and channel through a transport adapter (no client, no
/// recovery): declares, counts, reads back and deletes the benches' queues.
struct Admin<C: Connection> {
    connection: C,
    channel: C::Channel,
}

impl<C: Connection> Admin<C> {
    async fn open<T>(transport: T, url: &BrokerUrl, name: &str) -> Result<Admin<C>, BoxError>
    where
        T: Transport<Connection = C>,
    {
        let endpoint = Endpoint::parse(&url.url())?;
        let connection = transport
            .connect(&endpoint, &ConnectOptions::named(name))
            .await?;
        let channel = connection.open_channel().await?;
        Ok(Admin {
            connection,
            channel,
        })
    }

    async fn close(self) {
        let _ = self.channel.close().await;
        let _ = self.connection.close().await;
    }
}

/// Declares `decl`, runs `publish`, checks the queue holds every message,
/// deletes it.
async fn timed<C, F, Fut>(
    admin: &Admin<C>,
    decl: &QueueDecl,
    messages: u32,
    publish: F,
) -> Result<Run, BoxError>
where
    C: Connection,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    admin.channel.declare_queue(decl).await?;
    let cpu = process_cpu();
    let took = publish().await?;
    let cpu = process_cpu().saturating_sub(cpu);
    let declared = admin.channel.declare_queue(decl).await?;
    if declared.message_count < messages {
        return Err(format!(
            "{} messages in the queue, {messages} confirmed",
            declared.message_count
        )
        .into());
    }
    admin.channel.delete_queue(&decl.name).await?;
    Ok(Run {
        rate: f64::from(messages) / took.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / f64::from(messages),
    })
}

/// A client over `transport`, its driver spawned on the current runtime.
pub fn start_client<T: Transport>(url: &BrokerUrl, builder: ClientBuilder, transport: T) -> Client {
    let (client, driver) = builder
        .hosts([url.url()])
        .build(transport, TokioTimer)
        .expect("a valid configuration");
    tokio::spawn(driver);
    client
}

/// Waits (up to 15 s) until every connection and channel of `client` is Ready.
pub async fn ready(client: &Client) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !client.state().is_ready() {
        if Instant::now() > deadline {
            return Err("the client did not become Ready".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// amqp-rebound: `pool` (or the default), the job's confirm window; the caller
/// keeps at most `window` publishes unconfirmed, as the raw clients do, and waits
/// for the oldest when it has that many (confirms come in order).
async fn rebound<T: Transport>(
    transport: T,
    url: &BrokerUrl,
    job: &RawJob,
    pool: Option<(usize, usize)>,
) -> Result<Duration, BoxError> {
    let mut builder = Client::builder().confirm_window(job.window);
    if let Some((connections, channels)) = pool {
        builder = builder.pool(connections, channels);
    }
    let client = start_client(url, builder, transport);
    ready(&client).await?;
    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::with_capacity(job.window);
    let mut sent = 0;
    while sent < job.messages || !in_flight.is_empty() {
        while sent < job.messages && in_flight.len() < job.window {
            in_flight.push_back(client.publish(
                "",
                &job.queue,
                job.payload.clone(),
                Properties::default(),
            ));
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
    client.close().await;
    Ok(took)
}

// ---------------------------------------------------------------------------
// recovery

/// What one kill did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// From the client seeing the loss to the first publish confirmed on the new
    /// connection.
    pub stall: Duration,
    /// Messages of this kill's turn confirmed to the publisher.
    pub confirmed: u64,
    /// Of those, absent from the queue (must be 0).
    pub lost: u64,
    /// Extra copies in the queue of this turn's messages.
    pub duplicates: u64,
}

/// The recovery figures of one run of a bench binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// One per kill, in order.
    pub kills: Vec<Kill>,
    /// Publishes that resolved other than confirmed (timed out, nacked, ...).
    pub not_confirmed: u64,
    /// Stall p50 / p99 / max in milliseconds (NaN without kills).
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
}

impl Recovery {
    /// Confirmed messages missing from the queue, every kill together.
    pub fn lost(&self) -> u64 {
        self.kills.iter().map(|k| k.lost).sum()
    }

    /// Extra copies, every kill together.
    pub fn duplicates(&self) -> u64 {
        self.kills.iter().map(|k| k.duplicates).sum()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The payload of message `seq`: its number (big-endian) then `x` up to `len`
/// (at least 8 bytes).
fn numbered(seq: u64, len: usize) -> Bytes {
    let mut body = vec![b'x'; len.max(8)];
    body[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(body)
}

/// `kills` times: the broker closes every connection while a client over
/// `transport()` (default pool, backoff `reset_after` 1 s) publishes numbered
/// messages at a steady 2,000/s; then the queue is read back to count what was
/// lost and duplicated per kill. `name` labels the broker's kill reason.
pub async fn recovery<T, M>(
    name: &str,
    url: &BrokerUrl,
    kills: usize,
    payload_len: usize,
    transport: &M,
) -> Result<Recovery, BoxError>
where
    T: Transport,
    M: Fn() -> T,
{
    // The backoff counter resets once a connection has been Ready for
    // `reset_after` (default 5 s); 1 s lets every kill here be a first failure,
    // which is what is measured (the kills are >= 1.2 s apart).
    let backoff = BackoffConfig {
        reset_after: Duration::from_secs(1),
        ..BackoffConfig::default()
    };
    let client = start_client(url, Client::builder().backoff(backoff), transport());
    ready(&client).await?;
    let decl = bench_queue(unique("bench-stall"));
    client.declare_queue(decl.clone()).await?;
    let mut events = client.watch();

    // the publisher: each result with the recovery count the client had by then
    let (results_tx, mut results) = futures::channel::mpsc::unbounded::<(Instant, u64, bool)>();
    let stop = Arc::new(AtomicBool::new(false));
    // the next number to publish, and the numbers confirmed
    let next_seq = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(Mutex::new(Vec::<u64>::new()));
    let not_confirmed = Arc::new(AtomicU64::new(0));
    let publisher = {
        let client = client.clone();
        let queue = decl.name.clone();
        let stop = Arc::clone(&stop);
        let next_seq = Arc::clone(&next_seq);
        let confirmed = Arc::clone(&confirmed);
        let not_confirmed = Arc::clone(&not_confirmed);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut ticks = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                let stopping = stop.load(Ordering::SeqCst);
                if stopping && in_flight.is_empty() {
                    break;
                }
                let next = start + Duration::from_micros(500 * ticks);
                tokio::select! {
                    () = tokio::time::sleep_until(next), if !stopping && in_flight.len() < 4096 => {
                        let seq = ticks;
                        ticks += 1;
                        next_seq.store(ticks, Ordering::SeqCst);
                        let client = client.clone();
                        let payload = numbered(seq, payload_len);
                        let queue = queue.clone();
                        in_flight.push(async move {
                            let result = client
                                .publish("", &queue, payload, Properties::default())
                                .await;
                            let ok = result == Ok(Confirmation::Confirmed);
                            (seq, ok, client.stats().recoveries)
                        });
                    }
                    Some((seq, ok, recoveries)) = in_flight.next(), if !in_flight.is_empty() => {
                        if ok {
                            confirmed.lock().expect("not poisoned").push(seq);
                        } else {
                            not_confirmed.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = results_tx.unbounded_send((Instant::now(), recoveries, ok));
                    }
                }
            }
        })
    };

    let reason = format!("bench_{name}: kill");
    // turn k owns the numbers from starts[k] to starts[k + 1]
    let mut starts = Vec::with_capacity(kills);
    let mut stalls = Vec::with_capacity(kills);
    for kill in 1..=kills {
        starts.push(if kill == 1 {
            0
        } else {
            next_seq.load(Ordering::SeqCst)
        });
        // steady: Ready for more than reset_after, confirms flowing
        let calm = Instant::now();
        ready(&client).await?;
        tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(calm.elapsed())).await;
        while results.next().now_or_never().flatten().is_some() {}
        let before = client.stats().recoveries;
        let killer = {
            let reason = reason.clone();
            tokio::spawn(async move { broker::close_all_connections(&reason).await })
        };
        let lost_at = tokio::time::timeout(Duration::from_secs(30), async {
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
            while let Some((at, recoveries, ok)) = results.next().await {
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
        let stall = back.saturating_duration_since(lost_at);
        println!("  kill {kill:>2}: stall {:.1} ms", ms(stall));
        stalls.push(stall);
    }
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(35), publisher)
        .await
        .map_err(|_| "the publisher did not finish within 35 s")??;

    // read the queue back (after the last kill: no connection dies now)
    let copies = read_back(transport(), url, &decl).await?;
    let _ = client.delete_queue(decl.name.as_str()).await;
    client.close().await;

    let turn = |seq: u64| starts.partition_point(|&s| s <= seq).saturating_sub(1);
    let mut outcome: Vec<Kill> = stalls
        .iter()
        .map(|&stall| Kill {
            stall,
            confirmed: 0,
            lost: 0,
            duplicates: 0,
        })
        .collect();
    if !outcome.is_empty() {
        for &seq in confirmed.lock().expect("not poisoned").iter() {
            let kill = &mut outcome[turn(seq)];
            kill.confirmed += 1;
            if !copies.contains_key(&seq) {
                kill.lost += 1;
            }
        }
        for (&seq, &n) in &copies {
            outcome[turn(seq)].duplicates += u64::from(n.saturating_sub(1));
        }
    }
    let mut sorted: Vec<f64> = stalls.iter().map(|&d| ms(d)).collect();
    sorted.sort_by(f64::total_cmp);
    let recovery = Recovery {
        kills: outcome,
        not_confirmed: not_confirmed.load(Ordering::SeqCst),
        p50_ms: percentile(&sorted, 0.50),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
    };
    if !recovery.kills.is_empty() {
        println!(
            "recovery after close_all_connections ({} kills, default pool 1x4, backoff \
             reset_after 1 s):",
            recovery.kills.len()
        );
        for (i, k) in recovery.kills.iter().enumerate() {
            println!(
                "  kill {:>2}: stall {:>6.1} ms   {:>5} confirmed   {} lost   {} duplicates",
                i + 1,
                ms(k.stall),
                k.confirmed,
                k.lost,
                k.duplicates
            );
        }
        println!(
            "  stall p50 {:.1} ms (target <= 100)   p99 {:.1} ms (target <= 300)   max {:.1} ms",
            recovery.p50_ms, recovery.p99_ms, recovery.max_ms
        );
        println!(
            "  lost {} (must be 0)   duplicates {}   not confirmed {}",
            recovery.lost(),
            recovery.duplicates(),
            recovery.not_confirmed
        );
    }
    Ok(recovery)
}

/// Reads every message of the queue (no-ack consumer through the adapter) and
/// counts the copies of each number.
async fn read_back<T: Transport>(
    transport: T,
    url: &BrokerUrl,
    decl: &QueueDecl,
) -> Result<HashMap<u64, u32>, BoxError> {
    let admin = Admin::open(transport, url, "bench read-back").await?;
    let mut events = admin.channel.events();
    let expected = admin.channel.declare_queue(decl).await?.message_count;
    let options = ConsumeOptions {
        no_ack: true,
        ..ConsumeOptions::default()
    };
    admin
        .channel
        .consume(&decl.name, "bench-read-back", &options)
        .await?;
    let mut copies: HashMap<u64, u32> = HashMap::new();
    let mut read = 0u32;
    while read < expected {
        match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Ok(Some(ChannelEvent::Delivery(d))) => {
                let seq = d
                    .payload
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or("a message without its number")?;
                *copies.entry(seq).or_default() += 1;
                read += 1;
            }
            Ok(Some(ChannelEvent::Closed(e))) => {
                return Err(format!("read-back channel closed: {e}").into());
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("read-back channel ended".into()),
            Err(_) => {
                return Err(format!(
                    "read back {read} of {expected} messages, then nothing for 30 s"
                )
                .into());
            }
        }
    }
    admin.close().await;
    Ok(copies)
}

// ---------------------------------------------------------------------------
// report

/// Prints the JSON line with every figure (keys `raw_<name>_...` for the raw
/// client).
pub fn report(name: &str, args: &Args, throughput: &Throughput, recovery: &Recovery) {
    let (raw, adapter, single, pooled) = (
        &throughput.raw,
        &throughput.adapter,
        &throughput.single,
        &throughput.pooled,
    );
    let mut line = serde_json::Map::new();
    let mut put = |key: String, value: serde_json::Value| {
        line.insert(key, value);
    };
    put("bench".into(), name.into());
    put("messages".into(), args.messages.into());
    put("payload_bytes".into(), args.payload.into());
    put("window".into(), args.window.into());
    put("rounds".into(), args.rounds.into());
    put("raw_queued".into(), args.raw_queued.into());
    put(format!("raw_{name}_msgs_per_s"), number(raw.rate, 0));
    put("adapter_msgs_per_s".into(), number(adapter.rate, 0));
    put("rebound_1x1_msgs_per_s".into(), number(single.rate, 0));
    put(
        "rebound_default_pool_msgs_per_s".into(),
        number(pooled.rate, 0),
    );
    put("ratio_adapter".into(), number(adapter.ratio, 3));
    put("ratio_1x1".into(), number(single.ratio, 3));
    put(
        "ratio_1x1_ci95".into(),
        serde_json::json!([number(single.ratio_ci.0, 3), number(single.ratio_ci.1, 3)]),
    );
    put("ratio_default_pool".into(), number(pooled.ratio, 3));
    put(format!("raw_{name}_cpu_us_per_msg"), number(raw.cpu_us, 1));
    put("adapter_cpu_us_per_msg".into(), number(adapter.cpu_us, 1));
    put(
        "rebound_1x1_cpu_us_per_msg".into(),
        number(single.cpu_us, 1),
    );
    put(
        "rebound_default_pool_cpu_us_per_msg".into(),
        number(pooled.cpu_us, 1),
    );
    put(format!("rounds_raw_{name}_msgs_per_s"), raw.json());
    put("rounds_adapter_msgs_per_s".into(), adapter.json());
    put("rounds_rebound_1x1_msgs_per_s".into(), single.json());
    put(
        "rounds_rebound_default_pool_msgs_per_s".into(),
        pooled.json(),
    );
    put("stall_kills".into(), recovery.kills.len().into());
    put("stall_p50_ms".into(), number(recovery.p50_ms, 1));
    put("stall_p99_ms".into(), number(recovery.p99_ms, 1));
    put("stall_max_ms".into(), number(recovery.max_ms, 1));
    put(
        "stall_samples_ms".into(),
        recovery
            .kills
            .iter()
            .map(|k| number(ms(k.stall), 1))
            .collect(),
    );
    put("lost".into(), recovery.lost().into());
    put("duplicates".into(), recovery.duplicates().into());
    put("not_confirmed".into(), recovery.not_confirmed.into());
    put(
        "confirmed_per_kill".into(),
        recovery.kills.iter().map(|k| k.confirmed).collect(),
    );
    put(
        "lost_per_kill".into(),
        recovery.kills.iter().map(|k| k.lost).collect(),
    );
    put(
        "duplicates_per_kill".into(),
        recovery.kills.iter().map(|k| k.duplicates).collect(),
    );
    println!("{}", serde_json::Value::Object(line));
}

/// The whole of a bench binary after [`main`]'s set-up: [`throughput`], then
/// [`recovery`] (unless `--kills 0`), then [`report`].
pub async fn run<T, M, R, Fut>(
    name: &str,
    args: Args,
    url: BrokerUrl,
    transport: M,
    raw: R,
) -> Result<(), BoxError>
where
    T: Transport,
    M: Fn() -> T,
    R: Fn(RawJob) -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    if let Some(only) = args.only {
        return one_side(name, only, &args, &url, &transport, raw).await;
    }
    let throughput = throughput(name, &args, &url, &transport, raw).await?;
    let recovery = if args.kills > 0 {
        recovery(name, &url, args.kills, args.payload, &transport).await?
    } else {
        Recovery {
            kills: Vec::new(),
            not_confirmed: 0,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            max_ms: f64::NAN,
        }
    };
    report(name, &args, &throughput, &recovery);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        Args::parse("bench", list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_the_flags_and_keeps_the_defaults() {
        assert_eq!(args(&[]).unwrap(), Args::default());
        let a = args(&["--messages", "2000", "--kills", "3", "--window", "0"]).unwrap();
        assert_eq!((a.messages, a.kills, a.window), (2000, 3, 1));
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--rounds"]).is_err());
        assert!(args(&["--help"]).unwrap_err().starts_with("usage: bench"));
        assert_eq!(
            args(&["--only", "single"]).unwrap().only,
            Some(Only::Single)
        );
        assert!(args(&["--only", "both"]).is_err());
        assert!(args(&["--only"]).is_err());
        assert!(args(&["--raw-queued"]).unwrap().raw_queued);
    }

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
        let sorted: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 10.0);
        assert_eq!(percentile(&sorted, 0.99), 20.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_side_orders_balance_position_and_predecessor() {
        let mut at = [[0; 4]; 4];
        let mut after = [[0; 4]; 4];
        for order in ORDERS {
            let mut seen = order;
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2, 3], "every side once per round");
            for (position, &side) in order.iter().enumerate() {
                at[side][position] += 1;
            }
            for pair in order.windows(2) {
                after[pair[1]][pair[0]] += 1;
            }
        }
        assert!(at.iter().flatten().all(|&n| n == 1), "{at:?}");
        for (side, before) in after.iter().enumerate() {
            for (other, &n) in before.iter().enumerate() {
                assert_eq!(n, usize::from(side != other), "{after:?}");
            }
        }
    }

    #[test]
    fn the_median_interval_holds_the_median_and_narrows_with_the_spread() {
        let wide: Vec<f64> = (0..16).map(|i| 0.8 + 0.025 * f64::from(i)).collect();
        let narrow: Vec<f64> = (0..16).map(|i| 0.97 + 0.001 * f64::from(i)).collect();
        let (lo, hi) = median_interval(&wide);
        let m = median(&mut wide.clone());
        assert!(lo <= m && m <= hi, "{lo} <= {m} <= {hi}");
        let (nlo, nhi) = median_interval(&narrow);
        assert!(nhi - nlo < hi - lo);
        assert_eq!(
            median_interval(&wide),
            (lo, hi),
            "seeded: the same every time"
        );
        assert!(median_interval(&[]).0.is_nan());
        assert_eq!(median_interval(&[0.9]), (0.9, 0.9));
    }

    #[test]
    fn numbered_payloads_carry_their_number() {
        let p = numbered(0x0102, 128);
        assert_eq!(p.len(), 128);
        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 0x0102);
        assert_eq!(numbered(7, 0).len(), 8);
    }

    #[test]
    fn numbers_for_json() {
        assert_eq!(number(1.2345, 1), serde_json::json!(1.2));
        assert_eq!(number(f64::NAN, 1), serde_json::Value::Null);
    }
}
