//! `rebound-chaos`: a publisher + consumer workload under random faults, and a
//! report of what survived.
//!
//! ```text
//! cargo run --release -p amqp-rebound-sim --bin rebound-chaos
//! cargo run --release -p amqp-rebound-sim --bin rebound-chaos -- --seed 7 --duration 120s --json
//! cargo run --release -p amqp-rebound-sim --bin rebound-chaos -- --bench-mode
//! cargo run --release -p amqp-rebound-sim --bin rebound-chaos -- --metrics
//! ```
//!
//! `--metrics` records the client's metrics (the core's `metrics` feature)
//! and prints every name with its final values after the report (in the JSON
//! report under `metrics`): the names a production client exports to
//! Prometheus, so a simulated run and a dashboard speak one vocabulary.
//!
//! By default it runs against the embedded simulated broker, in virtual time: no
//! server, no waiting. The exit code is 1 if a confirmed message was lost, 2 if
//! another invariant was violated or the command line was refused, 0 otherwise;
//! against a real broker also 3 if the run could not start or its report could not
//! be written (the broker unreachable or refusing the login, named with its cause
//! after one round of dials), 64 if `--broker` is given to a binary built without
//! a transport feature, and 130 if Ctrl-C ended the run.
//!
//! With the `lapin` (or `amqprs`) feature, `--broker amqp://... --transport lapin`
//! runs the same workload against a real RabbitMQ, in wall-clock time, through an
//! in-process TCP fault proxy and `rabbitmqctl` (see `real.rs`). `rabbitmqctl` goes
//! to the node `--node` names; without it, only to the default node and only when
//! the broker is on this machine:
//!
//! ```text
//! cargo run --release -p amqp-rebound-sim --features lapin --bin rebound-chaos -- \
//!     --broker amqp://guest:guest@127.0.0.1:5672/%2f --transport lapin --duration 30s
//! ```

mod collector;
#[cfg(any(feature = "lapin", feature = "amqprs"))]
mod real;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amqp_rebound_sim::{
    Fault, FaultPlan, Outcome, Scenario, Settings, Shape, Simulation, Workload,
};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Runs a publisher + consumer workload under random faults and reports what
/// survived.
#[derive(Debug, Parser)]
#[command(name = "rebound-chaos", version, after_help = REAL_MODE_HELP)]
struct Args {
    /// Seed of every random choice (faults, jitter, names); random if absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Duration of the workload (`60s`, `2m`, `500ms`; a bare number is seconds):
    /// simulated time, or wall-clock time with `--broker`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Faults per minute of the workload (1 to 6000; at most 1,000,000 faults in
    /// a run).
    #[arg(long, default_value_t = 12, value_parser = in_range::<usize>(1, 6_000))]
    faults_per_minute: usize,
    /// Publishers (1 to 1000).
    #[arg(long, default_value_t = 2, value_parser = in_range::<usize>(1, 1_000))]
    publishers: usize,
    /// Messages per second per publisher (1 to 100000). Publishers x rate x
    /// duration may come to at most 10,000,000 messages: the run keeps a record
    /// of each.
    #[arg(long, default_value_t = 200, value_parser = in_range::<u32>(1, 100_000))]
    rate: u32,
    /// Print the report as JSON on stdout (no progress bar).
    #[arg(long)]
    json: bool,
    /// Print the fault plan and the run's trace (faults, state changes, publish
    /// outcomes) on stderr.
    #[arg(long)]
    trace: bool,
    /// Record the client's metrics and print every metric name with its final
    /// values after the report (in the JSON report under `metrics`): the names
    /// a client built with the `metrics` feature exports.
    #[arg(long)]
    metrics: bool,
    /// Measure the simulator instead: full-driver scenarios per minute and
    /// simulated seconds per wall second, and the 100 x 100 restart scale test.
    /// Its scenarios are its own: the workload's flags (`--duration`,
    /// `--publishers`, ...), `--trace`, `--metrics` and `--broker` are refused
    /// beside it, not ignored.
    #[arg(
        long,
        conflicts_with_all = [
            "broker", "duration", "faults_per_minute", "publishers", "rate", "trace", "metrics",
        ]
    )]
    bench_mode: bool,
    /// Scenarios to run in `--bench-mode`.
    #[arg(long, default_value_t = 200, requires = "bench_mode")]
    bench_scenarios: u64,
    /// A real RabbitMQ instead of the simulated broker (`amqp://...`).
    #[arg(long)]
    broker: Option<String>,
    /// The transport for `--broker`.
    #[arg(long, value_enum, default_value_t = TransportKind::Lapin, requires = "broker")]
    transport: TransportKind,
    /// With `--broker`: the RabbitMQ node that `rabbitmqctl` faults go to
    /// (`rabbitmqctl -n NODE`). Required unless `--broker`'s host is this machine
    /// (localhost, 127.0.0.0/8, ::1), where rabbitmqctl's default node is used.
    #[arg(long, value_name = "NODE", requires = "broker")]
    node: Option<String>,
    /// With `--broker`: also restart the broker (`rabbitmqctl stop_app` /
    /// `start_app`) and raise memory alarms. Off by default: the broker may be
    /// shared, and these faults hit every client of it. Each is skipped when the
    /// node does not list this run's connections (it is then not the broker in
    /// use).
    #[arg(long, requires = "broker")]
    allow_broker_faults: bool,
}

