//! The real-broker mode (feature `lapin` or `amqprs`): the same workload against a
//! RabbitMQ, through an in-process TCP fault proxy, in wall-clock time.
//!
//! Faults go through the proxy (reset connections, blackhole, refuse dials) and,
//! for `connection.close` with 320, through `rabbitmqctl close_connection` of this
//! run's own connections only. Faults that touch the whole broker (restart, memory
//! alarm) are off unless `--allow-broker-faults`: the broker may be shared. Fault
//! kinds a real broker cannot be made to show (channel errors on demand, confirm
//! trouble, per-connection blocking, consumer cancels) are replaced by the nearest
//! one the proxy can do; the plan printed with `--trace` shows what ran.
//!
//! Every `rabbitmqctl` call goes to one node ([`Rabbitmqctl`]); `main.rs` decides
//! which. A broker-wide fault is undone when it ends, and whatever is still in force
//! when the run stops (its end, Ctrl-C, an error, a panic) is undone before `run`
//! returns.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "amqprs")]
use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_core::{Client, Endpoint, TokioTimer};
#[cfg(feature = "lapin")]
use amqp_rebound_lapin::LapinTransport;

/// Which transport the real-broker run goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealTransport {
    /// amqp-rebound-lapin.
    #[cfg(feature = "lapin")]
    Lapin,
    /// amqp-rebound-amqprs.
    #[cfg(feature = "amqprs")]
    Amqprs,
}
use amqp_rebound_sim::proxy::FaultProxy;
use amqp_rebound_sim::{
    ClientBug, Fault, InstrumentedTransport, PublishOutcome, Scenario, Spawner, Trace, Workload,
    start_workload,
};
use tokio::sync::watch;

/// What the real-broker run measured.
pub struct RealRun {
    pub published: usize,
    pub confirmed: usize,
    pub returned: usize,
    pub nacked: usize,
    pub timed_out: usize,
    pub other_errors: usize,
    pub received: usize,
    pub lost: usize,
    pub duplicated: u64,
    pub reconnects: u64,
    pub republished: u64,
    pub stale_acks: u64,
    pub stalls: Vec<Duration>,
    pub faults_planned: usize,
    pub faults_hit: usize,
    pub elapsed: Duration,
    /// From the first publish to the last.
    pub publishing: Duration,
    /// When Ctrl-C ended it early.
    pub interrupted_at: Option<Duration>,
    pub trace: String,
    pub problems: Vec<String>,
}

/// `rabbitmqctl`, aimed at one node: `-n NODE`, or rabbitmqctl's default node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rabbitmqctl {
    node: Option<String>,
}

impl Rabbitmqctl {
    /// `node` is passed as `-n`; `None` leaves rabbitmqctl to its default node.
    pub fn new(node: Option<String>) -> Rabbitmqctl {
        Rabbitmqctl { node }
    }

    /// The node, for messages.
    pub fn describe(&self) -> String {
        match &self.node {
            Some(node) => format!("node {node}"),
            None => "the default node".to_owned(),
        }
    }

    fn shown(&self, args: &[String]) -> String {
        match &self.node {
            Some(node) => format!("rabbitmqctl -n {node} {}", args.join(" ")),
            None => format!("rabbitmqctl {}", args.join(" ")),
        }
    }

    /// Runs it and waits, on the calling thread.
    fn output(&self, args: &[String]) -> Result<String, String> {
        let mut command = std::process::Command::new("rabbitmqctl");
        if let Some(node) = &self.node {
            command.arg("-n").arg(node);
        }
        command.args(args);
        // Out of the terminal's process group: a Ctrl-C meant for rebound-chaos must
        // not kill a stop_app or start_app half-way, since the run undoes its own
        // faults once it has stopped them.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let shown = self.shown(args);
        let out = command.output().map_err(|e| format!("{shown}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{shown}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs it off the runtime's thread.
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let ctl = self.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || ctl.output(&args))
            .await
            .map_err(|e| e.to_string())?
    }
}

const STOP_APP: &[&str] = &["stop_app"];
const START_APP: &[&str] = &["start_app"];
const SET_ALARM: &[&str] = &[
    "eval",
    "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []}).",
];
const CLEAR_ALARM: &[&str] = &[
    "eval",
    "rabbit_alarm:clear_alarm({resource_limit, memory, node()}).",
];

/// The broker-wide faults in force. Each is marked before its command runs (a
/// command that fails or is cut short may still have taken effect) and cleared
/// once its undo succeeded, so that whatever is marked when the run stops gets
/// undone then.
struct BrokerFaults {
    ctl: Rabbitmqctl,
    app_stopped: Cell<bool>,
    alarm_set: Cell<bool>,
}

impl BrokerFaults {
    fn new(ctl: Rabbitmqctl) -> BrokerFaults {
        BrokerFaults {
            ctl,
            app_stopped: Cell::new(false),
            alarm_set: Cell::new(false),
        }
    }

