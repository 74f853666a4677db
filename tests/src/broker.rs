//! The real broker: where it is ([`BrokerUrl`], from `AMQP_URL`), whether it is
//! there ([`require_broker`]), how to hurt it (`rabbitmqctl` wrappers), how to make
//! sure it heals ([`AppGuard`], [`AlarmGuard`], [`ListenerGuard`]), who may hurt
//! it when ([`BrokerLock`]), and names that no other test uses ([`unique`]).
//!
//! `rabbitmqctl` is found on `PATH` (or at `$RABBITMQCTL`) and talks to the local
//! node; every call starts an Erlang VM and takes about 0.5 s. The async wrappers
//! run it on tokio's blocking pool; the guards call it synchronously from `Drop`,
//! which also runs while a test panics.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The URL used when `AMQP_URL` is not set.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long one `rabbitmqctl` call may take before it is killed.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// The broker's URL, split into the parts the tests rewrite (the authority to go
/// through a proxy or to a dead port, the password, the query for heartbeats).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `amqp` or `amqps`.
    pub scheme: String,
    /// `user:password` (percent-encoded as given), or empty.
    pub userinfo: String,
    /// The host, without brackets.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The vhost path with its leading `/` (e.g. `/%2f`), or empty.
    pub path: String,
    /// The query with its leading `?`, or empty.
    pub query: String,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the password
        f.debug_struct("BrokerUrl")
            .field("scheme", &self.scheme)
            .field("user", &self.user())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish()
    }
}

impl BrokerUrl {
    /// The first URL of `AMQP_URL` (a comma-separated list is allowed), or
    /// [`DEFAULT_URL`].
    pub fn from_env() -> BrokerUrl {
        let list = std::env::var("AMQP_URL").unwrap_or_default();
        let first = list
            .split(',')
            .map(str::trim)
            .find(|u| !u.is_empty())
            .unwrap_or(DEFAULT_URL);
        BrokerUrl::parse(first).unwrap_or_else(|e| panic!("AMQP_URL: {e}"))
    }

    /// Splits an `amqp://` or `amqps://` URL. Only what the tests need; the
    /// client's own parser is the one under test.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "no scheme (amqp:// or amqps://)".to_string())?;
        if scheme != "amqp" && scheme != "amqps" {
            return Err(format!("unknown scheme {scheme:?}"));
        }
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (userinfo.to_string(), rest),
            None => (String::new(), rest),
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (path, query) = match tail.find('?') {
            Some(at) => (tail[..at].to_string(), tail[at..].to_string()),
            None => (tail.to_string(), String::new()),
        };
        let default_port = if scheme == "amqps" { 5671 } else { 5672 };
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (host, after) = inner
                .split_once(']')
                .ok_or_else(|| "unclosed [ in the host".to_string())?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
                None => default_port,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("bad port {p:?}"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        Ok(BrokerUrl {
            scheme: scheme.to_string(),
            userinfo,
            host,
            port,
            path,
            query,
        })
    }

    /// The user name (percent-decoding is not needed for the tests' users).
    pub fn user(&self) -> &str {
        match self.userinfo.split_once(':') {
            Some((user, _)) => user,
            None if self.userinfo.is_empty() => "guest",
            None => &self.userinfo,
        }
    }