const REAL_MODE_HELP: &str = "\
With --broker amqp://... the workload runs against a real RabbitMQ in wall-clock time.
Faults go through an in-process TCP proxy (connection resets, blackholes, refused
dials) and through rabbitmqctl (closing this run's own connections; with
--allow-broker-faults also stop_app/start_app and memory alarms, undone before exit,
Ctrl-C included). rabbitmqctl goes to --node NODE if given; otherwise to its default
node, and only if the broker's host is this machine: for any other host the run is
refused (exit code 2) until --node names the broker's node.";

/// Transports the real-broker mode can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// amqp-rebound-lapin (lapin 4 on tokio).
    Lapin,
    /// amqp-rebound-amqprs (amqprs 2 on tokio).
    Amqprs,
}

/// The most messages a run may publish (publishers x rate x duration): the run
/// keeps a record of every one.
const MAX_MESSAGES: f64 = 10_000_000.0;

/// The most faults a run's plan may hold.
const MAX_FAULTS: f64 = 1_000_000.0;

/// A parser of whole numbers from `min` to `max`.
fn in_range<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |text: &str| match text.trim().parse::<T>() {
        Ok(value) if value >= min && value <= max => Ok(value),
        _ => Err(format!(
            "{text:?}: expected a whole number from {min} to {max}"
        )),
    }
}

/// Refuses a workload too large to keep a record of (exit code 2).
fn check_size(args: &Args) -> Result<(), String> {
    let messages = args.publishers as f64 * f64::from(args.rate) * args.duration.as_secs_f64();
    if messages > MAX_MESSAGES {
        return Err(format!(
            "--publishers {} x --rate {} x --duration {:?} is {messages:.0} messages; a run \
             takes at most {MAX_MESSAGES:.0}",
            args.publishers, args.rate, args.duration
        ));
    }
    let faults = args.faults_per_minute as f64 * args.duration.as_secs_f64() / 60.0;
    if faults > MAX_FAULTS {
        return Err(format!(
            "--faults-per-minute {} over --duration {:?} is {faults:.0} faults; a run takes at \
             most {MAX_FAULTS:.0}",
            args.faults_per_minute, args.duration
        ));
    }
    Ok(())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 60s, 2m, 500ms)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "sec" | "secs" => value,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.001..=86_400.0 * 365.0).contains(&seconds) {
        return Err(format!("duration out of range: {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The node `rabbitmqctl` faults go to for the broker at `url`: `Some(node)` for
/// `rabbitmqctl -n node`, `None` for rabbitmqctl's default node, which is only
/// taken to be the broker when the broker is on this machine. An error names
/// the option to add.
fn rabbitmqctl_node(url: &str, node: Option<&str>) -> Result<Option<String>, String> {
    if let Some(node) = node {
        let node = node.trim();
        if node.is_empty() {
            return Err("--node needs a node name, such as rabbit@broker-host".to_owned());
        }
        return Ok(Some(node.to_owned()));
    }
    let endpoint = amqp_rebound_core::Endpoint::parse(url).map_err(|e| e.to_string())?;
    let host = endpoint.host();
    let local = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local {
        Ok(None)
    } else {
        Err(format!(
            "--broker points at {host}, not this machine, and its faults run rabbitmqctl, \
             which without --node acts on this machine's default node. Name the broker's \
             node with --node NODE (such as rabbit@<its hostname>; passed as rabbitmqctl -n, \
             which needs that node's Erlang cookie)"
        ))
    }
}

/// The final report.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    /// What the faults went through, in real mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    faults_via: Option<String>,
    seed: u64,
    simulated_seconds: f64,
    wall_seconds: f64,
    /// Real mode: from the first publish to the last, the span the throughput
    /// is over.
    #[serde(skip_serializing_if = "Option::is_none")]
    publishing_seconds: Option<f64>,
    faults_planned: usize,
    faults_hit: usize,
    published: usize,
    confirmed: usize,
    returned: usize,
    nacked: usize,
    timed_out: usize,
    other_errors: usize,
    received: usize,
    lost: usize,
    duplicated: u64,
    reconnects: u64,
    republished: u64,
    stale_acks_refused: u64,
    recovery_stall_p50_ms: Option<f64>,
    recovery_stall_p99_ms: Option<f64>,
    recovery_stall_max_ms: Option<f64>,
    throughput_confirmed_per_simulated_second: f64,
    /// Real mode: Ctrl-C ended the run this long after its start.
    #[serde(skip_serializing_if = "Option::is_none")]
    interrupted_after_seconds: Option<f64>,
    violations: Vec<String>,
    /// `--metrics`: every series the client recorded, with its final value.
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Vec<collector::Value>>,
}

/// The recorder `--metrics` installed.
static COLLECTOR: OnceLock<collector::Collector> = OnceLock::new();

/// `--metrics`: records the client's metrics from now on (before any client is
/// built: it registers its metrics when it is).
fn record_metrics() {
    let collector = COLLECTOR.get_or_init(collector::Collector::default);
    if metrics::set_global_recorder(collector.clone()).is_err() {
        eprintln!("rebound-chaos: a metrics recorder was installed already");
    }
}

/// What `--metrics` recorded, if it was given.
fn recorded_metrics() -> Option<Vec<collector::Value>> {
    COLLECTOR.get().map(collector::Collector::values)
}

fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[i].as_secs_f64() * 1000.0)
}