    /// The marked faults with the command that undoes each.
    fn in_force(&self) -> Vec<(&Cell<bool>, &'static [&'static str])> {
        [
            (&self.app_stopped, START_APP),
            (&self.alarm_set, CLEAR_ALARM),
        ]
        .into_iter()
        .filter(|(mark, _)| mark.get())
        .collect()
    }

    fn could_not_undo(&self, undo: &[&str], error: &str) -> String {
        let args: Vec<String> = undo.iter().map(|a| (*a).to_owned()).collect();
        format!(
            "could not undo a broker fault ({error}); run `{}` by hand",
            self.ctl.shown(&args)
        )
    }

    /// Undoes what is in force; returns what could not be undone.
    async fn undo(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for (mark, undo) in self.in_force() {
            match self.ctl.run(undo).await {
                Ok(_) => mark.set(false),
                Err(e) => failed.push(self.could_not_undo(undo, &e)),
            }
        }
        failed
    }

    /// [`BrokerFaults::undo`] outside the runtime, for when the run did not get
    /// to its own undo.
    fn undo_blocking(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for (mark, undo) in self.in_force() {
            let args: Vec<String> = undo.iter().map(|a| (*a).to_owned()).collect();
            match self.ctl.output(&args) {
                Ok(_) => mark.set(false),
                Err(e) => failed.push(self.could_not_undo(undo, &e)),
            }
        }
        failed
    }
}

/// Undoes the broker faults still in force when dropped: declared before the
/// runtime in [`run`], it drops after the runtime has finished every blocking
/// `rabbitmqctl` call, on every way out of `run`, unwinding included.
struct UndoOnDrop(Rc<BrokerFaults>);

impl Drop for UndoOnDrop {
    fn drop(&mut self) {
        if self.0.in_force().is_empty() {
            return;
        }
        eprintln!("rebound-chaos: undoing the broker faults still in force");
        for problem in self.0.undo_blocking() {
            eprintln!("rebound-chaos: {problem}");
        }
    }
}