    /// `host:port`, bracketed for IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The broker's socket address (resolving the host).
    pub fn socket_addr(&self) -> SocketAddr {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("cannot resolve the broker host {:?}", self.host))
    }

    /// The URL as given.
    pub fn url(&self) -> String {
        self.build(&self.userinfo, &self.authority(), &self.query)
    }

    /// The same URL at another `host:port` (a proxy, a dead port).
    pub fn at(&self, addr: SocketAddr) -> String {
        self.build(&self.userinfo, &addr.to_string(), &self.query)
    }

    /// The same URL with `query` (e.g. `heartbeat=2`) added to its query.
    pub fn with_query(url: &str, query: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{query}")
    }

    /// The same URL with another password.
    pub fn with_password(&self, password: &str) -> String {
        let userinfo = format!("{}:{password}", self.user());
        self.build(&userinfo, &self.authority(), &self.query)
    }

    fn build(&self, userinfo: &str, authority: &str, query: &str) -> String {
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!(
            "{}://{userinfo}{at}{authority}{}{query}",
            self.scheme, self.path
        )
    }

    /// Whether the broker runs on this machine (so `rabbitmqctl` reaches it).
    pub fn is_local(&self) -> bool {
        matches!(self.host.as_str(), "localhost" | "::1") || self.host.starts_with("127.")
    }
}

/// Whether a TCP connection to the broker succeeds within 2 s.
pub fn broker_reachable(url: &BrokerUrl) -> bool {
    let Ok(addrs) = (url.host.as_str(), url.port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

/// Whether a missing broker must fail the test (`CI=true`, or `scripts/test`
/// brought one up: `REBOUND_BROKER_AVAILABLE=1`).
pub fn broker_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("REBOUND_BROKER_AVAILABLE").is_ok_and(|v| v == "1")
}

/// Checks that the broker is reachable. `true`: go on. `false`: no broker and
/// none is required, so the caller skips (and says so on stderr). Panics when a
/// broker is required (`CI=true`): there a missing broker is a failure, never a
/// skip.
pub fn require_broker(test: &str) -> bool {
    let url = BrokerUrl::from_env();
    if broker_reachable(&url) {
        return true;
    }
    if broker_required() {
        panic!(
            "{test}: no broker at {} and CI=true: a missing broker is a failure, not a skip",
            url.authority()
        );
    }
    eprintln!(
        "SKIPPED {test}: no broker at {} (set AMQP_URL, or run scripts/test, which starts one)",
        url.authority()
    );
    false
}

// ---------------------------------------------------------------------------
// rabbitmqctl

/// Runs `rabbitmqctl -q ARGS` and returns its stdout, or an error with its
/// stderr. Blocks (about 0.5 s); killed after 60 s.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let program = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_string());
    let mut child = Command::new(&program)
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = Instant::now() + CTL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "rabbitmqctl {args:?} timed out after {CTL_TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("rabbitmqctl {args:?}: {e}")),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// [`rabbitmqctl`] on tokio's blocking pool, panicking on failure.
pub async fn ctl(args: &[&str]) -> String {
    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .unwrap_or_else(|e| Err(format!("rabbitmqctl task: {e}")))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `rabbitmqctl close_all_connections`: the broker closes every client
/// connection with 320 CONNECTION_FORCED.
pub async fn close_all_connections(reason: &str) {
    ctl(&["close_all_connections", reason]).await;
}

/// One row of `rabbitmqctl list_connections`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The connection's Erlang pid (what `close_connection` takes).
    pub pid: String,
    /// The client-provided name (`connection_name`), or empty.
    pub client_name: String,
    /// The broker's name for it (`127.0.0.1:51234 -> 127.0.0.1:5672`).
    pub name: String,
    /// The broker's state of it: `running`, `blocking` (a resource alarm is on
    /// and it has not published since), `blocked` (the broker stopped reading
    /// from it), `flow`, `closing`, ...
    pub state: String,
}

/// `rabbitmqctl list_connections pid name state client_properties`, with the
/// client-provided connection name pulled out of the client properties.
pub async fn list_connections() -> Vec<ConnectionInfo> {
    let out = ctl(&[
        "list_connections",
        "--no-table-headers",
        "pid",
        "name",
        "state",
        "client_properties",
    ])
    .await;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut cols = line.splitn(4, '\t');
            let pid = cols.next().unwrap_or_default().to_string();
            let name = cols.next().unwrap_or_default().to_string();
            let state = cols.next().unwrap_or_default().trim().to_string();
            let props = cols.next().unwrap_or_default();
            ConnectionInfo {
                pid,
                client_name: client_name(props).unwrap_or_default(),
                name,
                state,
            }
        })
        .collect()
}

