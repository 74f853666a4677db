//! What the real-broker bench binaries (`src/bin/bench_lapin.rs`,
//! `src/bin/bench_amqprs.rs`) share; each binary holds only its raw client.
//!
//! One run of a binary measures, against the broker at `AMQP_URL`:
//!
//! 1. **Throughput with confirms** ([`throughput`]): N messages through the raw
//!    client (one channel, pipelined: at most `window` unconfirmed; for lapin
//!    also a second, labelled baseline), through amqp-rebound's adapter for that
//!    client alone (its `Transport` trait, no `Client`: where the adapter's cost
//!    shows) and through amqp-rebound over it (1 connection x 1 channel, same
//!    confirm window; then the default pool, 1 x 4). Each is run `rounds` times,
//!    interleaved, the order of the sides changing from round to round (a
//!    Williams design: use a multiple of 4 rounds for four sides, of 10 for five;
//!    every side then runs in every position, and after every other side, equally
//!    often); the medians and the median of the rounds' ratios side / raw, with
//!    95% intervals, are printed with this process's CPU time per message (user +
//!    system, every thread): the machine is shared, so the rates move with other
//!    people's load, the CPU cost much less.
//! 2. **Recovery with the library's defaults** ([`recovery`]): a client built
//!    with `Client::builder()`'s defaults (1 x 1, then the default pool)
//!    publishing numbered messages steadily (10,000/s, at most 1,024 unresolved)
//!    while `close_all_connections` (through a standing Erlang node connected
//!    to the broker's, or `rabbitmqctl` where none starts) kills its connection `kills`
//!    times, one kill every `rhythm` (1 s, dense, and 6 s, sparse, by default),
//!    on a fixed schedule whatever the client's state. Per kill: whether the loss
//!    met a client with every channel Ready, the publishes in flight at the loss,
//!    the re-sends (`Stats::republished`), and the *longest confirm pause*: the
//!    longest gap between consecutive confirms from the one before the loss up to
//!    the next kill's loss; p50 / p99 / max are printed (targets 50 / 200 ms).
//!    Each kill's turn publishes to its own queue; afterwards the queues are read
//!    back: a message confirmed but absent is *lost* (must be 0), a number present
//!    twice or more counts its extra copies as *duplicates* (at-least-once: a
//!    message re-published after a loss that had in fact reached the queue). Both
//!    per kill: each kill owns the numbers published from the start of its turn to
//!    the start of the next. `--control` adds the same schedule of calls
//!    to the broker's node without the kills, and `BENCH_TRACE_EVENTS=1` prints the client's
//!    events to stderr.
//! 3. **Broker restart** ([`restarts`]): `rabbitmqctl stop_app`, 5 s down,
//!    `start_app`, `restart` times per pool shape under the same publisher; the
//!    outage's end is the time from the broker accepting connections again (a
//!    probe connection's AMQP handshake succeeding) to the first publish
//!    confirmed after it; p50 / p99 / max (targets 1 s / 2.5 s).
//!
//! Then [`report`] prints one JSON line with every figure. [`main`] takes the broker
//! lock exclusively (the kills hit every connection), so a run never overlaps the
//! conformance suite.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::transport::{Channel, ChannelEvent, ConnectOptions, Connection, Transport};
use amqp_rebound_core::{
    Client, ClientBuilder, Confirmation, ConsumeOptions, Endpoint, Event, Message, Object, Phase,
    Properties, QueueDecl, TokioTimer,
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
    /// Connection kills per rhythm and pool shape for the recovery figures
    /// (`--kills`, 20; 0 skips them).
    pub kills: usize,
    /// The times between kills, in ms (`--rhythm-ms 1000,6000`: dense and sparse).
    pub rhythms_ms: Vec<u64>,
    /// The pool shapes of the recovery and restart figures (`--pool
    /// 1x1|default|both`, both).
    pub pools: Vec<Pool>,
    /// Broker restarts per pool shape (`--restart`, 3; 0 skips them).
    pub restarts: usize,
    /// How long the broker stays stopped in a restart, in ms (`--down-ms`, 5,000).
    pub down_ms: u64,
    /// The publisher's rate in the recovery and restart figures, messages per
    /// second (`--rate`, 10,000; see [`recovery`]).
    pub rate: u32,
    /// `--only recovery`: the kills and restarts only, no throughput rounds.
    pub recovery_only: bool,
    /// `--control`: after each series of kills, the same series of calls to the
    /// broker's node without the kills, for the pauses the tool and the machine
    /// cause alone.
    pub control: bool,
    /// Payload size in bytes (`--payload`, 128; at least 8 in the kill part,
    /// which numbers each message in its first 8 bytes).
    pub payload: usize,
    /// Run one side only, `rounds` times, and print its rate and CPU per
    /// message (`--only raw|adapter|single|pool`): for a profiler, which cannot
    /// tell the sides of a full run apart. No ratios, no kills, no JSON. (`--only
    /// recovery` is the other way round: see `recovery_only`.)
    pub only: Option<Only>,
}

