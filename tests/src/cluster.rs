//! The 3-node RabbitMQ cluster of `scripts/cluster`, for the failover tests in
//! `tests/tests/cluster.rs` and the stall figures of `tests/src/bin/bench_cluster.rs`.
//!
//! `scripts/cluster up` starts `rebound-c1@localhost` .. `rebound-c3@localhost`
//! (AMQP on 127.0.0.1:5681..5683), clustered with each other and not with the
//! main broker on 5672. This module never starts or builds the cluster; it only
//! stops and starts the *apps* of its nodes (`rabbitmqctl stop_app` /
//! `start_app`), and puts back every node it stopped when its [`Cluster`] guard
//! drops, also when a test panics.
//!
//! # Gate
//!
//! The tests run only with `REBOUND_CLUSTER=1` (which `scripts/test` sets after
//! `scripts/cluster up`). Without it, [`Cluster::require`] prints why on stderr and
//! the test returns. With it, nodes that do not answer fail the test with "run
//! scripts/cluster up" — never a silent skip.
//!
//! # Serialisation
//!
//! A test that stops nodes must run alone: [`Cluster::require`] takes a lock file
//! in the temp folder (`amqp-rebound-cluster.lock`, holding the owner's pid) and
//! waits for it; the guard removes it. A lock left by a dead process is taken
//! over. This covers `cargo test` (threads of one process) and `cargo nextest`
//! (one process per test) alike.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rebound_core::{Client, ClientBuilder, Event, Object, Phase, TokioTimer, Transport};
use futures::StreamExt;

/// The environment variable that turns the cluster tests on.
pub const GATE: &str = "REBOUND_CLUSTER";

/// One node of the test cluster, numbered 1 to 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node(pub u8);

impl Node {
    /// The three nodes.
    pub const ALL: [Node; 3] = [Node(1), Node(2), Node(3)];

    /// Its Erlang node name, e.g. `rebound-c1@localhost`.
    pub fn name(self) -> String {
        format!("rebound-c{}@localhost", self.0)
    }

    /// Its AMQP port (5681, 5682, 5683).
    pub fn port(self) -> u16 {
        5680 + u16::from(self.0)
    }

    /// Its AMQP URL (guest, default vhost).
    pub fn url(self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port())
    }

    /// Its AMQP listener accepts a TCP connection now (the app runs).
    pub fn accepts(self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port()));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    /// The node named `name`, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Node> {
        Node::ALL.into_iter().find(|n| n.name() == name.trim())
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rebound-c{}", self.0)
    }
}

/// The URLs of all three nodes, for [`ClientBuilder::hosts`].
pub fn urls() -> Vec<String> {
    Node::ALL.iter().map(|n| n.url()).collect()
}

/// Whether the cluster tests are on (`REBOUND_CLUSTER=1`).
pub fn enabled() -> bool {
    std::env::var(GATE).is_ok_and(|v| v == "1")
}

/// Runs `rabbitmqctl -q -n NODE args...` (bounded by `timeout 120`); its stdout,
/// or its stderr as the error. `$RABBITMQCTL` overrides the command.
pub fn rabbitmqctl(node: Node, args: &[&str]) -> Result<String, String> {
    let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let out = Command::new("timeout")
        .arg("120")
        .arg(&ctl)
        .args(["-q", "-n", &node.name()])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {ctl}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {} {} failed ({}): {}{}",
            node.name(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
        ))
    }
}

/// [`rabbitmqctl`] off the async runtime's worker threads.
pub async fn rabbitmqctl_async(node: Node, args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(node, &args)
    })
    .await
    .unwrap_or_else(|e| Err(format!("rabbitmqctl task failed: {e}")))
}

/// Locks a mutex whose holder may have panicked (the data stays usable here).
pub use amqp_rebound_core::transport::support::lock;

/// The lock file that keeps cluster tests from running side by side.
#[derive(Debug)]
pub struct ClusterLock {
    path: PathBuf,
}