/// The broker's [`state`](ConnectionInfo::state) of each connection whose
/// client-provided name starts with `prefix`.
pub async fn connection_states(prefix: &str) -> Vec<String> {
    list_connections()
        .await
        .into_iter()
        .filter(|c| c.client_name.starts_with(prefix))
        .map(|c| c.state)
        .collect()
}

/// The `connection_name` in rabbitmqctl's rendering of client properties:
/// `... {"connection_name","the-name"} ...` (RabbitMQ 3.10), or
/// `... {<<"connection_name">>,longstr,<<"the-name">>} ...` (the raw Erlang
/// terms of other versions).
fn client_name(props: &str) -> Option<String> {
    [
        ("{\"connection_name\",\"", "\"}"),
        ("<<\"connection_name\">>,longstr,<<\"", "\">>"),
    ]
    .iter()
    .find_map(|(key, close)| {
        let start = props.find(key)? + key.len();
        let end = props[start..].find(close)? + start;
        Some(props[start..end].to_string())
    })
}

/// Closes the connections whose client-provided name starts with `prefix`
/// (a kill that touches no other test's connections). Returns how many.
pub async fn close_connections_named(prefix: &str, reason: &str) -> usize {
    let mut closed = 0;
    for conn in list_connections().await {
        if conn.client_name.starts_with(prefix) {
            // it may be gone already; that is fine
            let pid = conn.pid.clone();
            let reason = reason.to_string();
            let done = tokio::task::spawn_blocking(move || {
                rabbitmqctl(&["close_connection", &pid, &reason])
            })
            .await;
            if matches!(done, Ok(Ok(_))) {
                closed += 1;
            }
        }
    }
    closed
}

/// Messages ready in a queue, per `rabbitmqctl list_queues`.
pub async fn queue_messages(queue: &str) -> Option<u64> {
    let out = ctl(&["list_queues", "--no-table-headers", "name", "messages"]).await;
    out.lines().find_map(|line| {
        let (name, count) = line.split_once('\t')?;
        (name == queue).then(|| count.trim().parse().ok())?
    })
}

const SET_ALARM: &str = "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []}).";
const CLEAR_ALARM: &str = "rabbit_alarm:clear_alarm({resource_limit, memory, node()}).";

/// A memory alarm, without touching the watermark: the broker blocks publishing
/// connections. Clear it with [`AlarmGuard`] (or [`clear_memory_alarm`]).
pub async fn set_memory_alarm() -> AlarmGuard {
    let guard = AlarmGuard { _private: () };
    ctl(&["eval", SET_ALARM]).await;
    guard
}

/// Clears the memory alarm (a no-op without one).
pub async fn clear_memory_alarm() {
    ctl(&["eval", CLEAR_ALARM]).await;
}

/// Clears the memory alarm when dropped, even during a panic.
#[derive(Debug)]
#[must_use = "dropping the guard clears the alarm"]
pub struct AlarmGuard {
    _private: (),
}

impl Drop for AlarmGuard {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["eval", CLEAR_ALARM]) {
            eprintln!("AlarmGuard: could not clear the memory alarm: {e}");
        }
    }
}

/// Pauses the broker's Erlang VM (SIGSTOP): its sockets stay open and nothing
/// answers, as a node that hangs. [`PauseGuard::resume`] (or dropping the guard)
/// sends SIGCONT; a detached watchdog also resumes it after `at_most`, should
/// this process die before it can.
pub async fn pause_broker(at_most: Duration) -> PauseGuard {
    let out = ctl(&["eval", "os:getpid()."]).await;
    let pid: u32 = out
        .trim()
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("the broker's pid from {out:?}"));
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sleep {}; kill -CONT {pid}",
            at_most.as_secs().max(1)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the resume watchdog");
    // reaped here while this process lives; it outlives a process that dies
    std::thread::spawn(move || watchdog.wait());
    let guard = PauseGuard { pid };
    signal(pid, "-STOP");
    guard
}