/// A side of the throughput comparison, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// The raw client (the baseline).
    Raw,
    /// The raw client's second baseline, where it has one (lapin: each
    /// `basic_publish` awaited; see [`RawJob::second`]).
    Raw2,
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
            rhythms_ms: vec![1000, 6000],
            pools: vec![Pool::Single, Pool::Default],
            restarts: 3,
            down_ms: 5000,
            rate: 10_000,
            recovery_only: false,
            control: false,
            payload: 128,
            only: None,
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
                "--restart" => parsed.restarts = value()?,
                "--down-ms" => parsed.down_ms = value()? as u64,
                "--rate" => {
                    parsed.rate = u32::try_from(value()?)
                        .map_err(|_| "--rate: too large".to_string())?
                        .max(1);
                }
                "--rhythm-ms" => {
                    let list = it.next().ok_or("--rhythm-ms needs a value")?;
                    parsed.rhythms_ms = list
                        .split(',')
                        .map(|ms| match ms.trim().parse::<u64>() {
                            Ok(ms) if ms > 0 => Ok(ms),
                            _ => Err(format!("--rhythm-ms: {ms:?} is not a positive number")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--pool" => {
                    parsed.pools = match it.next().as_deref() {
                        Some("1x1") => vec![Pool::Single],
                        Some("default") => vec![Pool::Default],
                        Some("both") => vec![Pool::Single, Pool::Default],
                        other => {
                            return Err(format!(
                                "--pool takes 1x1, default or both, not {other:?}"
                            ));
                        }
                    };
                }
                "--payload" => parsed.payload = value()?,
                "--control" => parsed.control = true,
                "--only" => {
                    let side = it.next();
                    if side.as_deref() == Some("recovery") {
                        parsed.recovery_only = true;
                        continue;
                    }
                    parsed.only = Some(match side.as_deref() {
                        Some("raw") => Only::Raw,
                        Some("raw2") => Only::Raw2,
                        Some("adapter") => Only::Adapter,
                        Some("single") => Only::Single,
                        Some("pool") => Only::Pool,
                        other => {
                            return Err(format!(
                                "--only takes raw, raw2, adapter, single, pool or recovery, not {other:?}"
                            ));
                        }
                    });
                }
                "-h" | "--help" => {
                    return Err(format!(
                        "usage: {program} [--messages N] [--window W] [--rounds R] \
                         [--kills K] [--rhythm-ms MS[,MS...]] [--pool 1x1|default|both] \
                         [--restart N] [--down-ms MS] [--rate MSGS_PER_S] [--control] \
                         [--payload BYTES] [--only raw|raw2|adapter|single|pool|recovery]"
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

/// CPU time of this process so far (user + system, every thread, as
/// `getrusage` counts it). Zero with `BENCH_NO_CPU_CLOCK` set: rustix's vDSO
/// lookup crashes under valgrind, which a callgrind profile needs.
pub fn process_cpu() -> Duration {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var_os("BENCH_NO_CPU_CLOCK").is_some()) {
        return Duration::ZERO;
    }
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
    /// Run the raw client's second baseline instead of its first (see
    /// [`run`]'s `second`): for lapin, each `basic_publish` awaited before the
    /// next, its confirm kept in the window, as lapin's documentation shows;
    /// the first is pipelined lapin, `buffered(window)` over
    /// publish-then-await-confirm futures.
    pub second: bool,
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

    fn cpu_json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.runs.iter().map(|r| number(r.cpu_us, 2)).collect())
    }
}

/// The throughput figures of one run of a bench binary.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    /// The raw client (its first baseline: the one the ratios are against).
    pub raw: Side,
    /// The raw client's second baseline, labelled, where it has one (lapin:
    /// each `basic_publish` awaited); its ratio is against `raw` too.
    pub raw2: Option<(&'static str, Side)>,
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
/// returns the time from the first publish to the last confirm; with `second`,
/// its second baseline too, under that label), the adapter alone, amqp-rebound
/// 1x1 and amqp-rebound with the default pool over `transport()`, each into a
/// fresh queue that is checked to hold every message afterwards.
pub async fn throughput<T, M, R, Fut>(
    name: &str,
    args: &Args,
    url: &BrokerUrl,
    transport: &M,
    raw: R,
    second: Option<&'static str>,
) -> Result<Throughput, BoxError>
where
    T: Transport,
    M: Fn() -> T,
    R: Fn(RawJob) -> Fut,
    Fut: Future<Output = Result<Duration, BoxError>>,
{
    let sides = Sides::open(args, url, transport, raw).await?;
    let kinds: Vec<Only> = if second.is_some() {
        vec![
            Only::Raw,
            Only::Raw2,
            Only::Adapter,
            Only::Single,
            Only::Pool,
        ]
    } else {
        vec![Only::Raw, Only::Adapter, Only::Single, Only::Pool]
    };
    let orders = williams(kinds.len());
    println!(
        "throughput: {} messages of {} B with confirms, window {}, {} rounds (median); \
         side order: a balanced design of {} rounds{}",
        args.messages,
        args.payload,
        args.window,
        args.rounds,
        orders.len(),
        if args.rounds.is_multiple_of(orders.len()) {
            ""
        } else {
            " (the rounds are not a multiple of it: not balanced)"
        }
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); kinds.len()];
    for round in 1..=args.rounds {
        // The side order of round k is row k of a Williams design: over its rows
        // every side runs in every position equally often and right after every
        // other side equally often, so neither a position nor what the run
        // before left the broker doing (the clean-up of the queue just deleted,
        // say), nor a drift in the machine's load (it is shared), favours a side.
        // (With raw first in odd rounds and last in even ones, as before, 52
        // rounds of bench_amqprs gave the adapter a median ratio of 0.990 when
        // it ran first, 0.968 when it ran second.)
        for &index in &orders[(round - 1) % orders.len()] {
            let run = sides.run(kinds[index]).await?;
            runs[index].push(run);
        }
        let raw = runs[0][round - 1];
        let mut line = format!(
            "  round {round}: raw {name} {:>7.0}/s {:>5.1} us",
            raw.rate, raw.cpu_us
        );
        for (kind, side) in kinds.iter().zip(&runs).skip(1) {
            let run = side[round - 1];
            let label = match kind {
                Only::Raw2 => second.unwrap_or("raw2"),
                other => other.label(),
            };
            line += &format!(
                "   {label} {:>7.0}/s {:>5.1} us ({:.3})",
                run.rate,
                run.cpu_us,
                run.rate / raw.rate
            );
        }
        println!("{line}");
    }
    let raws = runs[0].clone();
    let mut of = |kind: Only| {
        let index = kinds.iter().position(|&k| k == kind)?;
        Some(Side::of(std::mem::take(&mut runs[index]), &raws))
    };
    let (Some(raw), raw2, Some(adapter), Some(single), Some(pooled)) = (
        of(Only::Raw),
        of(Only::Raw2),
        of(Only::Adapter),
        of(Only::Single),
        of(Only::Pool),
    ) else {
        return Err("a side did not run".into());
    };
    let result = Throughput {
        raw,
        raw2: second.zip(raw2),
        adapter,
        single,
        pooled,
    };
    print_throughput(name, &result);
    sides.close().await;
    Ok(result)
}

/// The medians of a throughput run, each side against the raw client's first
/// baseline.
fn print_throughput(name: &str, t: &Throughput) {
    let raw = &t.raw;
    println!(
        "  medians: {:<28}{:>8.0} msg/s   {:>5.1} us CPU/msg",
        format!("raw {name}"),
        raw.rate,
        raw.cpu_us
    );
    let mut rows: Vec<(String, &Side)> = Vec::new();
    if let Some((label, side)) = &t.raw2 {
        rows.push((format!("raw {name}, {label}"), side));
    }
    rows.push(("adapter alone".into(), &t.adapter));
    rows.push(("amqp-rebound 1x1".into(), &t.single));
    rows.push(("amqp-rebound default pool".into(), &t.pooled));
    for (label, side) in rows {
        println!(
            "           {label:<28}{:>8.0} msg/s   {:>5.1} us CPU/msg ({:+.1})   ratio {:.3} \
             (95% interval {:.3}-{:.3})",
            side.rate,
            side.cpu_us,
            side.cpu_us - raw.cpu_us,
            side.ratio,
            side.ratio_ci.0,
            side.ratio_ci.1
        );
    }
    println!(
        "           (ratio: the median of the rounds' rate ratios to raw {name}, with a 95% \
         bootstrap interval; CPU: this process's user + system time per confirmed message, the \
         median of the rounds, and its difference to raw {name}'s)"
    );
}

impl Only {
    /// The side's name in a round's line.
    fn label(self) -> &'static str {
        match self {
            Only::Raw => "raw",
            Only::Raw2 => "raw2",
            Only::Adapter => "adapter",
            Only::Single => "rebound 1x1",
            Only::Pool => "rebound pool",
        }
    }
}

/// The side orders of a Williams design for `n` sides: over its rows every side
/// runs in every position equally often and right after every other side equally
/// often. For an even `n`, one Latin square (`n` rows: 0, 1, n-1, 2, n-2, ...
/// shifted by the row); for an odd `n` that square and its rows reversed (`2n`
/// rows).
fn williams(n: usize) -> Vec<Vec<usize>> {
    let mut first = vec![0];
    let (mut low, mut high) = (1, n);
    for i in 1..n {
        if i % 2 == 1 {
            first.push(low);
            low += 1;
        } else {
            high -= 1;
            first.push(high);
        }
    }
    let mut rows: Vec<Vec<usize>> = (0..n)
        .map(|shift| first.iter().map(|&s| (s + shift) % n).collect())
        .collect();
    if !n.is_multiple_of(2) {
        let reversed: Vec<Vec<usize>> = rows
            .iter()
            .map(|row| row.iter().rev().copied().collect())
            .collect();
        rows.extend(reversed);
    }
    rows
}

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
            second: false,
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
            Only::Raw2 => {
                let job = RawJob {
                    second: true,
                    ..job.clone()
                };
                timed(admin, decl, messages, || (self.raw)(job)).await
            }
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

/// A pool shape of the recovery figures (`--pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// 1 connection x 1 channel.
    Single,
    /// The library's default pool (1 x 4), as `Client::builder()` gives it.
    Default,
}

impl Pool {
    /// The client's builder: the library's defaults, the pool shape aside.
    fn builder(self) -> ClientBuilder {
        match self {
            Pool::Single => Client::builder().pool(1, 1),
            Pool::Default => Client::builder(),
        }
    }

    /// `1x1` or `default`.
    pub fn label(self) -> &'static str {
        match self {
            Pool::Single => "1x1",
            Pool::Default => "default",
        }
    }
}

/// `CONNECTIONSxCHANNELS` of a Ready client, e.g. `1x4`.
fn shape(client: &Client) -> String {
    let state = client.state();
    let connections = state.connections.len().max(1);
    format!("{connections}x{}", state.channels / connections)
}

/// At most this many publishes unresolved at once in the recovery figures: the
/// library's default confirm window.
pub const IN_FLIGHT_CAP: usize = 1024;