fn report(
    scenario: &Scenario,
    outcome: &Outcome,
    workload_time: Duration,
    wall: Duration,
) -> Report {
    use amqp_rebound_sim::PublishOutcome as P;
    let count = |f: &dyn Fn(&P) -> bool| {
        outcome
            .publishes
            .values()
            .filter(|p| p.outcome.as_ref().is_some_and(f))
            .count()
    };
    let mut stalls = outcome.recovery_stalls();
    stalls.sort();
    let violations = [
        outcome.check_only_ready_channels(),
        outcome.check_no_confirmed_loss(),
        outcome.check_every_publish_resolves(),
        outcome.check_liveness(),
        outcome.check_close_is_terminal(),
        outcome.check_topology_restored(),
        outcome.check_no_stale_ack(),
    ]
    .into_iter()
    .filter_map(Result::err)
    .map(|v| v.to_string())
    .collect();
    let confirmed = outcome.confirmed();
    Report {
        mode: "simulated",
        faults_via: None,
        seed: scenario.seed,
        simulated_seconds: outcome.simulated.as_secs_f64(),
        wall_seconds: wall.as_secs_f64(),
        publishing_seconds: None,
        faults_planned: scenario.plan.len(),
        faults_hit: outcome.faults.iter().filter(|f| f.hit).count(),
        published: outcome.publishes.len(),
        confirmed,
        returned: count(&|o| *o == P::Returned),
        nacked: count(&|o| *o == P::Nacked),
        timed_out: count(&|o| *o == P::TimedOut),
        other_errors: count(&|o| {
            !matches!(o, P::Confirmed | P::Returned | P::Nacked | P::TimedOut)
        }),
        received: outcome.received_unique(),
        lost: outcome.lost().len(),
        duplicated: outcome.duplicated(),
        reconnects: outcome.client.reconnects,
        republished: outcome.client.republished,
        stale_acks_refused: outcome.acks.stale,
        recovery_stall_p50_ms: percentile(&stalls, 50.0),
        recovery_stall_p99_ms: percentile(&stalls, 99.0),
        recovery_stall_max_ms: stalls.last().map(|d| d.as_secs_f64() * 1000.0),
        throughput_confirmed_per_simulated_second: confirmed as f64
            / workload_time.as_secs_f64().max(1e-9),
        interrupted_after_seconds: None,
        violations,
        metrics: recorded_metrics(),
    }
}

fn print_report(r: &Report) {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"));
    let simulated = r.mode == "simulated";
    println!("rebound-chaos: {} broker, seed {}", r.mode, r.seed);
    if simulated {
        println!(
            "  simulated {:.1} s in {:.2} s wall ({:.0}x)",
            r.simulated_seconds,
            r.wall_seconds,
            r.simulated_seconds / r.wall_seconds.max(1e-9)
        );
    } else {
        println!("  ran {:.1} s wall", r.wall_seconds);
        if let Some(p) = r.publishing_seconds {
            println!("  publishing  {p:.1} s wall, first publish to last");
        }
    }
    println!(
        "  faults      {} planned, {} hit something",
        r.faults_planned, r.faults_hit
    );
    if let Some(via) = &r.faults_via {
        println!("              through {via}");
    }
    println!("  published   {}", r.published);
    println!(
        "  confirmed   {} (returned {}, nacked {}, timed out {}, other errors {})",
        r.confirmed, r.returned, r.nacked, r.timed_out, r.other_errors
    );
    println!("  received    {} distinct", r.received);
    println!("  lost        {}", r.lost);
    println!("  duplicated  {}", r.duplicated);
    println!(
        "  reconnects  {} (re-published {}, stale acks refused {})",
        r.reconnects, r.republished, r.stale_acks_refused
    );
    println!(
        "  recovery stall (fault -> next confirm, {}): p50 {}, p99 {}, max {}",
        if simulated { "simulated" } else { "measured" },
        ms(r.recovery_stall_p50_ms),
        ms(r.recovery_stall_p99_ms),
        ms(r.recovery_stall_max_ms)
    );
    println!(
        "  throughput  {:.0} confirmed msg/s ({})",
        r.throughput_confirmed_per_simulated_second,
        if simulated {
            "simulated"
        } else {
            "measured, per wall second of publishing"
        }
    );
    if let Some(at) = r.interrupted_after_seconds {
        println!(
            "  INTERRUPTED by Ctrl-C after {at:.1} s: the figures cover part of the run, and \
             'lost' counts confirmed messages not received by then"
        );
    }
    if r.violations.is_empty() {
        println!("  invariants  all held");
    }
    for v in &r.violations {
        println!("  VIOLATION   {v}");
    }
    if let Some(collector) = COLLECTOR.get() {
        collector.print();
    }
}