fn signal(pid: u32, which: &str) {
    match Command::new("kill")
        .arg(which)
        .arg(pid.to_string())
        .status()
    {
        Ok(status) if status.success() => {}
        other => eprintln!("kill {which} {pid}: {other:?}"),
    }
}

/// Resumes the paused broker when dropped, even during a panic.
#[derive(Debug)]
#[must_use = "dropping the guard resumes the broker"]
pub struct PauseGuard {
    pid: u32,
}

impl PauseGuard {
    /// SIGCONT now.
    pub fn resume(self) {
        drop(self);
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        signal(self.pid, "-CONT");
    }
}

/// `rabbitmqctl stop_app`: the broker closes every connection and stops; durable
/// queues and their persistent messages survive. Restart with [`AppGuard::start`].
pub async fn stop_app() -> AppGuard {
    let guard = AppGuard { _private: () };
    ctl(&["stop_app"]).await;
    guard
}

/// Restarts the broker app when dropped (`start_app` + `await_startup`), even
/// during a panic.
#[derive(Debug)]
#[must_use = "dropping the guard restarts the broker app"]
pub struct AppGuard {
    _private: (),
}

impl AppGuard {
    /// `start_app` and `await_startup` now.
    pub async fn start(self) {
        ctl(&["start_app"]).await;
        ctl(&["await_startup", "--timeout", "120"]).await;
        std::mem::forget(self);
    }
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        for args in [
            &["start_app"][..],
            &["await_startup", "--timeout", "120"][..],
        ] {
            if let Err(e) = rabbitmqctl(args) {
                eprintln!("AppGuard: {e}");
            }
        }
    }
}

/// `rabbitmqctl suspend_listeners`: new connections are refused (existing ones
/// stay). Resume with [`ListenerGuard::resume`].
pub async fn suspend_listeners() -> ListenerGuard {
    let guard = ListenerGuard { _private: () };
    ctl(&["suspend_listeners"]).await;
    guard
}

/// Resumes the listeners when dropped, even during a panic.
#[derive(Debug)]
#[must_use = "dropping the guard resumes the listeners"]
pub struct ListenerGuard {
    _private: (),
}

impl ListenerGuard {
    /// `resume_listeners` now.
    pub async fn resume(self) {
        ctl(&["resume_listeners"]).await;
        std::mem::forget(self);
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["resume_listeners"]) {
            eprintln!("ListenerGuard: {e}");
        }
    }
}

/// Restores a broker left stopped, alarmed or deaf by an earlier run that was
/// killed before its guards ran. Each step is a no-op on a healthy broker.
pub fn heal_broker() -> Result<(), String> {
    if rabbitmqctl(&["await_startup", "--timeout", "5"]).is_err() {
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup", "--timeout", "120"])?;
    }
    rabbitmqctl(&["eval", CLEAR_ALARM])?;
    rabbitmqctl(&["resume_listeners"])?;
    Ok(())
}

// ---------------------------------------------------------------------------
// serialisation

/// How a test uses the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Uses its own queues and connections only: may run beside other shared tests.
    Shared,
    /// Restarts the broker, raises an alarm, suspends listeners or closes every
    /// connection: runs alone.
    Exclusive,
}

/// A readers-writer lock on the broker, across threads and processes: an
/// `flock(2)` on a file in the temp directory named after the broker's address.
/// Held until dropped (or the process dies: the kernel releases it).
///
/// `flock` locks belong to an open file description, so two locks taken in the
/// same process through separate `open`s exclude each other like two processes:
/// one lock type covers `cargo test` (threads) and `cargo nextest` (processes).
#[derive(Debug)]
pub struct BrokerLock {
    _file: File,
    access: Access,
}