/// What one kill did.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    /// Every connection and channel of the client was Ready when its loss came
    /// (tracked from the client's state events up to the loss).
    pub met_ready: bool,
    /// `Client::state().is_ready()` when the kill was called.
    pub ready_at_issue: bool,
    /// From the previous kill's start (zero for the first): the rhythm as run.
    pub since_previous: Duration,
    /// From calling the kill to the client seeing its connection lost
    /// (`None`: no loss seen before the next kill).
    pub loss_after: Option<Duration>,
    /// Connection losses the client reported in this kill's window (1 expected;
    /// more when a redial is lost again).
    pub losses: u32,
    /// Publishes not yet resolved (published, neither confirmed nor failed) when
    /// the client reported the loss: the most a kill may make it re-send.
    pub in_flight: u64,
    /// Publish commands for messages sent before (`Stats::republished`) from this
    /// kill's loss to the next one's.
    pub resent: u64,
    /// Channels that left Ready from this kill's loss to the next one's (the
    /// pool's channel count expected: more means a channel of the new connection
    /// was lost again).
    pub channel_drops: u32,
    /// The longest confirm pause of this kill: the longest gap between two
    /// consecutive confirms, over the gap that spans the loss and every later gap
    /// up to the next kill's loss.
    pub stall: Duration,
    /// When the longest pause began, from the loss, in ms (negative: the pause
    /// spans the loss; `None`: no confirm in the window).
    pub stall_from_ms: Option<f64>,
    /// The longest pause overlapped a call to the broker (this kill's or the
    /// next's): through `rabbitmqctl`, an Erlang VM starting takes CPU from the
    /// client and the broker on a 2-core machine.
    pub stall_during_ctl: bool,
    /// The pause that spans the loss: the recovery's own (zero without a loss).
    pub loss_pause: Duration,
    /// From the previous kill's loss to this one's: the rhythm the client saw.
    pub since_previous_loss: Option<Duration>,
    /// From the loss to the first confirm after the connection was Ready again
    /// (`None`: none seen).
    pub back: Option<Duration>,
    /// Messages of this kill's turn confirmed to the publisher.
    pub confirmed: u64,
    /// Of those, absent from the queue (must be 0).
    pub lost: u64,
    /// Extra copies in the queue of this turn's messages.
    pub duplicates: u64,
}

/// The recovery figures of one rhythm and pool shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The time between kills.
    pub rhythm: Duration,
    /// The pool asked for.
    pub pool: Pool,
    /// The shape the client had (`1x4` for the default pool).
    pub shape: String,
    /// A control run: a call to the broker's node that changes nothing instead
    /// of the kills.
    pub control: bool,
    /// Messages published in all.
    pub published: u64,
    /// One per kill, in order.
    pub kills: Vec<Kill>,
    /// Publishes that resolved other than confirmed (timed out, nacked, ...).
    pub not_confirmed: u64,
    /// Longest confirm pause per kill, p50 / p99 / max in milliseconds (NaN
    /// without kills).
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

    /// Kills whose loss met a client with every connection and channel Ready.
    pub fn met_ready(&self) -> usize {
        self.kills.iter().filter(|k| k.met_ready).count()
    }

    /// Loss -> first confirm after the reconnect, per kill that had both (ms).
    pub fn backs(&self) -> Vec<f64> {
        self.kills.iter().filter_map(|k| k.back.map(ms)).collect()
    }

    /// The pause spanning each kill's loss (ms), per kill with a loss.
    pub fn loss_pauses(&self) -> Vec<f64> {
        self.kills
            .iter()
            .filter(|k| k.loss_after.is_some())
            .map(|k| ms(k.loss_pause))
            .collect()
    }

    /// Kills that made the client re-send more than it had in flight.
    pub fn over_resent(&self) -> usize {
        self.kills.iter().filter(|k| k.resent > k.in_flight).count()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 and max of `values` (NaN when empty).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN),
    )
}