impl ClusterLock {
    /// Waits (up to `patience`) for the lock; takes over a lock whose owner died.
    pub fn acquire(patience: Duration) -> ClusterLock {
        let path = std::env::temp_dir().join("amqp-rebound-cluster.lock");
        let deadline = Instant::now() + patience;
        let me = std::process::id();
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let _ = write!(file, "{me}");
                    return ClusterLock { path };
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    let owner: Option<u32> = owner.trim().parse().ok();
                    let dead = match owner {
                        // another thread of this process holds it
                        Some(pid) if pid == me => false,
                        Some(pid) => !PathBuf::from(format!("/proc/{pid}")).exists(),
                        // being written right now, or garbage: give the writer a moment
                        None => false,
                    };
                    if dead {
                        eprintln!(
                            "cluster lock {} was held by dead process {owner:?}: taking it over",
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                }
                Err(e) => panic!("cannot create the cluster lock {}: {e}", path.display()),
            }
            assert!(
                Instant::now() < deadline,
                "waited {patience:?} for the cluster lock {} (held by another cluster test)",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The cluster, held by one test at a time. Dropping it starts the app of every
/// node it stopped (and waits for it), then releases the lock.
#[derive(Debug)]
pub struct Cluster {
    stopped: Mutex<BTreeSet<Node>>,
    _lock: ClusterLock,
}

impl Cluster {
    /// The cluster for test `test`, or `None` (after saying so on stderr) when
    /// `REBOUND_CLUSTER=1` is not set. Panics if a node does not answer.
    pub fn require(test: &str) -> Option<Cluster> {
        if !enabled() {
            eprintln!(
                "{test}: cluster tests disabled: set {GATE}=1 after scripts/cluster up (scripts/test does)"
            );
            return None;
        }
        Some(Cluster::acquire(test))
    }

    /// The cluster for test `test`, whatever the gate says: waits for the lock,
    /// restarts a node a killed test left stopped, and panics ("run
    /// scripts/cluster up") if a node still does not accept connections.
    pub fn acquire(test: &str) -> Cluster {
        let guard = ClusterLock::acquire(Duration::from_secs(30 * 60));
        let cluster = Cluster {
            stopped: Mutex::new(BTreeSet::new()),
            _lock: guard,
        };
        let down: Vec<Node> = Node::ALL.into_iter().filter(|n| !n.accepts()).collect();
        if !down.is_empty() {
            eprintln!("{test}: nodes {down:?} do not accept connections: trying start_app");
            lock(&cluster.stopped).extend(down.iter().copied());
            cluster.restart_stopped();
        }
        for node in Node::ALL {
            assert!(
                node.accepts(),
                "{test}: cluster node {node} does not accept AMQP connections on 127.0.0.1:{}: \
                 run scripts/cluster up",
                node.port()
            );
        }
        cluster
    }

    /// Stops `node`'s app (`rabbitmqctl stop_app`); returns when it has stopped.
    pub async fn stop_app(&self, node: Node) {
        lock(&self.stopped).insert(node);
        rabbitmqctl_async(node, &["stop_app"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Like [`stop_app`](Self::stop_app), and sends on `begun` when the node
    /// starts stopping: when `rabbitmqctl` prints its "Stopping rabbit
    /// application" banner, after its own start-up (0.5 - 2 s) and about 0.2 s
    /// before the node closes its connections. A fault can be timed on it.
    pub async fn stop_app_signalled(&self, node: Node, begun: tokio::sync::oneshot::Sender<()>) {
        lock(&self.stopped).insert(node);
        let run = move || -> Result<(), String> {
            let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
            let mut child = Command::new("timeout")
                .arg("120")
                .arg(&ctl)
                .args(["-n", &node.name(), "stop_app"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {ctl}: {e}"))?;
            let mut begun = Some(begun);
            if let Some(stdout) = child.stdout.take() {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("Stopping")
                        && let Some(tx) = begun.take()
                    {
                        let _ = tx.send(());
                    }
                }
            }
            if let Some(tx) = begun.take() {
                let _ = tx.send(());
            }
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "rabbitmqctl -n {} stop_app failed ({}): {}",
                    node.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        tokio::task::spawn_blocking(run)
            .await
            .unwrap_or_else(|e| Err(format!("rabbitmqctl task failed: {e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts `node`'s app again and waits until it has booted.
    pub async fn start_app(&self, node: Node) {
        rabbitmqctl_async(node, &["start_app"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        rabbitmqctl_async(node, &["await_startup", "--timeout", "120"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        lock(&self.stopped).remove(&node);
    }

    /// Starts several nodes' apps at once (a clustered node's app waits for its
    /// peers when they all went down), and waits until they have booted.
    pub async fn start_apps(&self, nodes: &[Node]) {
        let starts = nodes.iter().map(|&n| self.start_app(n));
        futures::future::join_all(starts).await;
    }

    /// A node whose app runs (none stopped by this guard and accepting).
    pub fn running_node(&self) -> Option<Node> {
        let stopped = lock(&self.stopped).clone();
        Node::ALL
            .into_iter()
            .find(|n| !stopped.contains(n) && n.accepts())
    }

    /// The nodes that hold a connection named `connection_name` now. Any running
    /// node lists the connections of the whole cluster; the server port a
    /// connection came in on tells its node.
    pub async fn connection_nodes(&self, connection_name: &str) -> Vec<Node> {
        let Some(node) = self.running_node() else {
            return Vec::new();
        };
        let out = match rabbitmqctl_async(
            node,
            &[
                "list_connections",
                "--no-table-headers",
                "port",
                "client_properties",
            ],
        )
        .await
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("list_connections: {e}");
                return Vec::new();
            }
        };
        let wanted = format!("{{\"connection_name\",\"{connection_name}\"}}");
        out.lines()
            .filter(|line| line.contains(&wanted))
            .filter_map(|line| {
                let port: u16 = line.split('\t').next()?.trim().parse().ok()?;
                Node::ALL.into_iter().find(|n| n.port() == port)
            })
            .collect()
    }

    /// Waits (up to `patience`) until exactly one connection named
    /// `connection_name` is listed, and returns its node.
    pub async fn connection_node(&self, connection_name: &str, patience: Duration) -> Node {
        let deadline = Instant::now() + patience;
        loop {
            let nodes = self.connection_nodes(connection_name).await;
            if let [node] = nodes[..] {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "connection {connection_name:?} not listed on exactly one node within {patience:?} (found {nodes:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the app of the node the connection named `connection_name` is on and
    /// waits until `events` shows the client losing it. Returns that node, when
    /// the stop began, and when the loss was seen (up to 60 s for each step).
    pub async fn stop_client_node(
        &self,
        connection_name: &str,
        events: &EventLog,
    ) -> (Node, Instant, Instant) {
        let node = self
            .connection_node(connection_name, Duration::from_secs(60))
            .await;
        let since = Instant::now();
        self.stop_app(node).await;
        let lost = events
            .wait_for(
                since,
                Duration::from_secs(60),
                "connection loss",
                is_connection_lost,
            )
            .await;
        (node, since, lost)
    }

    /// `(messages, leader)` of queue `queue` as a running node reports them
    /// (`messages` counts ready and unacknowledged; `leader` is the queue's node).
    pub async fn queue_info(&self, queue: &str) -> Option<(u64, String)> {
        let node = self.running_node()?;
        let out = rabbitmqctl_async(
            node,
            &[
                "list_queues",
                "--no-table-headers",
                "name",
                "messages",
                "leader",
            ],
        )
        .await
        .ok()?;
        out.lines().find_map(|line| {
            let mut cols = line.split('\t');
            (cols.next()? == queue).then_some(())?;
            let messages = cols.next()?.trim().parse().ok()?;
            Some((messages, cols.next().unwrap_or("").trim().to_string()))
        })
    }

    /// Starts every node this guard stopped; blocking (used on drop).
    fn restart_stopped(&self) {
        let nodes: Vec<Node> = lock(&self.stopped).iter().copied().collect();
        if nodes.is_empty() {
            return;
        }
        let handles: Vec<_> = nodes
            .into_iter()
            .map(|node| {
                std::thread::spawn(move || {
                    let started = rabbitmqctl(node, &["start_app"])
                        .and_then(|_| rabbitmqctl(node, &["await_startup", "--timeout", "120"]));
                    if let Err(e) = started {
                        eprintln!("could not restart {node}: {e} (run scripts/cluster up)");
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        lock(&self.stopped).clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.restart_stopped();
    }
}

/// A unique name for this run: `rebound-<what>-<pid>-<millis>`.
pub fn unique(what: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("rebound-{what}-{}-{millis}", std::process::id())
}

/// A client over `transport` for the three nodes, its driver spawned on the
/// current tokio runtime. `tune` adjusts the builder (pool, timeouts, seed).
pub fn client<T: Transport>(
    transport: T,
    connection_name: &str,
    tune: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> Client {
    let builder = Client::builder()
        .hosts(urls())
        .connection_name(connection_name)
        .seed(seed());
    let (client, driver) = tune(builder)
        .build(transport, TokioTimer)
        .expect("valid client configuration");
    tokio::spawn(driver);
    client
}

/// The client seed: `REBOUND_SEED`, or 1.
pub fn seed() -> u64 {
    std::env::var("REBOUND_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Every event of a client's `watch()`, stamped with when it was seen.
#[derive(Clone)]
pub struct EventLog {
    events: Arc<Mutex<Vec<(Instant, Event)>>>,
    changed: tokio::sync::watch::Receiver<usize>,
}

impl EventLog {
    /// Starts recording `client`'s events.
    pub fn start(client: &Client) -> EventLog {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = tokio::sync::watch::channel(0usize);
        let mut stream = client.watch();
        let sink = Arc::clone(&events);
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let n = {
                    let mut log = lock(&sink);
                    log.push((Instant::now(), event));
                    log.len()
                };
                let _ = tx.send(n);
            }
        });
        EventLog { events, changed }
    }

    /// A copy of the events so far.
    pub fn snapshot(&self) -> Vec<(Instant, Event)> {
        lock(&self.events).clone()
    }

    /// Waits (up to `patience`) for the first event after `since` that `pred`
    /// accepts; returns when it was seen.
    pub async fn wait_for(
        &self,
        since: Instant,
        patience: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Instant {
        let mut changed = self.changed.clone();
        let found = tokio::time::timeout(patience, async {
            loop {
                if let Some(at) = lock(&self.events)
                    .iter()
                    .find(|(at, e)| *at >= since && pred(e))
                    .map(|(at, _)| *at)
                {
                    return at;
                }
                if changed.changed().await.is_err() {
                    // the client's watch stream ended: nothing more will come
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} within {patience:?}"))
    }

    /// How many events after `since` `pred` accepts.
    pub fn count(&self, since: Instant, pred: impl Fn(&Event) -> bool) -> usize {
        lock(&self.events)
            .iter()
            .filter(|(at, e)| *at >= since && pred(e))
            .count()
    }
}

/// A connection left Ready (it was lost).
pub fn is_connection_lost(event: &Event) -> bool {
    matches!(
        event,
        Event::StateChanged {
            object: Object::Connection(_),
            from: Phase::Ready,
            ..
        }
    )
}

/// A channel became Ready (opened and its topology replayed).
pub fn is_channel_ready(event: &Event) -> bool {
    matches!(
        event,
        Event::StateChanged {
            object: Object::Channel(_),
            to: Phase::Ready,
            ..
        }
    )
}

/// Waits (up to `patience`) until every channel of `client` is Ready.
pub async fn wait_ready(client: &Client, patience: Duration) {
    let deadline = Instant::now() + patience;
    while !client.state().is_ready() {
        assert!(
            Instant::now() < deadline,
            "client not ready within {patience:?}: {:?}",
            client.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `q`-quantile (0..=1) of `samples` (nearest rank); zero when empty.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
