//! The real-broker mode (feature `lapin`): the same workload against a RabbitMQ,
//! through an in-process TCP fault proxy, in wall-clock time.
//!
//! Faults go through the proxy (reset connections, blackhole, refuse dials) and,
//! for `connection.close` with 320, through `rabbitmqctl close_connection` of this
//! run's own connections only. Faults that touch the whole broker (restart, memory
//! alarm) are off unless `--allow-broker-faults`: the broker may be shared. Fault
//! kinds a real broker cannot be made to show (channel errors on demand, confirm
//! trouble, per-connection blocking, consumer cancels) are replaced by the nearest
//! one the proxy can do; the plan printed with `--trace` shows what ran.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
use amqp_rebound_sim::{
    ClientBug, Fault, InstrumentedTransport, PublishOutcome, Scenario, Spawner, Trace, Workload,
    start_workload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

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
    pub trace: String,
    pub problems: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An in-process TCP proxy between the client and the broker that can reset its
/// connections, blackhole them, or refuse new ones.
struct FaultProxy {
    addr: SocketAddr,
    refuse_until: Arc<Mutex<Option<Instant>>>,
    blackhole: watch::Sender<bool>,
    conns: Arc<Mutex<BTreeMap<u64, AbortHandle>>>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hole: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while *hole.borrow() {
            if hole.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = hole.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Blackholed meanwhile: hold the bytes until the heal.
        while *hole.borrow() {
            if hole.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let refuse_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let (blackhole, _) = watch::channel(false);
        let conns: Arc<Mutex<BTreeMap<u64, AbortHandle>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(0));
        {
            let refuse_until = Arc::clone(&refuse_until);
            let blackhole = blackhole.clone();
            let conns = Arc::clone(&conns);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let refusing = lock(&refuse_until).is_some_and(|t| Instant::now() < t);
                    if refusing {
                        drop(client);
                        continue;
                    }
                    let hole = blackhole.subscribe();
                    let id = next.fetch_add(1, Ordering::SeqCst);
                    let conns_done = Arc::clone(&conns);
                    let task = tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            let (cr, cw) = client.into_split();
                            let (sr, sw) = server.into_split();
                            tokio::select! {
                                () = pump(cr, sw, hole.clone()) => {}
                                () = pump(sr, cw, hole) => {}
                            }
                        }
                        lock(&conns_done).remove(&id);
                    });
                    lock(&conns).insert(id, task.abort_handle());
                }
            });
        }
        Ok(FaultProxy {
            addr,
            refuse_until,
            blackhole,
            conns,
        })
    }

    /// Drops one proxied connection (the `pick`-th open one); its sockets close.
    fn reset(&self, pick: usize) -> Option<String> {
        let conns = lock(&self.conns);
        let n = conns.len();
        let (id, handle) = conns.iter().nth(pick % n.max(1))?;
        handle.abort();
        Some(format!("proxied connection {id}"))
    }

    fn reset_all(&self) -> Option<String> {
        let conns = lock(&self.conns);
        for handle in conns.values() {
            handle.abort();
        }
        (!conns.is_empty()).then(|| format!("{} proxied connections", conns.len()))
    }

    fn refuse(&self, duration: Duration) {
        *lock(&self.refuse_until) = Some(Instant::now() + duration);
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole.send_replace(on);
    }
}