/// The payload of message `seq`: its number (big-endian) then `x` up to `len`
/// (at least 8 bytes).
fn numbered(seq: u64, len: usize) -> Bytes {
    let mut body = vec![b'x'; len.max(8)];
    body[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(body)
}

/// What the publisher of the recovery figures has done so far.
#[derive(Debug, Default)]
struct Published {
    /// Numbers handed out (the next message's number).
    next_seq: AtomicU64,
    /// Published, not yet resolved.
    unresolved: AtomicUsize,
    /// When each confirm came, and the message's number, in order.
    confirms: Mutex<Vec<(Instant, u64)>>,
    /// Resolved other than confirmed.
    not_confirmed: AtomicU64,
    /// The index of the queue published to.
    target: AtomicUsize,
}

impl Published {
    /// The first confirm that came after `after`, if any.
    fn confirm_after(&self, after: Instant) -> Option<Instant> {
        let confirms = self.confirms.lock().expect("not poisoned");
        let at = confirms.partition_point(|&(t, _)| t <= after);
        confirms.get(at).map(|&(t, _)| t)
    }

    /// Waits (up to `limit`) for a confirm after `after`.
    async fn wait_confirm_after(&self, after: Instant, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.confirm_after(after) {
                return Some(at);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A steady publisher of numbered messages: `rate` per second on a fixed
/// schedule, at most [`IN_FLIGHT_CAP`] unresolved (when a loss holds the
/// confirms back it waits, then catches up with the schedule as fast as the
/// cap lets it).
///
/// Why 10,000/s by default (`--rate`) rather than a slower publisher: twenty
/// kills a second apart then span 200,000 publishes, with up to 1,024 in flight
/// when a loss holds the confirms back: a client under real load, not an idle
/// one. On this 2-core machine it is about a quarter of what one client
/// confirms per second, so the broker and the client keep up between kills.
struct Publisher {
    published: Arc<Published>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Publishes to `queues[published.target]` (the caller moves the target).
    fn start(client: &Client, queues: Vec<String>, rate: u32, payload_len: usize) -> Publisher {
        let published = Arc::new(Published::default());
        let stop = Arc::new(AtomicBool::new(false));
        let period_ns = 1_000_000_000 / u64::from(rate.max(1));
        let task = {
            let client = client.clone();
            let published = Arc::clone(&published);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut ticks = 0u64;
                let mut in_flight = FuturesUnordered::new();
                loop {
                    let stopping = stop.load(Ordering::SeqCst);
                    if stopping && in_flight.is_empty() {
                        break;
                    }
                    let next = start + Duration::from_nanos(period_ns.saturating_mul(ticks));
                    tokio::select! {
                        () = tokio::time::sleep_until(next),
                            if !stopping && in_flight.len() < IN_FLIGHT_CAP =>
                        {
                            let seq = ticks;
                            ticks += 1;
                            published.next_seq.store(ticks, Ordering::SeqCst);
                            published.unresolved.fetch_add(1, Ordering::SeqCst);
                            let client = client.clone();
                            let payload = numbered(seq, payload_len);
                            let target = published.target.load(Ordering::SeqCst);
                            let queue = queues[target.min(queues.len() - 1)].clone();
                            in_flight.push(async move {
                                let result = client
                                    .publish("", &queue, payload, Properties::default())
                                    .await;
                                (seq, result == Ok(Confirmation::Confirmed))
                            });
                        }
                        Some((seq, ok)) = in_flight.next(), if !in_flight.is_empty() => {
                            let at = Instant::now();
                            published.unresolved.fetch_sub(1, Ordering::SeqCst);
                            if ok {
                                published.confirms.lock().expect("not poisoned").push((at, seq));
                            } else {
                                published.not_confirmed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }
            })
        };
        Publisher {
            published,
            stop,
            task,
        }
    }

    /// Stops publishing and waits (up to 35 s: the publish timeout is 30 s) for
    /// every publish to resolve.
    async fn stop(self) -> Result<Arc<Published>, BoxError> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(35), self.task)
            .await
            .map_err(|_| "the publisher did not finish within 35 s")??;
        Ok(self.published)
    }
}

/// A state change the client reported.
#[derive(Debug, Clone, Copy)]
struct Change {
    /// When the event came.
    at: Instant,
    object: Object,
    from: Phase,
    to: Phase,
    /// Every connection and channel was Ready just before it.
    all_ready_before: bool,
    /// The publisher's unresolved publishes then.
    in_flight: usize,
    /// `Stats::republished` then.
    republished: u64,
}

impl Change {
    /// A connection or channel leaving Ready, or a connection lost while it was
    /// still dialling: what a kill does first.
    fn disrupts(&self) -> bool {
        self.from == Phase::Ready || self.is_loss()
    }

    /// A connection lost (or a dial failed).
    fn is_loss(&self) -> bool {
        matches!(self.object, Object::Connection(_)) && self.to == Phase::Reconnecting
    }
}

/// What a kill (or a restart) did to the client first.
#[derive(Debug, Clone, Copy)]
struct Loss {
    /// When the client reported it (its first state change after the kill:
    /// the channels leave Ready in the same step as their connection).
    at: Instant,
    /// Every connection and channel was Ready just before it.
    met_ready: bool,
    /// The publisher's unresolved publishes then.
    in_flight: usize,
    /// `Stats::republished` then (before the loss's re-sends: they wait for
    /// the new connection).
    republished: u64,
}

/// What the client's event stream said.
#[derive(Debug, Default, Clone)]
struct Watched {
    /// Every state change, in order.
    changes: Vec<Change>,
    /// Each failed dial (or lost connection): when, and the delay to the next dial.
    failures: Vec<(Instant, Duration)>,
}

impl Watched {
    /// The first disruption in `[from, until)`.
    fn loss(&self, from: Instant, until: Option<Instant>) -> Option<Loss> {
        self.changes
            .iter()
            .filter(|c| c.at >= from && until.is_none_or(|u| c.at < u))
            .find(|c| c.disrupts())
            .map(|c| Loss {
                at: c.at,
                met_ready: c.all_ready_before,
                in_flight: c.in_flight,
                republished: c.republished,
            })
    }

    /// Channels leaving Ready in `[from, until)`.
    fn channel_drops(&self, from: Instant, until: Option<Instant>) -> u32 {
        let n = self
            .changes
            .iter()
            .filter(|c| {
                c.at >= from
                    && until.is_none_or(|u| c.at < u)
                    && matches!(c.object, Object::Channel(_))
                    && c.from == Phase::Ready
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Connection losses in `[from, until)`.
    fn losses(&self, from: Instant, until: Option<Instant>) -> u32 {
        let n = self
            .changes
            .iter()
            .filter(|c| c.at >= from && until.is_none_or(|u| c.at < u) && c.is_loss())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The first time after `after` that a connection became Ready.
    fn reconnected(&self, after: Instant) -> Option<Instant> {
        self.changes
            .iter()
            .find(|c| {
                c.at > after && matches!(c.object, Object::Connection(_)) && c.to == Phase::Ready
            })
            .map(|c| c.at)
    }
}

/// Follows the client's events: its state changes (with whether the client was
/// all Ready before each, and what was in flight) and failed dials. With
/// `BENCH_TRACE_EVENTS` set, prints every event to stderr.
struct Watcher {
    watched: Arc<Mutex<Watched>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching a client that is all Ready now.
    fn start(client: &Client, published: &Arc<Published>) -> Watcher {
        let watched = Arc::new(Mutex::new(Watched::default()));
        let mut events = client.watch();
        let task = {
            let client = client.clone();
            let watched = Arc::clone(&watched);
            let published = Arc::clone(published);
            tokio::spawn(async move {
                // the connections and channels not Ready now
                let mut not_ready: HashSet<Object> = HashSet::new();
                let trace = std::env::var_os("BENCH_TRACE_EVENTS").is_some();
                let t0 = Instant::now();
                while let Some(event) = events.next().await {
                    let at = Instant::now();
                    if trace {
                        eprintln!("{:>10.3} ms  {event:?}", ms(at - t0));
                    }
                    match event {
                        Event::StateChanged {
                            object, from, to, ..
                        } => {
                            let change = Change {
                                at,
                                object,
                                from,
                                to,
                                all_ready_before: not_ready.is_empty(),
                                in_flight: published.unresolved.load(Ordering::SeqCst),
                                republished: client.stats().republished,
                            };
                            watched.lock().expect("not poisoned").changes.push(change);
                            if to == Phase::Ready {
                                not_ready.remove(&object);
                            } else {
                                not_ready.insert(object);
                            }
                        }
                        Event::RecoveryFailed { retry_in, .. } => {
                            let failure = (at, retry_in);
                            watched.lock().expect("not poisoned").failures.push(failure);
                        }
                        _ => {}
                    }
                }
            })
        };
        Watcher { watched, task }
    }

    /// What it saw so far.
    fn watched(&self) -> Watched {
        self.watched.lock().expect("not poisoned").clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The longest gap between consecutive `confirms` (sorted) per kill, and when
/// it began; the kills at `moments` (sorted). A gap that spans one or more
/// moments is the first of those kills'; any other gap is the last kill's
/// before it. Gaps before the first moment, or ending after `end`, count for
/// none.
fn longest_pauses(
    confirms: &[Instant],
    moments: &[Instant],
    end: Instant,
) -> Vec<(Duration, Option<Instant>)> {
    let mut pauses = vec![(Duration::ZERO, None); moments.len()];
    for pair in confirms.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b > end {
            break;
        }
        // the first kill after a
        let first = moments.partition_point(|&m| m <= a);
        let kill = if first < moments.len() && moments[first] <= b {
            first
        } else if first == 0 {
            continue;
        } else {
            first - 1
        };
        if b - a > pauses[kill].0 {
            pauses[kill] = (b - a, Some(a));
        }
    }
    pauses
}

/// `at - from` in ms, negative when `at` is earlier.
fn signed_ms(at: Instant, from: Instant) -> f64 {
    if at >= from {
        ms(at - from)
    } else {
        -ms(from - at)
    }
}

/// When a kill was started.
#[derive(Debug, Clone, Copy)]
struct Issued {
    at: Instant,
    /// When its call to the broker returned.
    done: Instant,
    ready: bool,
    seq: u64,
    republished: u64,
}

/// How the benches reach the broker's node: a standing [`ControlNode`] (the
/// broker acts within milliseconds, the machine is not loaded by the tool), or
/// `rabbitmqctl` where no such node can be started (an Erlang VM booted per
/// call: 0.4-2.4 s before the broker acts, one of two cores taken meanwhile).
///
/// [`ControlNode`]: broker::ControlNode
enum Tool {
    Node(Box<broker::ControlNode>),
    Ctl,
}

impl Tool {
    async fn start() -> Tool {
        match broker::ControlNode::start().await {
            Ok(node) => {
                println!("  broker calls through a standing Erlang control node ({node:?})");
                Tool::Node(Box::new(node))
            }
            Err(e) => {
                println!("  broker calls through rabbitmqctl (no control node: {e})");
                Tool::Ctl
            }
        }
    }

    async fn close_all_connections(&mut self, reason: &str) {
        match self {
            Tool::Node(node) => node
                .close_all_connections(reason)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Tool::Ctl => broker::close_all_connections(reason).await,
        }
    }

    async fn ping(&mut self) {
        match self {
            Tool::Node(node) => node.ping().await.unwrap_or_else(|e| panic!("{e}")),
            Tool::Ctl => {
                broker::ctl(&["eval", "ok."]).await;
            }
        }
    }
}

/// `kills` times, one every `rhythm`: the broker closes every connection
/// (`close_all_connections`, through a standing [`broker::ControlNode`] or
/// `rabbitmqctl`) while a client over `transport()`, built with the library's
/// defaults but for its `pool` shape, publishes
/// numbered messages at `rate` per second (see the `Publisher` type in this module), each kill's turn
/// to its own queue; then the queues are read back to count what was lost and
/// duplicated per kill. The kills come
/// on a fixed schedule, whatever the client's state (a kill starts late only
/// when the previous call took longer than `rhythm`). `name` labels
/// the broker's kill reason.
///
/// `control`: the same schedule of calls to the broker's node, without the
/// kills: the confirm pauses the machine and the tool cause on their own.
#[allow(clippy::too_many_arguments)]
pub async fn recovery<T, M>(
    name: &str,
    url: &BrokerUrl,
    rhythm: Duration,
    pool: Pool,
    kills: usize,
    control: bool,
    rate: u32,
    payload_len: usize,
    transport: &M,
) -> Result<Recovery, BoxError>
where
    T: Transport,
    M: Fn() -> T,
{
    let client = start_client(url, pool.builder(), transport());
    ready(&client).await?;
    let shape = shape(&client);
    // One queue per kill: kill k's turn publishes to queue k, so no queue holds
    // more than one turn's messages. With one queue for a whole sparse run (1.2
    // million messages at 10,000/s, nothing consuming) the broker paused its
    // confirms by itself, longer as the queue grew (~0.1 s early on, 0.6-1.4 s
    // near the end, seconds away from any kill): a deep queue's cost in the
    // broker, not the client's recovery. The first queue is declared through the
    // client, so each recovery replays one declaration as an application's
    // would; the others through an admin connection, so that replay does not
    // grow with the number of kills.
    let decls: Vec<QueueDecl> = (0..kills.max(1))
        .map(|k| bench_queue(unique(&format!("bench-stall-{k}"))))
        .collect();
    client.declare_queue(decls[0].clone()).await?;
    let admin = Admin::open(transport(), url, "bench admin").await?;
    for decl in &decls[1..] {
        admin.channel.declare_queue(decl).await?;
    }
    admin.close().await;
    println!(
        "recovery{}: {kills} x {}, one every {} ms, pool {shape} ({}), library defaults; \
         {rate} msg/s, at most {IN_FLIGHT_CAP} unresolved",
        if control { " (control)" } else { "" },
        if control {
            "a call to the broker's node (no kill)"
        } else {
            "close_all_connections"
        },
        rhythm.as_millis(),
        pool.label()
    );
    let names = decls.iter().map(|d| d.name.clone()).collect();
    let publisher = Publisher::start(&client, names, rate, payload_len);
    let published = Arc::clone(&publisher.published);
    let watcher = Watcher::start(&client, &published);
    // a steady start: confirms flowing for a second before the first kill
    tokio::time::sleep(Duration::from_secs(1)).await;

    let reason = format!("bench_{name}: kill");
    let mut tool = Tool::start().await;
    let first = tokio::time::Instant::now();
    let mut issued = Vec::with_capacity(kills);
    for k in 0..kills {
        tokio::time::sleep_until(first + rhythm * u32::try_from(k).unwrap_or(u32::MAX)).await;
        let at = Instant::now();
        published.target.store(k, Ordering::SeqCst);
        let ready = client.state().is_ready();
        let seq = published.next_seq.load(Ordering::SeqCst);
        let republished = client.stats().republished;
        if control {
            // the same call to the broker's node, without the kill
            tool.ping().await;
        } else {
            tool.close_all_connections(&reason).await;
        }
        issued.push(Issued {
            at,
            done: Instant::now(),
            ready,
            seq,
            republished,
        });
    }
    tokio::time::sleep_until(first + rhythm * u32::try_from(kills).unwrap_or(u32::MAX)).await;
    // the last kill's window ends once its pause has (a confirm after its loss)
    let watched = watcher.watched();
    if let Some(last) = issued.last()
        && let Some(loss) = watched.loss(last.at, None)
    {
        let back = watched.reconnected(loss.at).unwrap_or(loss.at);
        published
            .wait_confirm_after(back, Duration::from_secs(30))
            .await
            .ok_or("no confirm within 30 s of the last loss")?;
    }
    let end = Instant::now();
    let end_republished = client.stats().republished;
    let watched = watcher.watched();
    drop(watcher);
    let published = publisher.stop().await?;

    // read the queues back (after the last kill: no connection dies now)
    let mut copies: HashMap<u64, u32> = HashMap::new();
    for decl in &decls {
        for (seq, n) in read_back(transport(), url, decl).await? {
            *copies.entry(seq).or_default() += n;
        }
    }
    let _ = client.delete_queue(decls[0].name.as_str()).await;
    client.close().await;
    let admin = Admin::open(transport(), url, "bench admin").await?;
    for decl in &decls[1..] {
        let _ = admin.channel.delete_queue(&decl.name).await;
    }
    admin.close().await;

    let confirms = std::mem::take(&mut *published.confirms.lock().expect("not poisoned"));
    let times: Vec<Instant> = confirms.iter().map(|&(t, _)| t).collect();
    // per kill: what it did first, in its window (up to the next kill's start)
    let windows: Vec<(Instant, Option<Instant>)> = issued
        .iter()
        .enumerate()
        .map(|(k, i)| (i.at, issued.get(k + 1).map(|n| n.at)))
        .collect();
    let first_loss: Vec<Option<Loss>> = windows
        .iter()
        .map(|&(from, until)| watched.loss(from, until))
        .collect();
    let moments: Vec<Instant> = issued
        .iter()
        .zip(&first_loss)
        .map(|(i, l)| l.map_or(i.at, |l| l.at))
        .collect();
    let pauses = longest_pauses(&times, &moments, end);
    let mut outcome: Vec<Kill> = issued
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let loss = first_loss[k];
            // the re-sends from this kill's loss to the next one's
            let republished_at =
                |k: usize| first_loss[k].map_or(issued[k].republished, |l| l.republished);
            let next_republished = if k + 1 < issued.len() {
                republished_at(k + 1)
            } else {
                end_republished
            };
            let (from, until) = windows[k];
            Kill {
                met_ready: loss.is_some_and(|l| l.met_ready),
                ready_at_issue: i.ready,
                since_previous: k.checked_sub(1).map_or(Duration::ZERO, |p| {
                    i.at.saturating_duration_since(issued[p].at)
                }),
                loss_after: loss.map(|l| l.at.saturating_duration_since(i.at)),
                losses: watched.losses(from, until),
                in_flight: loss.map_or(0, |l| l.in_flight as u64),
                resent: next_republished.saturating_sub(republished_at(k)),
                channel_drops: watched
                    .channel_drops(moments[k], moments.get(k + 1).copied().or(Some(end))),
                stall: pauses[k].0,
                stall_from_ms: pauses[k].1.map(|start| signed_ms(start, moments[k])),
                stall_during_ctl: pauses[k].1.is_some_and(|start| {
                    let stop = start + pauses[k].0;
                    issued.iter().any(|i| i.at < stop && start < i.done)
                }),
                loss_pause: loss.map_or(Duration::ZERO, |l| {
                    let after = times.partition_point(|&t| t <= l.at);
                    match (after.checked_sub(1).map(|b| times[b]), times.get(after)) {
                        (Some(a), Some(&b)) => b - a,
                        _ => Duration::ZERO,
                    }
                }),
                since_previous_loss: k
                    .checked_sub(1)
                    .and_then(|p| Some(loss?.at.saturating_duration_since(first_loss[p]?.at))),
                back: loss.and_then(|l| {
                    let reconnected = watched.reconnected(l.at)?;
                    let at = times.partition_point(|&t| t <= reconnected);
                    times.get(at).map(|&t| t.saturating_duration_since(l.at))
                }),
                confirmed: 0,
                lost: 0,
                duplicates: 0,
            }
        })
        .collect();
    // turn k owns the numbers from the start of kill k to the start of the next
    let mut starts: Vec<u64> = issued.iter().map(|i| i.seq).collect();
    if let Some(s) = starts.first_mut() {
        *s = 0;
    }
    let turn = |seq: u64| starts.partition_point(|&s| s <= seq).saturating_sub(1);
    if !outcome.is_empty() {
        for &(_, seq) in &confirms {
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
    let (p50_ms, p99_ms, max_ms) = spread(&outcome.iter().map(|k| ms(k.stall)).collect::<Vec<_>>());
    let recovery = Recovery {
        rhythm,
        pool,
        shape,
        control,
        published: published.next_seq.load(Ordering::SeqCst),
        kills: outcome,
        not_confirmed: published.not_confirmed.load(Ordering::SeqCst),
        p50_ms,
        p99_ms,
        max_ms,
    };
    print_recovery(&recovery);
    Ok(recovery)
}

/// An optional duration in ms, or `-`.
fn ms_or_dash(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{:.1}", ms(d)))
}

fn print_recovery(r: &Recovery) {
    println!(
        "  kill  Ready at loss (at start)  loss after  since last loss  losses (channels)  in flight  \
         re-sent  longest pause (from loss, ctl)  pause at loss  loss->confirm  confirmed  lost  \
         duplicates"
    );
    for (i, k) in r.kills.iter().enumerate() {
        println!(
            "  {:>4}  {:>13} ({:>3})  {:>7} ms  {:>12} ms  {:>6} ({:>8})  {:>9}  {:>7}  {:>7.1} ms \
             ({:>7} ms, {:>3})  {:>10.1} ms  {:>10} ms  {:>9}  {:>4}  {:>10}",
            i + 1,
            if k.met_ready { "yes" } else { "NO" },
            if k.ready_at_issue { "yes" } else { "no" },
            ms_or_dash(k.loss_after),
            ms_or_dash(k.since_previous_loss),
            k.losses,
            k.channel_drops,
            k.in_flight,
            k.resent,
            ms(k.stall),
            k.stall_from_ms
                .map_or_else(|| "-".to_string(), |d| format!("{d:+.1}")),
            if k.stall_during_ctl { "yes" } else { "no" },
            ms(k.loss_pause),
            ms_or_dash(k.back),
            k.confirmed,
            k.lost,
            k.duplicates
        );
    }
    let (b50, b99, bmax) = spread(&r.backs());
    let (l50, l99, lmax) = spread(&r.loss_pauses());
    println!(
        "  longest confirm pause per kill: p50 {:.1} ms (target <= 50)   p99 {:.1} ms \
         (target <= 200)   max {:.1} ms   ({} of {} during a broker call)",
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.kills.iter().filter(|k| k.stall_during_ctl).count(),
        r.kills.len()
    );
    println!(
        "  the pause spanning the loss: p50 {l50:.1} / p99 {l99:.1} / max {lmax:.1} ms;   \
         loss -> first confirm after the reconnect: p50 {b50:.1} / p99 {b99:.1} / max \
         {bmax:.1} ms"
    );
    let starts: Vec<f64> = r
        .kills
        .iter()
        .skip(1)
        .map(|k| ms(k.since_previous))
        .collect();
    let (s50, _, smax) = spread(&starts);
    let spacing: Vec<f64> = r
        .kills
        .iter()
        .filter_map(|k| k.since_previous_loss.map(ms))
        .collect();
    let (g50, _, gmax) = spread(&spacing);
    let gmin = spacing.iter().copied().fold(f64::NAN, f64::min);
    println!(
        "  kills started p50 {s50:.0} ms apart (longest {smax:.0}); the losses came p50 \
         {g50:.0} ms apart (shortest {gmin:.0}, longest {gmax:.0})"
    );
    println!(
        "  kills that met a Ready client: {} of {} ({} Ready when the kill was called)   \
         re-sent {} in all, {} in flight at the losses; kills re-sending more than in flight: \
         {}   losses {}",
        r.met_ready(),
        r.kills.len(),
        r.kills.iter().filter(|k| k.ready_at_issue).count(),
        r.kills.iter().map(|k| k.resent).sum::<u64>(),
        r.kills.iter().map(|k| k.in_flight).sum::<u64>(),
        r.over_resent(),
        r.kills.iter().map(|k| k.losses).sum::<u32>()
    );
    println!(
        "  published {}   lost {} (must be 0)   duplicates {}   not confirmed {}",
        r.published,
        r.lost(),
        r.duplicates(),
        r.not_confirmed
    );
}

/// What one broker restart did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    /// From `stop_app` returning to `start_app` being started (the broker down).
    pub down: Duration,
    /// From the broker accepting again to the first confirm after it, in ms:
    /// the outage's end as the user sees it (see [`restarts`] for "accepting").
    pub end_ms: f64,
    /// From the client seeing its connection lost to that first confirm.
    pub stall: Duration,
    /// `RecoveryFailed` events from the loss to that confirm (the loss's own
    /// included, then one per failed dial).
    pub failures: usize,
    /// When the dial pending as the broker came back was due, from the moment
    /// it accepted (ms; negative: due before; `None`: no failed dial).
    pub next_dial_ms: Option<f64>,
    /// Publishes not yet resolved when the client reported the loss.
    pub in_flight: u64,
    /// `Stats::republished` from the stop to the next restart (or the end).
    pub resent: u64,
}

/// The restart figures of one pool shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Restarts {
    /// The pool asked for.
    pub pool: Pool,
    /// The shape the client had.
    pub shape: String,
    /// One per restart.
    pub outages: Vec<Outage>,
    /// Publishes that resolved other than confirmed.
    pub not_confirmed: u64,
    /// Outage end p50 / p99 / max in ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
}

/// When the broker accepts connections again: a TCP connect to it every 10 ms,
/// and after each one that succeeds an AMQP handshake through `transport`;
/// the start of the first attempt whose handshake completes. Gives up after
/// `limit`.
async fn accepting<T: Transport>(
    transport: T,
    url: &BrokerUrl,
    limit: Duration,
) -> Result<Instant, BoxError> {
    let endpoint = Endpoint::parse(&url.url())?;
    let addr = url.socket_addr();
    let deadline = Instant::now() + limit;
    loop {
        let attempt = Instant::now();
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let options = ConnectOptions::named("bench probe");
            if let Ok(Ok(connection)) = tokio::time::timeout(
                Duration::from_secs(5),
                transport.connect(&endpoint, &options),
            )
            .await
            {
                let _ = connection.close().await;
                return Ok(attempt);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the broker did not accept a connection within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `restarts` times: `rabbitmqctl stop_app`, `down` later `start_app` (and
/// `await_startup`), while a client over `transport()` (library defaults, `pool`
/// shape) publishes as in [`recovery`]. The outage's end is measured from the
/// broker accepting again, i.e. the start of the first probe connection whose
/// AMQP handshake completes (a TCP connect every 10 ms from the moment
/// `stop_app` returned, each success followed by a handshake), to the first
/// publish confirmed after it. The app is restarted even when something fails
/// on the way ([`broker::AppGuard`]). The queue is not durable, so the restart
/// empties it: no lost / duplicate count here.
#[allow(clippy::too_many_arguments)]
pub async fn restarts<T, M>(
    url: &BrokerUrl,
    pool: Pool,
    restarts: usize,
    down: Duration,
    rate: u32,
    payload_len: usize,
    transport: &M,
) -> Result<Restarts, BoxError>
where
    T: Transport,
    M: Fn() -> T,
{
    let client = start_client(url, pool.builder(), transport());
    ready(&client).await?;
    let shape = shape(&client);
    let decl = bench_queue(unique("bench-restart"));
    client.declare_queue(decl.clone()).await?;
    println!(
        "restart: {restarts} x stop_app, {} s down, start_app; pool {shape} ({}), library \
         defaults; {rate} msg/s, at most {IN_FLIGHT_CAP} unresolved",
        down.as_secs_f64(),
        pool.label()
    );
    let publisher = Publisher::start(&client, vec![decl.name.clone()], rate, payload_len);
    let published = Arc::clone(&publisher.published);
    let watcher = Watcher::start(&client, &published);
    let mut outages = Vec::with_capacity(restarts);
    let mut starts = Vec::with_capacity(restarts);
    for _ in 0..restarts {
        // steady: Ready, confirms flowing, for longer than reset_after
        ready(&client).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let issued = Instant::now();
        let republished = client.stats().republished;
        let guard = broker::stop_app().await;
        let stopped = Instant::now();
        let (accept, ()) = futures::join!(
            accepting(transport(), url, down + Duration::from_secs(120)),
            async {
                tokio::time::sleep(down).await;
                // start_app + await_startup; the guard restarts the app if this
                // future is dropped first
                guard.start().await;
            }
        );
        let start_issued = stopped + down;
        let accept = accept?;
        let back = published
            .wait_confirm_after(accept, Duration::from_secs(30))
            .await
            .ok_or("no confirm within 30 s of the broker accepting again")?;
        let watched = watcher.watched();
        let loss = watched
            .loss(issued, None)
            .ok_or("no connection loss seen after stop_app")?;
        let failures: Vec<(Instant, Duration)> = watched
            .failures
            .into_iter()
            .filter(|&(at, _)| at >= loss.at && at <= back)
            .collect();
        let next_dial_ms = failures
            .iter()
            .rev()
            .find(|&&(at, _)| at <= accept)
            .map(|&(at, retry_in)| signed_ms(at + retry_in, accept));
        starts.push(republished);
        outages.push(Outage {
            down: start_issued.saturating_duration_since(stopped),
            end_ms: signed_ms(back, accept),
            stall: back.saturating_duration_since(loss.at),
            failures: failures.len(),
            next_dial_ms,
            in_flight: loss.in_flight as u64,
            resent: 0,
        });
    }
    ready(&client).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end_republished = client.stats().republished;
    drop(watcher);
    let published = publisher.stop().await?;
    let _ = client.delete_queue(decl.name.as_str()).await;
    client.close().await;
    for (i, outage) in outages.iter_mut().enumerate() {
        let next = starts.get(i + 1).copied().unwrap_or(end_republished);
        outage.resent = next.saturating_sub(starts[i]);
    }
    let (p50_ms, p99_ms, max_ms) = spread(&outages.iter().map(|o| o.end_ms).collect::<Vec<_>>());
    let result = Restarts {
        pool,
        shape,
        outages,
        not_confirmed: published.not_confirmed.load(Ordering::SeqCst),
        p50_ms,
        p99_ms,
        max_ms,
    };
    print_restarts(&result);
    Ok(result)
}

fn print_restarts(r: &Restarts) {
    println!(
        "  restart  down  accepting->confirm  loss->confirm  failures  next dial due  \
         in flight  re-sent"
    );
    for (i, o) in r.outages.iter().enumerate() {
        println!(
            "  {:>7}  {:>4.1} s  {:>15.1} ms  {:>10.1} ms  {:>8}  {:>10} ms  {:>9}  {:>7}",
            i + 1,
            o.down.as_secs_f64(),
            o.end_ms,
            ms(o.stall),
            o.failures,
            o.next_dial_ms
                .map_or_else(|| "-".to_string(), |d| format!("{d:.1}")),
            o.in_flight,
            o.resent
        );
    }
    println!(
        "  outage end (broker accepting -> first confirm): p50 {:.1} ms (target <= 1000)   \
         p99 {:.1} ms (target <= 2500)   max {:.1} ms",
        r.p50_ms, r.p99_ms, r.max_ms
    );
    println!(
        "  re-sent {} in all, {} in flight at the losses; restarts re-sending more than in \
         flight: {}   not confirmed {}",
        r.outages.iter().map(|o| o.resent).sum::<u64>(),
        r.outages.iter().map(|o| o.in_flight).sum::<u64>(),
        r.outages.iter().filter(|o| o.resent > o.in_flight).count(),
        r.not_confirmed
    );
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

fn ms_json(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| number(ms(d), 1))
}

impl Recovery {
    /// Its figures as a JSON object.
    pub fn json(&self) -> serde_json::Value {
        let kills = &self.kills;
        let (b50, b99, bmax) = spread(&self.backs());
        let (l50, l99, lmax) = spread(&self.loss_pauses());
        serde_json::json!({
            "rhythm_ms": self.rhythm.as_millis() as u64,
            "control": self.control,
            "pool": self.pool.label(),
            "shape": self.shape,
            "kills": kills.len(),
            "published": self.published,
            "pause_p50_ms": number(self.p50_ms, 1),
            "pause_p99_ms": number(self.p99_ms, 1),
            "pause_max_ms": number(self.max_ms, 1),
            "pause_at_loss_p50_ms": number(l50, 1),
            "pause_at_loss_p99_ms": number(l99, 1),
            "pause_at_loss_max_ms": number(lmax, 1),
            "kills_pause_during_broker_call": kills.iter().filter(|k| k.stall_during_ctl).count(),
            "loss_to_confirm_p50_ms": number(b50, 1),
            "loss_to_confirm_p99_ms": number(b99, 1),
            "loss_to_confirm_max_ms": number(bmax, 1),
            "kills_met_ready": self.met_ready(),
            "kills_ready_at_issue": kills.iter().filter(|k| k.ready_at_issue).count(),
            "resent": kills.iter().map(|k| k.resent).sum::<u64>(),
            "in_flight_at_losses": kills.iter().map(|k| k.in_flight).sum::<u64>(),
            "kills_resending_more_than_in_flight": self.over_resent(),
            "lost": self.lost(),
            "duplicates": self.duplicates(),
            "not_confirmed": self.not_confirmed,
            "pause_per_kill_ms": kills.iter().map(|k| number(ms(k.stall), 1)).collect::<Vec<_>>(),
            "pause_at_loss_per_kill_ms": kills.iter().map(|k| number(ms(k.loss_pause), 1)).collect::<Vec<_>>(),
            "pause_during_broker_call_per_kill": kills.iter().map(|k| k.stall_during_ctl).collect::<Vec<_>>(),
            "since_previous_loss_per_kill_ms": kills.iter().map(|k| ms_json(k.since_previous_loss)).collect::<Vec<_>>(),
            "pause_from_loss_per_kill_ms": kills.iter().map(|k| k.stall_from_ms.map_or(serde_json::Value::Null, |d| number(d, 1))).collect::<Vec<_>>(),
            "loss_to_confirm_per_kill_ms": kills.iter().map(|k| ms_json(k.back)).collect::<Vec<_>>(),
            "loss_after_start_per_kill_ms": kills.iter().map(|k| ms_json(k.loss_after)).collect::<Vec<_>>(),
            "since_previous_per_kill_ms": kills.iter().map(|k| number(ms(k.since_previous), 0)).collect::<Vec<_>>(),
            "met_ready_per_kill": kills.iter().map(|k| k.met_ready).collect::<Vec<_>>(),
            "ready_at_issue_per_kill": kills.iter().map(|k| k.ready_at_issue).collect::<Vec<_>>(),
            "losses_per_kill": kills.iter().map(|k| k.losses).collect::<Vec<_>>(),
            "channel_drops_per_kill": kills.iter().map(|k| k.channel_drops).collect::<Vec<_>>(),
            "in_flight_per_kill": kills.iter().map(|k| k.in_flight).collect::<Vec<_>>(),
            "resent_per_kill": kills.iter().map(|k| k.resent).collect::<Vec<_>>(),
            "confirmed_per_kill": kills.iter().map(|k| k.confirmed).collect::<Vec<_>>(),
            "lost_per_kill": kills.iter().map(|k| k.lost).collect::<Vec<_>>(),
            "duplicates_per_kill": kills.iter().map(|k| k.duplicates).collect::<Vec<_>>(),
        })
    }
}

impl Restarts {
    /// Its figures as a JSON object.
    pub fn json(&self) -> serde_json::Value {
        let o = &self.outages;
        serde_json::json!({
            "pool": self.pool.label(),
            "shape": self.shape,
            "restarts": o.len(),
            "outage_end_p50_ms": number(self.p50_ms, 1),
            "outage_end_p99_ms": number(self.p99_ms, 1),
            "outage_end_max_ms": number(self.max_ms, 1),
            "not_confirmed": self.not_confirmed,
            "resent": o.iter().map(|x| x.resent).sum::<u64>(),
            "in_flight_at_losses": o.iter().map(|x| x.in_flight).sum::<u64>(),
            "outage_end_per_restart_ms": o.iter().map(|x| number(x.end_ms, 1)).collect::<Vec<_>>(),
            "loss_to_confirm_per_restart_ms": o.iter().map(|x| number(ms(x.stall), 1)).collect::<Vec<_>>(),
            "down_per_restart_s": o.iter().map(|x| number(x.down.as_secs_f64(), 2)).collect::<Vec<_>>(),
            "failures_per_restart": o.iter().map(|x| x.failures).collect::<Vec<_>>(),
            "next_dial_due_per_restart_ms": o.iter().map(|x| x.next_dial_ms.map_or(serde_json::Value::Null, |d| number(d, 1))).collect::<Vec<_>>(),
            "in_flight_per_restart": o.iter().map(|x| x.in_flight).collect::<Vec<_>>(),
            "resent_per_restart": o.iter().map(|x| x.resent).collect::<Vec<_>>(),
        })
    }
}

/// Prints the JSON line with every figure (keys `raw_<name>_...` for the raw
/// client; `recovery`: one object per rhythm and pool shape; `restart`: one per
/// pool shape).
pub fn report(
    name: &str,
    args: &Args,
    throughput: Option<&Throughput>,
    recoveries: &[Recovery],
    restarts: &[Restarts],
) {
    let mut line = serde_json::Map::new();
    let mut put = |key: String, value: serde_json::Value| {
        line.insert(key, value);
    };
    put("bench".into(), name.into());
    put("messages".into(), args.messages.into());
    put("payload_bytes".into(), args.payload.into());
    put("window".into(), args.window.into());
    put("rounds".into(), args.rounds.into());
    if let Some(throughput) = throughput {
        let (raw, adapter, single, pooled) = (
            &throughput.raw,
            &throughput.adapter,
            &throughput.single,
            &throughput.pooled,
        );
        put(format!("raw_{name}_msgs_per_s"), number(raw.rate, 0));
        put("adapter_msgs_per_s".into(), number(adapter.rate, 0));
        put("rebound_1x1_msgs_per_s".into(), number(single.rate, 0));
        put(
            "rebound_default_pool_msgs_per_s".into(),
            number(pooled.rate, 0),
        );
        let ci = |side: &Side| {
            serde_json::json!([number(side.ratio_ci.0, 3), number(side.ratio_ci.1, 3)])
        };
        put("ratio_adapter".into(), number(adapter.ratio, 3));
        put("ratio_adapter_ci95".into(), ci(adapter));
        put("ratio_1x1".into(), number(single.ratio, 3));
        put("ratio_1x1_ci95".into(), ci(single));
        put("ratio_default_pool".into(), number(pooled.ratio, 3));
        put("ratio_default_pool_ci95".into(), ci(pooled));
        if let Some((label, raw2)) = &throughput.raw2 {
            put(format!("raw2_{name}"), (*label).into());
            put(format!("raw2_{name}_msgs_per_s"), number(raw2.rate, 0));
            put(format!("ratio_raw2_{name}"), number(raw2.ratio, 3));
            put(format!("ratio_raw2_{name}_ci95"), ci(raw2));
            put(
                format!("raw2_{name}_cpu_us_per_msg"),
                number(raw2.cpu_us, 2),
            );
            put(format!("rounds_raw2_{name}_msgs_per_s"), raw2.json());
            put(
                format!("rounds_raw2_{name}_cpu_us_per_msg"),
                raw2.cpu_json(),
            );
        }
        put(format!("raw_{name}_cpu_us_per_msg"), number(raw.cpu_us, 2));
        put("adapter_cpu_us_per_msg".into(), number(adapter.cpu_us, 2));
        put(
            "rebound_1x1_cpu_us_per_msg".into(),
            number(single.cpu_us, 2),
        );
        put(
            "rebound_default_pool_cpu_us_per_msg".into(),
            number(pooled.cpu_us, 2),
        );
        for (key, side) in [
            (format!("raw_{name}"), raw),
            ("adapter".into(), adapter),
            ("rebound_1x1".into(), single),
            ("rebound_default_pool".into(), pooled),
        ] {
            put(format!("rounds_{key}_msgs_per_s"), side.json());
            put(format!("rounds_{key}_cpu_us_per_msg"), side.cpu_json());
        }
    }
    put("recovery_rate_msgs_per_s".into(), args.rate.into());
    put("recovery_in_flight_cap".into(), IN_FLIGHT_CAP.into());
    put(
        "recovery".into(),
        recoveries.iter().map(Recovery::json).collect(),
    );
    put(
        "restart".into(),
        restarts.iter().map(Restarts::json).collect(),
    );
    println!("{}", serde_json::Value::Object(line));
}

/// One line per recovery run and restart run: the figures the targets are about.
fn summary(name: &str, recoveries: &[Recovery], restarts: &[Restarts]) {
    if recoveries.is_empty() && restarts.is_empty() {
        return;
    }
    println!("summary ({name}, library defaults):");
    for r in recoveries {
        let (l50, l99, _) = spread(&r.loss_pauses());
        println!(
            "  {} every {:>4} ms, pool {} ({:<7}): longest pause p50 {:>6.1} / p99 {:>6.1} / \
             max {:>6.1} ms (at the loss p50 {l50:.1} / p99 {l99:.1}); Ready at {}/{} kills; \
             re-sent {} (in flight {}; {} kills above); lost {}, duplicates {}, not confirmed {}",
            if r.control { "control" } else { "kills  " },
            r.rhythm.as_millis(),
            r.shape,
            r.pool.label(),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.met_ready(),
            r.kills.len(),
            r.kills.iter().map(|k| k.resent).sum::<u64>(),
            r.kills.iter().map(|k| k.in_flight).sum::<u64>(),
            r.over_resent(),
            r.lost(),
            r.duplicates(),
            r.not_confirmed
        );
    }
    for r in restarts {
        println!(
            "  restart ({} x), pool {} ({:<7}): outage end p50 {:.1} / p99 {:.1} / max {:.1} ms; \
             re-sent {} (in flight {}); not confirmed {}",
            r.outages.len(),
            r.shape,
            r.pool.label(),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.outages.iter().map(|o| o.resent).sum::<u64>(),
            r.outages.iter().map(|o| o.in_flight).sum::<u64>(),
            r.not_confirmed
        );
    }
}

/// The whole of a bench binary after [`main`]'s set-up: [`throughput`] (unless
/// `--only recovery`), then [`recovery`] for every rhythm and pool shape
/// (unless `--kills 0`), then [`restarts`] for every pool shape (unless
/// `--restart 0`), then [`report`]. `second` labels the raw client's second
/// baseline (the raw function is then also called with [`RawJob::second`]).
pub async fn run<T, M, R, Fut>(
    name: &str,
    args: Args,
    url: BrokerUrl,
    transport: M,
    raw: R,
    second: Option<&'static str>,
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
    let throughput = if args.recovery_only {
        None
    } else {
        Some(throughput(name, &args, &url, &transport, raw, second).await?)
    };
    let mut recoveries = Vec::new();
    if args.kills > 0 {
        let controls: &[bool] = if args.control {
            &[false, true]
        } else {
            &[false]
        };
        for &rhythm in &args.rhythms_ms {
            for &pool in &args.pools {
                for &control in controls {
                    recoveries.push(
                        recovery(
                            name,
                            &url,
                            Duration::from_millis(rhythm),
                            pool,
                            args.kills,
                            control,
                            args.rate,
                            args.payload,
                            &transport,
                        )
                        .await?,
                    );
                }
            }
        }
    }
    let mut restart_runs = Vec::new();
    if args.restarts > 0 {
        for &pool in &args.pools {
            restart_runs.push(
                restarts(
                    &url,
                    pool,
                    args.restarts,
                    Duration::from_millis(args.down_ms),
                    args.rate,
                    args.payload,
                    &transport,
                )
                .await?,
            );
        }
    }
    summary(name, &recoveries, &restart_runs);
    report(name, &args, throughput.as_ref(), &recoveries, &restart_runs);
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
        assert_eq!(args(&["--only", "raw2"]).unwrap().only, Some(Only::Raw2));
    }

    #[test]
    fn parses_the_recovery_flags() {
        let d = Args::default();
        assert_eq!(d.rhythms_ms, vec![1000, 6000]);
        assert_eq!(d.pools, vec![Pool::Single, Pool::Default]);
        assert_eq!((d.restarts, d.rate, d.recovery_only), (3, 10_000, false));
        let a = args(&[
            "--rhythm-ms",
            "500,2000",
            "--pool",
            "1x1",
            "--restart",
            "0",
            "--rate",
            "2000",
            "--down-ms",
            "3000",
            "--only",
            "recovery",
        ])
        .unwrap();
        assert_eq!(a.rhythms_ms, vec![500, 2000]);
        assert_eq!(a.pools, vec![Pool::Single]);
        assert_eq!((a.restarts, a.rate, a.down_ms), (0, 2000, 3000));
        assert!(a.recovery_only);
        assert_eq!(a.only, None);
        assert_eq!(
            args(&["--pool", "default"]).unwrap().pools,
            vec![Pool::Default]
        );
        assert!(args(&["--pool", "2x2"]).is_err());
        assert!(args(&["--rhythm-ms", "0"]).is_err());
        assert!(args(&["--rhythm-ms", "1000,x"]).is_err());
    }

    #[test]
    fn a_pause_belongs_to_the_kill_it_spans_or_follows() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // confirms every 10 ms, a 60 ms pause across the kill at 105, a 30 ms
        // pause later in the same window, a 200 ms pause spanning the kills at
        // 300 and 350 (the first one's), then steady again
        let confirms: Vec<Instant> = [0, 10, 20, 100, 160, 170, 200, 210, 240, 250, 260, 460, 470]
            .into_iter()
            .map(at)
            .collect();
        let kills = [at(105), at(300), at(350)];
        let pauses = longest_pauses(&confirms, &kills, at(1000));
        assert_eq!(
            pauses,
            vec![
                (Duration::from_millis(60), Some(at(100))),
                (Duration::from_millis(200), Some(at(260))),
                (Duration::from_millis(10), Some(at(460))),
            ]
        );
        // gaps before the first kill and after the end count for none
        let pauses = longest_pauses(&confirms, &[at(300)], at(465));
        assert_eq!(pauses, vec![(Duration::from_millis(200), Some(at(260)))]);
        assert_eq!(longest_pauses(&confirms, &[], at(1000)), vec![]);
        // a kill with no confirm after it has no pause
        assert_eq!(
            longest_pauses(&confirms, &[at(600)], at(1000)),
            vec![(Duration::ZERO, None)]
        );
        assert_eq!(signed_ms(at(5), at(7)), -2.0);
    }

    #[test]
    fn spread_gives_p50_p99_max() {
        let values: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(spread(&values), (10.0, 20.0, 20.0));
        assert!(spread(&[]).0.is_nan());
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
        assert_eq!(
            williams(4),
            vec![[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
        );
        for n in 2..=6 {
            let orders = williams(n);
            assert_eq!(orders.len(), if n.is_multiple_of(2) { n } else { 2 * n });
            let each = orders.len() / n;
            let mut at = vec![vec![0; n]; n];
            let mut after = vec![vec![0; n]; n];
            for order in &orders {
                let mut seen = order.clone();
                seen.sort_unstable();
                assert_eq!(
                    seen,
                    (0..n).collect::<Vec<_>>(),
                    "every side once per round"
                );
                for (position, &side) in order.iter().enumerate() {
                    at[side][position] += 1;
                }
                for pair in order.windows(2) {
                    after[pair[1]][pair[0]] += 1;
                }
            }
            assert!(at.iter().flatten().all(|&k| k == each), "{n}: {at:?}");
            for (side, before) in after.iter().enumerate() {
                for (other, &k) in before.iter().enumerate() {
                    assert_eq!(k, usize::from(side != other) * each, "{n}: {after:?}");
                }
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