fn chaos(args: &Args) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut scenario = Scenario::chaos(seed, args.duration, args.faults_per_minute);
    scenario.workload = Workload::chaos(args.publishers, args.rate, args.duration);
    scenario.settings.trace = args.trace;
    if args.trace {
        eprintln!("fault plan (seed {seed}):");
        for f in &scenario.plan.faults {
            eprintln!("  {:>9.3}s  {}", f.at.as_secs_f64(), f.fault);
        }
    }
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let end = Simulation::end_of(&scenario);
        let bar = ProgressBar::new(u64::try_from(end.as_millis()).unwrap_or(u64::MAX));
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:40}] {msg} simulated, {elapsed} wall")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    };
    let wall = Instant::now();
    let mut last = 0u64;
    let outcome = Simulation::new(&scenario)
        .on_progress(|now, end| {
            let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            if ms >= last + 100 {
                last = ms;
                bar.set_position(ms);
                bar.set_message(format!(
                    "{:.1}/{:.0} s",
                    now.as_secs_f64(),
                    end.as_secs_f64()
                ));
            }
        })
        .run();
    bar.finish_and_clear();
    let wall = wall.elapsed();
    if args.trace {
        eprint!("{}", outcome.trace);
    }
    let r = report(&scenario, &outcome, args.duration, wall);
    finish(args, seed, &r)
}

/// Benchmark figures.
#[derive(Debug, Serialize)]
struct Bench {
    scenarios: u64,
    scenario_simulated_seconds_mean: f64,
    faults_per_scenario_min: usize,
    faults_per_scenario_mean: f64,
    messages_per_scenario_mean: f64,
    scenarios_passing_all_checks: u64,
    wall_seconds: f64,
    cpu_seconds: Option<f64>,
    scenarios_per_minute: f64,
    simulated_seconds_per_wall_second: f64,
    scenarios_per_cpu_minute: Option<f64>,
    simulated_seconds_per_cpu_second: Option<f64>,
    scale: ScaleFigures,
}

/// The 100 x 100 restart scale test.
#[derive(Debug, Serialize)]
struct ScaleFigures {
    connections: usize,
    channels_per_connection: usize,
    restart_at_s: f64,
    downtime_s: f64,
    backoff_cap_s: f64,
    bound_s: f64,
    all_ready_after_restart_s: Option<f64>,
    ready_within_bound: bool,
    dials_after_restart: usize,
    max_dials_in_100ms_after_restart: usize,
    max_dials_in_100ms_pct_of_connections: f64,
    max_dials_in_100ms_after_broker_back: usize,
    wall_seconds: f64,
}

fn scale() -> ScaleFigures {
    let restart_at = Duration::from_secs(5);
    let downtime = Duration::from_secs(2);
    let settings = Settings {
        connections: 100,
        channels: 100,
        hosts: 1,
        backoff: amqp_rebound_core::BackoffConfig::default(),
        connect_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(30),
        heartbeat: Duration::from_secs(10),
        one_connect: Duration::from_millis(500),
        trace: false,
        probe: false,
        close: true,
        after_close: Duration::from_secs(5),
        ..Settings::default()
    };
    let scenario = Scenario {
        seed: 1,
        settings,
        workload: Workload::default(),
        plan: FaultPlan::new().at(restart_at, Fault::Restart { downtime }),
    };
    let wall = Instant::now();
    let outcome = Simulation::new(&scenario).run();
    let wall = wall.elapsed();
    let quiet = restart_at + downtime;
    let bound = outcome.liveness_bound;
    let n = scenario.settings.connections;
    let window = Duration::from_millis(100);
    let max = outcome.max_dials_within(window, restart_at);
    ScaleFigures {
        connections: n,
        channels_per_connection: scenario.settings.channels,
        restart_at_s: restart_at.as_secs_f64(),
        downtime_s: downtime.as_secs_f64(),
        backoff_cap_s: scenario.settings.backoff.cap.as_secs_f64(),
        bound_s: bound.as_secs_f64(),
        all_ready_after_restart_s: outcome
            .ready_at
            .map(|t| (t.saturating_sub(restart_at)).as_secs_f64()),
        ready_within_bound: outcome.check_liveness().is_ok(),
        dials_after_restart: outcome
            .dial_times
            .iter()
            .filter(|t| **t >= restart_at)
            .count(),
        max_dials_in_100ms_after_restart: max,
        max_dials_in_100ms_pct_of_connections: 100.0 * max as f64 / n as f64,
        max_dials_in_100ms_after_broker_back: outcome.max_dials_within(window, quiet),
        wall_seconds: wall.as_secs_f64(),
    }
}