/// `rabbitmqctl` with arguments, off the runtime's thread.
async fn rabbitmqctl(args: Vec<String>) -> Result<String, String> {
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("rabbitmqctl")
            .args(&args)
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("rabbitmqctl {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Closes the `pick`-th of this run's connections with 320, by name.
async fn close_own_connection(name: &str, pick: usize) -> Result<String, String> {
    let list = rabbitmqctl(
        [
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await?;
    let marker = format!("\"{name}\"");
    let pids: Vec<String> = list
        .lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect();
    if pids.is_empty() {
        return Err("no connection of this run is open".to_owned());
    }
    let pid = pids[pick % pids.len()].clone();
    rabbitmqctl(vec![
        "close_connection".into(),
        pid.clone(),
        "rebound-chaos fault".into(),
    ])
    .await?;
    Ok(pid)
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

/// Runs `scenario`'s workload against the broker at `url` with the plan mapped
/// to real faults. `progress(elapsed, total)` is called about every 100 ms.
pub fn run(
    kind: RealTransport,
    url: &str,
    scenario: &Scenario,
    allow_broker_faults: bool,
    progress: &dyn Fn(Duration, Duration),
) -> Result<RealRun, String> {
    let endpoint = Endpoint::parse(url).map_err(|e| e.to_string())?;
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&(endpoint.host(), endpoint.port()))
        .map_err(|e| format!("cannot resolve {}: {e}", endpoint.host()))?
        .next()
        .ok_or_else(|| format!("no address for {}", endpoint.host()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        run_on_tokio(kind, url, upstream, scenario, allow_broker_faults, progress).await
    })
}

async fn run_on_tokio(
    kind: RealTransport,
    url: &str,
    upstream: SocketAddr,
    scenario: &Scenario,
    allow_broker_faults: bool,
    progress: &dyn Fn(Duration, Duration),
) -> Result<RealRun, String> {
    let proxy = Rc::new(
        FaultProxy::start(upstream)
            .await
            .map_err(|e| format!("cannot start the fault proxy: {e}"))?,
    );
    let seed = scenario.seed;
    let name = format!("rebound-chaos-{seed}");
    let timer: Arc<dyn amqp_rebound_core::Timer> = Arc::new(TokioTimer);
    let origin = timer.now();
    let trace = Trace::with_timer(Arc::clone(&timer), origin);
    trace.set_enabled(scenario.settings.trace);
    let builder = Client::builder()
        .hosts([through_proxy(url, proxy.addr)])
        .pool(scenario.settings.connections, scenario.settings.channels)
        .backoff(scenario.settings.backoff.clone())
        .connect_timeout(scenario.settings.connect_timeout)
        .publish_timeout(scenario.settings.publish_timeout)
        .seed(seed)
        .connection_name(name.clone());
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
    let spawn: Spawner = Rc::new(|task| {
        tokio::task::spawn_local(task);
    });
    let records = start_workload(&client, &workload, &trace, spawn);

    // Faults, at their times.
    let hits = Rc::new(std::cell::Cell::new(0usize));
    let fault_times = Rc::new(std::cell::RefCell::new(Vec::new()));
    for f in &scenario.plan.faults {
        let fault = real_fault(&f.fault, allow_broker_faults);
        let at = f.at;
        let proxy = Rc::clone(&proxy);
        let trace = trace.clone();
        let name = name.clone();
        let hits = Rc::clone(&hits);
        let fault_times = Rc::clone(&fault_times);
        tokio::task::spawn_local(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(origin + at)).await;
            let fired = trace.elapsed();
            let target = apply(&fault, &proxy, &name, allow_broker_faults).await;
            match &target {
                Ok(t) => {
                    hits.set(hits.get() + 1);
                    fault_times.borrow_mut().push(fired);
                    trace.record("fault", format_args!("{fault}: {t}"));
                }
                Err(e) => trace.record("fault", format_args!("{fault}: not applied ({e})")),
            }
        });
    }

    // The workload, then until every publish resolved, then the drain.
    let workload_end = workload.last_send();
    let quiet = scenario.plan.quiet_after();
    let total = workload_end.max(quiet) + scenario.settings.publish_timeout;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticker.tick().await;
        let now = trace.elapsed();
        progress(now, total);
        let done_publishing = now >= workload_end && records.setup_done();
        if done_publishing && records.unresolved() == 0 && now >= quiet {
            break;
        }
        if now >= total {
            break;
        }
    }
    let publishes = records.publishes();
    let confirmed: Vec<u64> = publishes
        .iter()
        .filter(|(_, p)| p.outcome == Some(PublishOutcome::Confirmed))
        .map(|(id, _)| *id)
        .collect();
    let drain_until = trace.elapsed() + Duration::from_secs(30);
    loop {
        let received = records.received();
        if confirmed.iter().all(|id| received.contains_key(id)) || trace.elapsed() >= drain_until {
            break;
        }
        ticker.tick().await;
        progress(trace.elapsed(), total);
    }
    let received = records.received();
    let lost = confirmed
        .iter()
        .filter(|id| !received.contains_key(id))
        .count();
    let mut problems = records.setup_errors();
    if !client.state().is_ready() {
        problems.push(format!("not Ready at the end: {:?}", client.state()));
    }
    // Leave the broker as it was.
    for q in records.queues().into_iter().flatten() {
        if let Err(e) = client.delete_queue(&q).await {
            problems.push(format!("delete queue {}: {e}", q.name()));
        }
    }
    for e in &workload.exchanges {
        if let Err(err) = client.delete_exchange(&e.name).await {
            problems.push(format!("delete exchange {}: {err}", e.name));
        }
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
        trace: trace.text(),
        problems,
    })
}

async fn apply(
    fault: &Fault,
    proxy: &FaultProxy,
    name: &str,
    allow_broker_faults: bool,
) -> Result<String, String> {
    let none = || "no open connection".to_owned();
    match fault {
        Fault::KillConnection { pick } => proxy.reset(*pick).ok_or_else(none),
        Fault::KillAll => proxy.reset_all().ok_or_else(none),
        Fault::CloseConnection { pick, .. } => close_own_connection(name, *pick).await,
        Fault::RefuseDials { duration, .. } => {
            proxy.refuse(*duration);
            Ok("the proxy".to_owned())
        }
        Fault::Partition { duration, .. } => {
            proxy.set_blackhole(true);
            tokio::time::sleep(*duration).await;
            proxy.set_blackhole(false);
            Ok("the proxy (healed)".to_owned())
        }
        Fault::Restart { downtime } if allow_broker_faults => {
            rabbitmqctl(vec!["stop_app".into()]).await?;
            tokio::time::sleep(*downtime).await;
            rabbitmqctl(vec!["start_app".into()]).await?;
            Ok("the broker (stop_app / start_app)".to_owned())
        }
        Fault::Restart { downtime } => {
            // Seen from the client: every connection drops, dials fail a while.
            proxy.refuse(*downtime);
            proxy.reset_all();
            Ok("the proxy (restart as the client sees it)".to_owned())
        }
        Fault::Alarm { duration } => {
            rabbitmqctl(vec![
                "eval".into(),
                "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []}).".into(),
            ])
            .await?;
            tokio::time::sleep(*duration).await;
            rabbitmqctl(vec![
                "eval".into(),
                "rabbit_alarm:clear_alarm({resource_limit, memory, node()}).".into(),
            ])
            .await?;
            Ok("the broker (memory alarm)".to_owned())
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