/// The pids of this run's connections that the node lists.
async fn own_connections(ctl: &Rabbitmqctl, name: &str) -> Result<Vec<String>, String> {
    let list = ctl
        .run(&[
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .await?;
    let marker = format!("\"{name}\"");
    Ok(list
        .lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect())
}

/// Closes the `pick`-th of this run's connections with 320, by name.
async fn close_own_connection(
    ctl: &Rabbitmqctl,
    name: &str,
    pick: usize,
) -> Result<String, String> {
    let pids = own_connections(ctl, name).await?;
    if pids.is_empty() {
        return Err(format!(
            "{} lists no connection of this run",
            ctl.describe()
        ));
    }
    let pid = pids[pick % pids.len()].clone();
    ctl.run(&["close_connection", &pid, "rebound-chaos fault"])
        .await?;
    Ok(pid)
}

/// Refuses a broker-wide fault on a node that does not list this run's
/// connections: it may not be the broker `--broker` points at.
async fn check_own_node(ctl: &Rabbitmqctl, name: &str) -> Result<(), String> {
    if own_connections(ctl, name).await?.is_empty() {
        return Err(format!(
            "{} lists no connection of this run, so it may not be the broker in use: left alone",
            ctl.describe()
        ));
    }
    Ok(())
}

/// Sleeps `duration`, or less if the run stops meanwhile.
async fn hold(duration: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// The URL with its host and port replaced by the proxy's, and a 5 s heartbeat
/// unless it asks for one (so that a blackhole is noticed).
fn through_proxy(url: &str, proxy: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    let mut out = format!("{scheme}://{userinfo}{proxy}{tail}");
    if !tail.contains("heartbeat=") {
        out.push(if tail.contains('?') { '&' } else { '?' });
        out.push_str("heartbeat=5");
    }
    out
}

/// What a fault becomes against a real broker.
fn real_fault(fault: &Fault, allow_broker_faults: bool) -> Fault {
    match fault.clone() {
        Fault::CloseChannel { pick, .. } => Fault::KillConnection { pick },
        Fault::CancelConsumer { pick } | Fault::DeleteQueue { pick } => {
            Fault::CloseConnection { pick, code: 320 }
        }
        Fault::Block { duration, .. } => Fault::Partition { host: 0, duration },
        Fault::DelayConfirms { duration, .. }
        | Fault::DropConfirms { duration }
        | Fault::NackConfirms { duration } => Fault::RefuseDials { host: 0, duration },
        Fault::Alarm { duration } if !allow_broker_faults => Fault::Partition { host: 0, duration },
        other => other,
    }
}

/// Where the run is, for the progress bar: the workload is `messages` publishes,
/// `sent` of them out so far.
pub struct Progress {
    pub elapsed: Duration,
    pub sent: u64,
    pub messages: u64,
    /// What it waits for once every publish is out.
    pub waiting_for: Option<String>,
}

/// Runs `scenario`'s workload against the broker at `url` with the plan mapped
/// to real faults, `rabbitmqctl` going to `ctl`'s node. `progress` is called
/// about every 100 ms.
pub fn run(
    kind: RealTransport,
    url: &str,
    scenario: &Scenario,
    allow_broker_faults: bool,
    ctl: Rabbitmqctl,
    progress: &dyn Fn(&Progress),
) -> Result<RealRun, String> {
    let endpoint = Endpoint::parse(url).map_err(|e| e.to_string())?;
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&(endpoint.host(), endpoint.port()))
        .map_err(|e| format!("cannot resolve {}: {e}", endpoint.host()))?
        .next()
        .ok_or_else(|| format!("no address for {}", endpoint.host()))?;
    let broker = Rc::new(BrokerFaults::new(ctl));
    let _undo = UndoOnDrop(Rc::clone(&broker));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let run = RunSetup {
        kind,
        url,
        upstream,
        scenario,
        allow_broker_faults,
        broker,
    };
    local.block_on(&runtime, run_on_tokio(run, progress))
}

struct RunSetup<'a> {
    kind: RealTransport,
    url: &'a str,
    upstream: SocketAddr,
    scenario: &'a Scenario,
    allow_broker_faults: bool,
    broker: Rc<BrokerFaults>,
}

async fn run_on_tokio(
    setup: RunSetup<'_>,
    progress: &dyn Fn(&Progress),
) -> Result<RealRun, String> {
    let RunSetup {
        kind,
        url,
        upstream,
        scenario,
        allow_broker_faults,
        broker,
    } = setup;
    let proxy = Rc::new(
        FaultProxy::start(upstream).map_err(|e| format!("cannot start the fault proxy: {e}"))?,
    );
    let seed = scenario.seed;
    let name = format!("rebound-chaos-{seed}");
    let timer: Arc<dyn amqp_rebound_core::Timer> = Arc::new(TokioTimer);
    let origin = timer.now();
    let trace = Trace::with_timer(Arc::clone(&timer), origin);
    trace.set_enabled(scenario.settings.trace);
    let builder = Client::builder()
        .hosts([through_proxy(url, proxy.addr())])
        .pool(scenario.settings.connections, scenario.settings.channels)
        .backoff(scenario.settings.backoff.clone())
        .connect_timeout(scenario.settings.connect_timeout)
        .publish_timeout(scenario.settings.publish_timeout)
        .seed(seed)
        .connection_name(name.clone())
        // the trace keeps every event, as in the simulated mode
        .watch_capacity(1 << 20);
    let connect_timeout = scenario.settings.connect_timeout;
    let (client, driver) = match kind {
        #[cfg(feature = "lapin")]
        RealTransport::Lapin => builder.build(
            InstrumentedTransport::new(
                LapinTransport::new().with_connect_timeout(connect_timeout),
                Arc::clone(&timer),
                ClientBug::None,
            ),
            TokioTimer,
        ),
        #[cfg(feature = "amqprs")]
        RealTransport::Amqprs => builder.build(
            InstrumentedTransport::new(
                AmqprsTransport::new().with_connect_timeout(connect_timeout),
                Arc::clone(&timer),
                ClientBug::None,
            ),
            TokioTimer,
        ),
    }
    .map_err(|e| e.to_string())?;
    let driver = tokio::task::spawn_local(driver);
    {
        let mut events = client.watch();
        let trace = trace.clone();
        tokio::task::spawn_local(async move {
            use futures::StreamExt;
            while let Some(event) = events.next().await {
                trace.record("event", format_args!("{event:?}"));
            }
        });
    }
    // Ctrl-C counts here instead of killing the process, so that the faults get
    // undone: the first one ends the run, a second one skips the cleanup.
    let (interrupt_tx, mut interrupts) = watch::channel(0u32);
    tokio::task::spawn_local(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            interrupt_tx.send_modify(|n| *n += 1);
        }
    });
    // This run's own names, so that a shared broker is left as it was found.
    let mut workload: Workload = scenario.workload.clone();
    for e in &mut workload.exchanges {
        e.name = format!("rebound-chaos.{seed}.{}", e.name);
    }
    for q in &mut workload.queues {
        if let Some(n) = &mut q.name {
            *n = format!("rebound-chaos.{seed}.{n}");
        }
    }
    // First contact: a broker that cannot be reached, or refuses the login,
    // ends the run here with its cause (after one round of dials), not as
    // invariants broken by a workload that never started.
    let first_contact = tokio::time::timeout(
        connect_timeout.saturating_add(Duration::from_secs(5)),
        client.connected(),
    )
    .await;
    let unreachable = match first_contact {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "no answer within the connect timeout ({connect_timeout:?})"
        )),
    };
    if let Some(cause) = unreachable {
        client.close_discarding().await;
        driver.abort();
        return Err(format!("cannot start: the broker was not reached: {cause}"));
    }
    let spawn: Spawner = Rc::new(|task| {
        tokio::task::spawn_local(task);
    });
    let records = start_workload(&client, &workload, &trace, spawn);

    // Faults, at their times, until the run stops them.
    let (stop_faults, stop) = watch::channel(false);
    let hits = Rc::new(Cell::new(0usize));
    let fault_times = Rc::new(RefCell::new(Vec::new()));
    let mut fault_tasks = Vec::new();
    for f in &scenario.plan.faults {
        let fault = real_fault(&f.fault, allow_broker_faults);
        let at = f.at;
        let proxy = Rc::clone(&proxy);
        let broker = Rc::clone(&broker);
        let trace = trace.clone();
        let name = name.clone();
        let hits = Rc::clone(&hits);
        let fault_times = Rc::clone(&fault_times);
        let mut stop = stop.clone();
        fault_tasks.push(tokio::task::spawn_local(async move {
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(origin + at)) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            let target = apply(
                &fault,
                &proxy,
                &broker,
                &name,
                allow_broker_faults,
                &mut stop,
                &trace,
            )
            .await;
            match &target {
                Ok((t, at)) => {
                    hits.set(hits.get() + 1);
                    fault_times.borrow_mut().push(*at);
                    trace.record(
                        "fault",
                        format_args!("{fault}: {t}, in force from {:.3}s", at.as_secs_f64()),
                    );
                }
                Err(e) => trace.record("fault", format_args!("{fault}: not applied ({e})")),
            }
        }));
    }

    // The workload until every publish is out and resolved and every fault is
    // over. Publishers sleep between sends, so on a real clock they run a little
    // behind the plan, and a rabbitmqctl fault ends seconds after its planned
    // end: the run waits for the count and the fault tasks, not the planned times.
    let messages = workload.messages();
    let workload_end = workload.last_send();
    let quiet = scenario.plan.quiet_after();
    let publish_timeout = scenario.settings.publish_timeout;
    let give_up = workload_end.max(quiet) * 2 + publish_timeout;
    let mut problems = Vec::new();
    let mut all_sent_at = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let interrupted_at = loop {
        ticker.tick().await;
        let now = trace.elapsed();
        if *interrupts.borrow() > 0 {
            break Some(now);
        }
        let sent = records.publishes().len() as u64;
        if all_sent_at.is_none() && records.setup_done() && sent >= messages {
            all_sent_at = Some(now);
        }
        let unresolved = records.unresolved();
        let faults_over = fault_tasks.iter().all(tokio::task::JoinHandle::is_finished);
        let waiting_for = all_sent_at.map(|_| {
            if faults_over {
                format!("{unresolved} publishes to resolve")
            } else {
                "the faults to end".to_owned()
            }
        });
        progress(&Progress {
            elapsed: now,
            sent,
            messages,
            waiting_for,
        });
        match all_sent_at {
            Some(at)
                if (unresolved == 0 && faults_over) || now >= at.max(quiet) + publish_timeout =>
            {
                break None;
            }
            None if now >= give_up => {
                problems.push(format!(
                    "only {sent} of {messages} publishes went out in {:.0} s",
                    now.as_secs_f64()
                ));
                break None;
            }
            _ => {}
        }
    };
    stop_faults.send_replace(true);
    for task in fault_tasks {
        let _ = task.await;
    }
    problems.extend(broker.undo().await);

    let publishes = records.publishes();
    let confirmed: Vec<u64> = publishes
        .iter()
        .filter(|(_, p)| p.outcome == Some(PublishOutcome::Confirmed))
        .map(|(id, _)| *id)
        .collect();
    if interrupted_at.is_none() {
        let drain_until = trace.elapsed() + Duration::from_secs(30);
        loop {
            let received = records.received();
            let missing = confirmed
                .iter()
                .filter(|id| !received.contains_key(id))
                .count();
            if missing == 0 || trace.elapsed() >= drain_until || *interrupts.borrow() > 0 {
                break;
            }
            ticker.tick().await;
            progress(&Progress {
                elapsed: trace.elapsed(),
                sent: publishes.len() as u64,
                messages,
                waiting_for: Some(format!("{missing} confirmed messages to arrive")),
            });
        }
    }
    let received = records.received();
    let lost = confirmed
        .iter()
        .filter(|id| !received.contains_key(id))
        .count();
    problems.extend(records.setup_errors());
    // An interrupted run ends where Ctrl-C came, perhaps in the middle of a
    // fault, not after the quiet end that gives the client time to recover.
    if interrupted_at.is_none() && !client.state().is_ready() {
        problems.push(format!("not Ready at the end: {:?}", client.state()));
    }
    // Leave the broker as it was.
    let cleanup = async {
        let mut failed = Vec::new();
        for q in records.queues().into_iter().flatten() {
            if let Err(e) = client.delete_queue(&q).await {
                failed.push(format!("delete queue {}: {e}", q.name()));
            }
        }
        for e in &workload.exchanges {
            if let Err(err) = client.delete_exchange(&e.name).await {
                failed.push(format!("delete exchange {}: {err}", e.name));
            }
        }
        failed
    };
    tokio::select! {
        failed = cleanup => problems.extend(failed),
        _ = interrupts.wait_for(|n| *n >= 2) => problems.push(format!(
            "interrupted again: the cleanup was skipped, rebound-chaos.{seed}.* may be left on \
             the broker"
        )),
    }
    let stats = client.stats();
    client.close().await;
    let _ = driver.await;

    let count = |f: &dyn Fn(&PublishOutcome) -> bool| {
        publishes
            .values()
            .filter(|p| p.outcome.as_ref().is_some_and(f))
            .count()
    };
    let confirmed_at = records.confirmed_at();
    let stalls = fault_times
        .borrow()
        .iter()
        .filter_map(|t| {
            let i = confirmed_at.partition_point(|c| c <= t);
            confirmed_at.get(i).map(|c| *c - *t)
        })
        .collect();
    Ok(RealRun {
        published: publishes.len(),
        confirmed: confirmed.len(),
        returned: count(&|o| *o == PublishOutcome::Returned),
        nacked: count(&|o| *o == PublishOutcome::Nacked),
        timed_out: count(&|o| *o == PublishOutcome::TimedOut),
        other_errors: count(&|o| {
            !matches!(
                o,
                PublishOutcome::Confirmed
                    | PublishOutcome::Returned
                    | PublishOutcome::Nacked
                    | PublishOutcome::TimedOut
            )
        }),
        received: received.len(),
        lost,
        duplicated: received
            .values()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum(),
        reconnects: stats.reconnects,
        republished: stats.republished,
        stale_acks: records.acks().stale,
        stalls,
        faults_planned: scenario.plan.len(),
        faults_hit: hits.get(),
        elapsed: trace.elapsed(),
        publishing: {
            let sent = publishes.values().map(|p| p.sent_at);
            sent.clone().max().unwrap_or_default() - sent.min().unwrap_or_default()
        },
        interrupted_at,
        trace: trace.text(),
        problems,
    })
}