impl BrokerLock {
    /// Takes the lock of the broker at `AMQP_URL`, waiting up to 30 minutes
    /// (then panics).
    pub fn acquire(access: Access) -> BrokerLock {
        let url = BrokerUrl::from_env();
        let path = std::env::temp_dir().join(format!(
            "amqp-rebound-tests.{}-{}.lock",
            url.host.replace([':', '/'], "_"),
            url.port
        ));
        BrokerLock::at(path, access)
    }

    /// Takes the lock on the file at `path` (and its turnstile, `path` +
    /// `.turnstile`).
    ///
    /// Writers go first: a waiting exclusive lock holds the turnstile, which
    /// every new lock passes through, so a stream of shared cases cannot starve
    /// an exclusive one (under `cargo test` two threads would otherwise take turns
    /// holding the shared lock indefinitely).
    pub fn at(path: PathBuf, access: Access) -> BrokerLock {
        let deadline = Instant::now() + Duration::from_secs(30 * 60);
        let mut turnstile_path = path.clone().into_os_string();
        turnstile_path.push(".turnstile");
        let turnstile = lock_file(&PathBuf::from(turnstile_path), Access::Exclusive, deadline);
        let file = lock_file(&path, access, deadline);
        drop(turnstile);
        BrokerLock {
            _file: file,
            access,
        }
    }

    /// How it is held.
    pub fn access(&self) -> Access {
        self.access
    }
}