fn bench(args: &Args) -> ExitCode {
    let shape = Shape::minute();
    let base = args.seed.unwrap_or(1);
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.bench_scenarios)
    };
    let wall = Instant::now();
    let cpu = thread_cpu_time();
    let (mut simulated, mut faults, mut min_faults, mut messages, mut passing) =
        (Duration::ZERO, 0usize, usize::MAX, 0u64, 0u64);
    for i in 0..args.bench_scenarios {
        let mut scenario = Scenario::from_seed(base.wrapping_add(i), &shape);
        scenario.settings.trace = false;
        let outcome = Simulation::new(&scenario).run();
        simulated += outcome.simulated;
        faults += scenario.plan.len();
        min_faults = min_faults.min(scenario.plan.len());
        messages += scenario.workload.messages();
        if outcome.check_all().is_ok() {
            passing += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let wall = wall.elapsed().as_secs_f64();
    let cpu = cpu
        .zip(thread_cpu_time())
        .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
    let n = args.bench_scenarios.max(1);
    let scale = scale();
    let b = Bench {
        scenarios: args.bench_scenarios,
        scenario_simulated_seconds_mean: simulated.as_secs_f64() / n as f64,
        faults_per_scenario_min: if min_faults == usize::MAX {
            0
        } else {
            min_faults
        },
        faults_per_scenario_mean: faults as f64 / n as f64,
        messages_per_scenario_mean: messages as f64 / n as f64,
        scenarios_passing_all_checks: passing,
        wall_seconds: wall,
        cpu_seconds: cpu,
        scenarios_per_cpu_minute: cpu.map(|c| args.bench_scenarios as f64 / c.max(1e-9) * 60.0),
        simulated_seconds_per_cpu_second: cpu.map(|c| simulated.as_secs_f64() / c.max(1e-9)),
        scenarios_per_minute: args.bench_scenarios as f64 / wall.max(1e-9) * 60.0,
        simulated_seconds_per_wall_second: simulated.as_secs_f64() / wall.max(1e-9),
        scale,
    };
    if args.json {
        match serde_json::to_string_pretty(&b) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("rebound-chaos: cannot print the figures: {e}");
                return ExitCode::from(3);
            }
        }
    } else {
        println!("rebound-chaos --bench-mode");
        println!(
            "  {} full-driver scenarios (60 s of faults each, {}..{:.1} faults, {:.0} messages on average, {:.1} simulated s each with probes and close)",
            b.scenarios,
            b.faults_per_scenario_min,
            b.faults_per_scenario_mean,
            b.messages_per_scenario_mean,
            b.scenario_simulated_seconds_mean
        );
        println!(
            "  {:.1} s wall: {:.0} scenarios per minute, {:.0} simulated seconds per wall second; {} of {} passed every check",
            b.wall_seconds,
            b.scenarios_per_minute,
            b.simulated_seconds_per_wall_second,
            b.scenarios_passing_all_checks,
            b.scenarios
        );
        if let (Some(c), Some(m), Some(r)) = (
            b.cpu_seconds,
            b.scenarios_per_cpu_minute,
            b.simulated_seconds_per_cpu_second,
        ) {
            println!(
                "  {c:.1} s CPU: {m:.0} scenarios per CPU minute, {r:.0} simulated seconds per CPU second"
            );
        }
        let s = &b.scale;
        println!(
            "  scale: {} connections x {} channels, broker restart at {} s (down {} s), backoff cap {} s",
            s.connections, s.channels_per_connection, s.restart_at_s, s.downtime_s, s.backoff_cap_s
        );
        println!(
            "    all Ready {} after the restart (bound: downtime + {:.1} s) -> {}",
            s.all_ready_after_restart_s
                .map_or("never".to_owned(), |t| format!("{t:.2} s")),
            s.bound_s,
            if s.ready_within_bound {
                "within bound"
            } else {
                "OUT OF BOUND"
            }
        );
        println!(
            "    {} dials after the restart; at most {} in any 100 ms ({:.0}% of connections); at most {} in any 100 ms once the broker was back",
            s.dials_after_restart,
            s.max_dials_in_100ms_after_restart,
            s.max_dials_in_100ms_pct_of_connections,
            s.max_dials_in_100ms_after_broker_back
        );
        println!("    {:.2} s wall", s.wall_seconds);
    }
    ExitCode::SUCCESS
}