/// Applies `fault`; returns what it hit and when it took effect, which for a
/// `rabbitmqctl` fault is a second or more after it was due (the recovery stall
/// counts from then).
async fn apply(
    fault: &Fault,
    proxy: &FaultProxy,
    broker: &BrokerFaults,
    name: &str,
    allow_broker_faults: bool,
    stop: &mut watch::Receiver<bool>,
    trace: &Trace,
) -> Result<(String, Duration), String> {
    let none = || "no open connection".to_owned();
    let ctl = &broker.ctl;
    let now = trace.elapsed();
    match fault {
        // an orderly close (FIN) of the proxied sockets, both ways
        Fault::KillConnection { pick } => proxy
            .close(*pick)
            .map(|id| (format!("proxied connection {id}"), now))
            .ok_or_else(none),
        Fault::KillAll => match proxy.close_all() {
            0 => Err(none()),
            n => Ok((format!("{n} proxied connections"), now)),
        },
        Fault::CloseConnection { pick, .. } => {
            let pid = close_own_connection(ctl, name, *pick).await?;
            Ok((pid, trace.elapsed()))
        }
        Fault::RefuseDials { duration, .. } => {
            proxy.refuse_for(*duration);
            Ok(("the proxy".to_owned(), now))
        }
        Fault::Partition { duration, .. } => {
            proxy.blackhole_all(true);
            hold(*duration, stop).await;
            proxy.blackhole_all(false);
            Ok(("the proxy (healed)".to_owned(), now))
        }
        Fault::Restart { downtime } if allow_broker_faults => {
            check_own_node(ctl, name).await?;
            broker.app_stopped.set(true);
            if let Err(e) = ctl.run(STOP_APP).await {
                // It may have stopped all the same.
                if ctl.run(START_APP).await.is_ok() {
                    broker.app_stopped.set(false);
                }
                return Err(e);
            }
            let stopped = trace.elapsed();
            hold(*downtime, stop).await;
            ctl.run(START_APP)
                .await
                .map_err(|e| format!("{e} (tried again when the run ends)"))?;
            broker.app_stopped.set(false);
            Ok((
                format!("{} (stop_app / start_app)", ctl.describe()),
                stopped,
            ))
        }
        Fault::Restart { downtime } => {
            // Seen from the client: every connection drops, dials fail a while.
            proxy.refuse_for(*downtime);
            proxy.close_all();
            Ok(("the proxy (restart as the client sees it)".to_owned(), now))
        }
        Fault::Alarm { duration } => {
            check_own_node(ctl, name).await?;
            broker.alarm_set.set(true);
            if let Err(e) = ctl.run(SET_ALARM).await {
                if ctl.run(CLEAR_ALARM).await.is_ok() {
                    broker.alarm_set.set(false);
                }
                return Err(e);
            }
            let raised = trace.elapsed();
            hold(*duration, stop).await;
            ctl.run(CLEAR_ALARM)
                .await
                .map_err(|e| format!("{e} (tried again when the run ends)"))?;
            broker.alarm_set.set(false);
            Ok((format!("{} (memory alarm)", ctl.describe()), raised))
        }
        other => Err(format!("{other} is not available against a real broker")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_goes_through_the_proxy() {
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            through_proxy("amqp://u:p@rabbit:5672/%2f", proxy),
            "amqp://u:p@127.0.0.1:4000/%2f?heartbeat=5"
        );
        assert_eq!(
            through_proxy("amqp://rabbit?heartbeat=3", proxy),
            "amqp://127.0.0.1:4000?heartbeat=3"
        );
        assert_eq!(
            through_proxy("amqp://u:p@h/v?frame_max=8192", proxy),
            "amqp://u:p@127.0.0.1:4000/v?frame_max=8192&heartbeat=5"
        );
    }
}