/// Opens `path` and `flock`s it, polling every 20 ms until `deadline`.
fn lock_file(path: &std::path::Path, access: Access, deadline: Instant) -> File {
    use rustix::fs::{FlockOperation, flock};
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open the broker lock {}: {e}", path.display()));
    let op = match access {
        Access::Shared => FlockOperation::NonBlockingLockShared,
        Access::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    loop {
        match flock(&file, op) {
            Ok(()) => return file,
            Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot lock {} ({access:?}): {e}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------
// names

/// A name no other test (or run) uses: `rebound-test.PREFIX.PID.RANDOM`.
pub fn unique(prefix: &str) -> String {
    format!(
        "rebound-test.{prefix}.{}.{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

// ---------------------------------------------------------------------------
// a standing control node

/// The Erlang loop a [`ControlNode`] runs: reads one expression per line,
/// evaluates it and prints the result on one line (`~w`), an error as
/// `{error,Class,Reason}`; ends at end of input.
const CONTROL_LOOP: &str = "F = fun L() -> case io:get_line(\"\") of eof -> halt(); \
     Line -> R = try {ok, T, _} = erl_scan:string(Line), {ok, E} = erl_parse:parse_exprs(T), \
     {value, V, _} = erl_eval:exprs(E, []), V catch C:X -> {error, C, X} end, \
     io:format(\"~w~n\", [R]), L() end end, F().";

/// An Erlang VM started once, connected to the broker's node, that runs
/// commands on it by RPC: what `rabbitmqctl` does, without booting a VM per
/// call. A `rabbitmqctl` run takes 0.4-2.4 s before the broker acts, and the
/// VM it boots takes one of a small machine's cores meanwhile; through this
/// node the broker acts within milliseconds of the call, so a bench's kills
/// come on their schedule and the tool adds no load of its own.
///
/// The broker's node name is `$RABBITMQ_NODENAME`, or asked of `rabbitmqctl`
/// once; the cookie is `$RABBITMQ_ERLANG_COOKIE`, or read from
/// `/var/lib/rabbitmq/.erlang.cookie` or `~/.erlang.cookie`.
pub struct ControlNode {
    node: String,
    /// A call failed midway (no answer, or an I/O error): a late answer could
    /// be taken for the next call's, so the node takes no more calls.
    broken: bool,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl std::fmt::Debug for ControlNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the cookie
        f.debug_struct("ControlNode")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ControlNode {
    /// Starts the node and checks that it reaches the broker's.
    pub async fn start() -> Result<ControlNode, String> {
        use tokio::io::AsyncBufReadExt;
        let node = match std::env::var("RABBITMQ_NODENAME") {
            Ok(node) if !node.is_empty() => node,
            _ => tokio::task::spawn_blocking(|| rabbitmqctl(&["eval", "node()."]))
                .await
                .map_err(|e| format!("rabbitmqctl task: {e}"))??
                .trim()
                .to_string(),
        };
        // `rabbitmqctl` quotes a name that needs it (`'rabbit@my-host'`)
        let node = node.trim_matches('\'').to_string();
        let host = node
            .split_once('@')
            .map(|(_, host)| host.to_string())
            .ok_or_else(|| format!("not a node name: {node:?}"))?;
        let cookie = match std::env::var("RABBITMQ_ERLANG_COOKIE") {
            Ok(cookie) if !cookie.is_empty() => cookie,
            _ => {
                let home = std::env::var("HOME").unwrap_or_default();
                [
                    "/var/lib/rabbitmq/.erlang.cookie".to_string(),
                    format!("{home}/.erlang.cookie"),
                ]
                .iter()
                .find_map(|path| std::fs::read_to_string(path).ok())
                .map(|c| c.trim().to_string())
                .ok_or("no Erlang cookie found (set RABBITMQ_ERLANG_COOKIE)")?
            }
        };
        // unique per node started: a node just stopped may still hold its name
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rebound_ctl_{}_{n}@{host}", std::process::id());
        let mut child = tokio::process::Command::new("erl")
            .args([
                "-sname",
                &name,
                "-hidden",
                "-noshell",
                "-setcookie",
                &cookie,
            ])
            .args(["-eval", CONTROL_LOOP])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run erl: {e}"))?;
        let stdin = child.stdin.take().ok_or("erl has no stdin")?;
        let stdout = child.stdout.take().ok_or("erl has no stdout")?;
        let mut control = ControlNode {
            node,
            broken: false,
            child,
            stdin,
            lines: tokio::io::BufReader::new(stdout).lines(),
        };
        let answer = control.call("erlang", "node", "").await?;
        if answer.trim_matches('\'') != control.node {
            return Err(format!(
                "the control node reached {answer:?}, not {:?}",
                control.node
            ));
        }
        Ok(control)
    }

    /// `rpc:call(Node, Module, Function, [Args])` on the broker's node; the
    /// result as Erlang prints it (`~w`), or an error.
    pub async fn call(
        &mut self,
        module: &str,
        function: &str,
        args: &str,
    ) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        if self.broken {
            return Err("control node: an earlier call failed midway".into());
        }
        // one line in, one line out: the call must be one line
        if [module, function, args]
            .iter()
            .any(|part| part.contains(['\n', '\r']))
        {
            return Err(format!(
                "control node: {module}:{function}: a line break in the call"
            ));
        }
        // until the answer is read, a failure leaves the node out of step
        self.broken = true;
        let line = format!(
            "rpc:call('{}', {module}, {function}, [{args}]).\n",
            self.node
        );
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("control node: {e}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| format!("control node: {e}"))?;
        let answer = tokio::time::timeout(CTL_TIMEOUT, self.lines.next_line())
            .await
            .map_err(|_| {
                format!("control node: no answer to {module}:{function} in {CTL_TIMEOUT:?}")
            })?
            .map_err(|e| format!("control node: {e}"))?
            .ok_or("control node ended")?;
        self.broken = false;
        if answer.starts_with("{error,") || answer.starts_with("{badrpc,") {
            return Err(format!("{module}:{function}: {answer}"));
        }
        Ok(answer)
    }

    /// The broker closes every client connection with 320 CONNECTION_FORCED
    /// (what `rabbitmqctl close_all_connections` calls).
    pub async fn close_all_connections(&mut self, reason: &str) -> Result<(), String> {
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control() && !matches!(c, '\\' | '"'))
            .collect();
        self.call(
            "rabbit_networking",
            "close_all_connections",
            &format!("<<\"{reason}\">>"),
        )
        .await
        .map(drop)
    }

    /// A round trip to the broker's node that changes nothing.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.call("erlang", "node", "").await.map(drop)
    }
}

impl Drop for ControlNode {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_urls() {
        let u = BrokerUrl::parse("amqp://app:s3cr3t@10.0.0.5:5673/%2f?heartbeat=5").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user()),
            ("10.0.0.5", 5673, "app")
        );
        assert_eq!(u.path, "/%2f");
        assert_eq!(u.url(), "amqp://app:s3cr3t@10.0.0.5:5673/%2f?heartbeat=5");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(u.at(addr), "amqp://app:s3cr3t@127.0.0.1:1/%2f?heartbeat=5");
        assert_eq!(
            u.with_password("x"),
            "amqp://app:x@10.0.0.5:5673/%2f?heartbeat=5"
        );
        assert!(!format!("{u:?}").contains("s3cr3t"));
        assert_eq!(
            BrokerUrl::with_query("amqp://h/%2f", "heartbeat=2"),
            "amqp://h/%2f?heartbeat=2"
        );
        let v6 = BrokerUrl::parse("amqps://[::1]/vh").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 5671));
        assert_eq!(v6.authority(), "[::1]:5671");
        assert!(v6.is_local());
        let bare = BrokerUrl::parse("amqp://rabbit").unwrap();
        assert_eq!(
            (bare.host.as_str(), bare.port, bare.path.as_str()),
            ("rabbit", 5672, "")
        );
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("amqp://h:port").is_err());
    }

    #[test]
    fn finds_the_client_provided_name() {
        let props =
            r#"[{"product","lapin"},{<<"connection_name">>,longstr,<<"rebound-test.x.1">>},{x}]"#;
        assert_eq!(client_name(props).as_deref(), Some("rebound-test.x.1"));
        // RabbitMQ 3.10's rendering (an amqprs client)
        let props = r#"[{"connection_name","rebound-test.y.2"},{"product","AMQPRS"},{"capabilities",[{"consumer_cancel_notify",true}]}]"#;
        assert_eq!(client_name(props).as_deref(), Some("rebound-test.y.2"));
        assert_eq!(client_name("[]"), None);
    }

    #[tokio::test]
    async fn a_control_node_calls_the_brokers_node() {
        if !require_broker("a_control_node_calls_the_brokers_node")
            || !BrokerUrl::from_env().is_local()
        {
            return;
        }
        let mut node = ControlNode::start().await.expect("a control node");
        assert_eq!(
            node.call("erlang", "length", "[a, b, c]").await.as_deref(),
            Ok("3")
        );
        node.ping().await.expect("a round trip");
        let err = node
            .call("rebound_no_such_module", "f", "")
            .await
            .expect_err("an unknown module is an error");
        assert!(err.contains("badrpc"), "{err}");
        // a call of two lines would put the answers out of step: refused
        assert!(node.call("erlang", "node", "\n").await.is_err());
        node.ping().await.expect("still in step");
    }

    #[test]
    fn shared_locks_share_and_exclusive_excludes() {
        // Both in one process, through separate open file descriptions.
        let path = std::env::temp_dir().join(format!("{}.lock", unique("lock-test")));
        let a = BrokerLock::at(path.clone(), Access::Shared);
        let b = BrokerLock::at(path.clone(), Access::Shared);
        assert_eq!((a.access(), b.access()), (Access::Shared, Access::Shared));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter_path = path.clone();
        let waiter = std::thread::spawn(move || {
            let lock = BrokerLock::at(waiter_path, Access::Exclusive);
            tx.send(()).unwrap();
            drop(lock);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "exclusive while shared locks are held"
        );
        drop((a, b));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("exclusive once the shared locks are gone");
        waiter.join().unwrap();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{}.turnstile", path.display()));
    }
}