/// CPU time of this thread so far, from Linux's `/proc/thread-self/schedstat`
/// (nanoseconds on CPU); `None` elsewhere. Wall time on a shared machine
/// depends on the neighbours; CPU time does not.
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

fn real_broker(args: &Args, url: &str) -> ExitCode {
    let node = match rabbitmqctl_node(url, args.node.as_deref()) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("rebound-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let feature = match args.transport {
        TransportKind::Lapin => "lapin",
        TransportKind::Amqprs => "amqprs",
    };
    #[cfg(feature = "lapin")]
    if matches!(args.transport, TransportKind::Lapin) {
        return real_run(real::RealTransport::Lapin, feature, args, url, node);
    }
    #[cfg(feature = "amqprs")]
    if matches!(args.transport, TransportKind::Amqprs) {
        return real_run(real::RealTransport::Amqprs, feature, args, url, node);
    }
    let _ = (url, node);
    eprintln!(
        "rebound-chaos: this binary was not built with feature \"{feature}\"; the real-broker \
         mode needs it:\n  cargo run --release -p amqp-rebound-sim --features {feature} --bin \
         rebound-chaos -- --broker amqp://guest:guest@127.0.0.1:5672/%2f --transport {feature}"
    );
    ExitCode::from(64)
}

#[cfg(any(feature = "lapin", feature = "amqprs"))]
fn real_run(
    kind: real::RealTransport,
    feature: &'static str,
    args: &Args,
    url: &str,
    node: Option<String>,
) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut scenario = Scenario::chaos(seed, args.duration, args.faults_per_minute);
    scenario.workload = Workload::chaos(args.publishers, args.rate, args.duration);
    scenario.settings.trace = args.trace;
    if args.trace {
        eprintln!("fault plan (seed {seed}; kinds a real broker cannot show are replaced):");
        for f in &scenario.plan.faults {
            eprintln!("  {:>9.3}s  {}", f.at.as_secs_f64(), f.fault);
        }
    }
    // Counts publishes: on a real clock the publishers run behind the planned
    // duration, and the run lasts until the last one is out and resolved.
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(scenario.workload.messages());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} published, {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    };
    let progress = |p: &real::Progress| {
        bar.set_length(p.messages);
        bar.set_position(p.sent.min(p.messages));
        let wall = p.elapsed.as_secs_f64();
        bar.set_message(match &p.waiting_for {
            None => format!("{wall:.0} s wall"),
            Some(what) => format!("{wall:.0} s wall, waiting for {what}"),
        });
    };
    let ctl = real::Rabbitmqctl::new(node);
    let faults_via = format!("the proxy and rabbitmqctl on {}", ctl.describe());
    let run = real::run(
        kind,
        url,
        &scenario,
        args.allow_broker_faults,
        ctl,
        &progress,
    );
    bar.finish_and_clear();
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            eprintln!("rebound-chaos: {e}");
            return ExitCode::from(3);
        }
    };
    if args.trace {
        eprint!("{}", run.trace);
    }
    let mut stalls = run.stalls.clone();
    stalls.sort();
    let r = Report {
        mode: if feature == "lapin" {
            "real (lapin)"
        } else {
            "real (amqprs)"
        },
        faults_via: Some(faults_via),
        seed,
        simulated_seconds: run.elapsed.as_secs_f64(),
        wall_seconds: run.elapsed.as_secs_f64(),
        publishing_seconds: Some(run.publishing.as_secs_f64()),
        faults_planned: run.faults_planned,
        faults_hit: run.faults_hit,
        published: run.published,
        confirmed: run.confirmed,
        returned: run.returned,
        nacked: run.nacked,
        timed_out: run.timed_out,
        other_errors: run.other_errors,
        received: run.received,
        lost: run.lost,
        duplicated: run.duplicated,
        reconnects: run.reconnects,
        republished: run.republished,
        stale_acks_refused: run.stale_acks,
        recovery_stall_p50_ms: percentile(&stalls, 50.0),
        recovery_stall_p99_ms: percentile(&stalls, 99.0),
        recovery_stall_max_ms: stalls.last().map(|d| d.as_secs_f64() * 1000.0),
        throughput_confirmed_per_simulated_second: run.confirmed as f64
            / run.publishing.as_secs_f64().max(1e-3),
        interrupted_after_seconds: run.interrupted_at.map(|t| t.as_secs_f64()),
        violations: run.problems,
        metrics: recorded_metrics(),
    };
    let code = finish(args, seed, &r);
    if run.interrupted_at.is_some() {
        ExitCode::from(130)
    } else {
        code
    }
}

/// Prints the report and picks the exit code.
fn finish(args: &Args, seed: u64, r: &Report) -> ExitCode {
    if args.json {
        match serde_json::to_string_pretty(r) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("rebound-chaos: cannot print the report: {e}");
                return ExitCode::from(3);
            }
        }
    } else {
        print_report(r);
        if r.lost > 0 || !r.violations.is_empty() {
            println!("  {}", replay_line(args, seed));
        }
    }
    if r.lost > 0 {
        ExitCode::from(1)
    } else if !r.violations.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The command line that runs the same plan again: the same run in simulated
/// mode; in real mode the same faults at the same times, on a broker whose timing
/// differs. The broker URL's password is shown as `***`.
fn replay_line(args: &Args, seed: u64) -> String {
    let mut line = format!(
        "rebound-chaos --seed {seed} --duration {}s --faults-per-minute {} --publishers {} --rate {}",
        args.duration.as_secs_f64(),
        args.faults_per_minute,
        args.publishers,
        args.rate
    );
    let Some(url) = &args.broker else {
        return format!("replay with: {line}");
    };
    let shown = amqp_rebound_core::Endpoint::parse(url)
        .map_or_else(|_| "amqp://...".to_owned(), |e| e.to_string());
    let transport = match args.transport {
        TransportKind::Lapin => "lapin",
        TransportKind::Amqprs => "amqprs",
    };
    line.push_str(&format!(" --broker {shown} --transport {transport}"));
    if let Some(node) = &args.node {
        line.push_str(&format!(" --node {node}"));
    }
    if args.allow_broker_faults {
        line.push_str(" --allow-broker-faults");
    }
    format!("same plan again: {line}")
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = check_size(&args) {
        eprintln!("rebound-chaos: {error}");
        return ExitCode::from(2);
    }
    if args.metrics {
        record_metrics();
    }
    if let Some(url) = args.broker.clone() {
        return real_broker(&args, &url);
    }
    if args.bench_mode {
        return bench(&args);
    }
    chaos(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts out of range, and workloads too large to keep a record of, are
    /// usage errors (exit code 2), never a capacity-overflow panic or a run that
    /// eats the machine's memory.
    /// A flag the chosen mode would not read is a usage error, not silently
    /// dropped: `--bench-mode` runs its own scenarios, and the real-broker
    /// flags mean nothing without `--broker`. Their defaults alone are fine.
    #[test]
    fn flags_the_mode_would_ignore_are_refused() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["rebound-chaos"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv)
        };
        for ignored in [
            &["--bench-mode", "--broker", "amqp://localhost"][..],
            &["--bench-mode", "--duration", "10s"],
            &["--bench-mode", "--publishers", "3"],
            &["--bench-mode", "--rate", "10"],
            &["--bench-mode", "--faults-per-minute", "5"],
            &["--bench-mode", "--trace"],
            &["--bench-mode", "--metrics"],
            &["--bench-scenarios", "5"],
            &["--transport", "amqprs"],
            &["--node", "rabbit@elsewhere"],
            &["--allow-broker-faults"],
        ] {
            let error = parse(ignored).expect_err(&format!("{ignored:?} parsed"));
            assert_eq!(
                error.exit_code(),
                2,
                "{ignored:?}: a usage error (exit code 2): {error}"
            );
        }
        for fine in [
            &[][..],
            &["--bench-mode"],
            &[
                "--bench-mode",
                "--bench-scenarios",
                "5",
                "--seed",
                "3",
                "--json",
            ],
            &["--seed", "3", "--duration", "10s", "--trace", "--metrics"],
            &[
                "--broker",
                "amqp://localhost",
                "--transport",
                "amqprs",
                "--node",
                "rabbit@here",
                "--allow-broker-faults",
                "--duration",
                "10s",
            ],
        ] {
            assert!(parse(fine).is_ok(), "{fine:?} refused");
        }
    }

    #[test]
    fn out_of_range_workloads_are_refused() {
        for bad in [
            ["--publishers", "18446744073709551615"],
            ["--publishers", "0"],
            ["--rate", "4294967295"],
            ["--rate", "0"],
            ["--faults-per-minute", "18446744073709551615"],
            ["--faults-per-minute", "0"],
        ] {
            assert!(
                Args::try_parse_from(["rebound-chaos", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
        let size = |extra: &[&str]| {
            let mut argv = vec!["rebound-chaos"];
            argv.extend_from_slice(extra);
            check_size(&Args::try_parse_from(argv).expect("parses"))
        };
        assert!(size(&[]).is_ok(), "the defaults run");
        assert!(size(&["--duration", "8760h"]).is_err());
        assert!(size(&["--publishers", "1000", "--rate", "100000"]).is_err());
        assert!(
            size(&[
                "--rate",
                "1",
                "--publishers",
                "1",
                "--duration",
                "2000h",
                "--faults-per-minute",
                "6000"
            ])
            .is_err()
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("0.0000001ms").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), Some(50.0));
        assert_eq!(percentile(&d, 99.0), Some(99.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_local_broker_without_node_uses_the_default_node() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://localhost",
            "amqp://u:p@LOCALHOST:5673/v",
            "amqp://[::1]:5672",
            "amqp://127.0.0.2",
        ] {
            assert_eq!(rabbitmqctl_node(url, None), Ok(None), "{url}");
        }
    }

    #[test]
    fn a_remote_broker_without_node_is_refused() {
        for url in [
            "amqp://guest:guest@staging.example:5672/%2f",
            "amqp://10.1.2.3",
            "amqp://[2001:db8::1]:5672",
            "amqps://u:p@rabbit/%2f",
        ] {
            let err = rabbitmqctl_node(url, None).unwrap_err();
            assert!(err.contains("--node"), "{url}: {err}");
            assert!(!err.contains(":p@"), "{url}: the password leaked: {err}");
        }
        assert!(rabbitmqctl_node("not a url", None).is_err());
    }

    #[test]
    fn a_named_node_is_used_for_any_broker() {
        for url in ["amqp://staging.example", "amqp://127.0.0.1", "not a url"] {
            assert_eq!(
                rabbitmqctl_node(url, Some("rabbit@staging")),
                Ok(Some("rabbit@staging".to_owned())),
                "{url}"
            );
        }
        assert!(rabbitmqctl_node("amqp://127.0.0.1", Some(" ")).is_err());
    }

    #[test]
    fn a_refused_node_exits_2_before_connecting() {
        let args = Args::parse_from([
            "rebound-chaos",
            "--broker",
            "amqp://guest:guest@staging.example:5672/%2f",
            "--duration",
            "1s",
        ]);
        assert_eq!(
            real_broker(&args, "amqp://guest:guest@staging.example:5672/%2f"),
            ExitCode::from(2)
        );
    }

    /// A broker that cannot be reached ends a real run at first contact, with
    /// exit code 3 and its cause, not after the workload's timeouts as broken
    /// invariants.
    #[cfg(any(feature = "lapin", feature = "amqprs"))]
    #[test]
    fn an_unreachable_broker_ends_a_real_run_at_first_contact_with_exit_3() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let args = Args::parse_from([
            "rebound-chaos",
            "--broker",
            &url,
            "--duration",
            "2s",
            "--json",
        ]);
        let started = std::time::Instant::now();
        assert_eq!(real_broker(&args, &url), ExitCode::from(3));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_replay_line_names_the_broker_without_its_password() {
        let args = Args::parse_from([
            "rebound-chaos",
            "--broker",
            "amqp://u:secret@staging.example/%2f",
            "--node",
            "rabbit@staging",
            "--rate",
            "50",
        ]);
        let line = replay_line(&args, 9);
        assert!(
            line.starts_with("same plan again: rebound-chaos --seed 9"),
            "{line}"
        );
        assert!(line.contains("--rate 50"), "{line}");
        assert!(line.contains("--node rabbit@staging"), "{line}");
        assert!(!line.contains("secret"), "{line}");
        let args = Args::parse_from(["rebound-chaos", "--duration", "5s"]);
        assert!(
            replay_line(&args, 9).starts_with("replay with: rebound-chaos --seed 9 --duration 5s")
        );
    }

    #[test]
    fn metrics_show_every_name_a_client_registers_with_the_report_s_figures() {
        use amqp_rebound_core::telemetry::{METRICS, MetricKind, names};

        let collector = collector::Collector::default();
        let scenario = Scenario::chaos(3, Duration::from_secs(20), 12);
        let outcome = metrics::with_local_recorder(&collector, || Simulation::new(&scenario).run());
        let values = collector.values();
        let value = |name: &str| -> f64 {
            values
                .iter()
                .filter(|v| v.name == name)
                .filter_map(|v| v.value)
                .sum()
        };
        // registered when the client is built, whatever happens
        for m in METRICS.iter().filter(|m| m.kind != MetricKind::Histogram) {
            if m.name != names::RECONNECTS && m.name != names::RECOVERIES {
                assert!(
                    values.iter().any(|v| v.name == m.name),
                    "{} missing",
                    m.name
                );
            }
        }
        let stats = &outcome.client;
        assert_eq!(value(names::PUBLISHED), stats.published as f64);
        assert_eq!(value(names::CONFIRMED), stats.confirmed as f64);
        assert_eq!(value(names::RECONNECTS), stats.reconnects as f64);
        assert_eq!(value(names::RECOVERIES), stats.recoveries as f64);
        assert!(stats.reconnects > 0, "the faults caused reconnects");
        let latencies = values
            .iter()
            .find(|v| v.name == names::CONFIRM_LATENCY)
            .and_then(|v| v.count);
        assert_eq!(latencies, Some(stats.confirmed as usize));
        for v in &values {
            assert_eq!(v.labels.get("client").map(String::as_str), Some("sim"));
        }
    }

    #[test]
    fn a_short_chaos_run_loses_nothing() {
        let args = Args::parse_from(["rebound-chaos", "--seed", "5", "--duration", "5s", "--json"]);
        assert_eq!(chaos(&args), ExitCode::SUCCESS);
    }
}
