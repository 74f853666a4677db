//! [`FaultProxy`]: a TCP proxy between a client and a real broker that injects
//! network faults on command (feature `proxy`). `rebound-chaos` runs its
//! real-broker mode through it, and `amqp-rebound-tests` its conformance and
//! adapter suites.
//!
//! It listens on `127.0.0.1:0` and forwards every accepted connection to one
//! upstream address. Connections are numbered in the order they were accepted.
//! Faults:
//!
//! - [`reset_all`](FaultProxy::reset_all) / [`reset`](FaultProxy::reset): every
//!   connection open now, or one of them, is closed with a TCP reset, both ways
//!   (the client sees `ECONNRESET`, the broker an abrupt close);
//! - [`close_all`](FaultProxy::close_all) / [`close`](FaultProxy::close): the same
//!   with an orderly close (FIN) instead of a reset;
//! - [`blackhole_existing`](FaultProxy::blackhole_existing): the connections open
//!   now stop forwarding in both directions without closing — what a dead link or
//!   a dropped NAT entry looks like; only heartbeats can notice it. New
//!   connections are not affected;
//! - [`blackhole_all`](FaultProxy::blackhole_all): a partition: nothing is
//!   forwarded on any connection, old or new, until it is lifted; the data held
//!   back is then delivered;
//! - [`refuse`](FaultProxy::refuse) / [`refuse_for`](FaultProxy::refuse_for): new
//!   connections are accepted and closed at once;
//! - [`inject`](FaultProxy::inject): bytes sent to the clients as if the broker had
//!   sent them (AMQP frames of the test's own, such as
//!   [`connection_method`](FaultProxy::connection_method)'s `connection.blocked`);
//! - counters: [`accepted`](FaultProxy::accepted) (every accepted socket,
//!   refused ones included), [`refused`](FaultProxy::refused),
//!   [`active`](FaultProxy::active), and the numbers of the connections open now,
//!   [`open`](FaultProxy::open).
//!
//! It runs on a thread of its own (a current-thread tokio runtime), so it works
//! under any runtime (or none) and keeps working while the caller's runtime is
//! busy. It is bounded: at most [`MAX_CONNECTIONS`] connections at once (the
//! others are refused), a 16 KiB buffer per direction, a 5 s upstream connect
//! timeout. Dropping the proxy stops it: the listener and every connection close,
//! and the thread is joined.
//!
//! ```no_run
//! use amqp_rebound_sim::proxy::FaultProxy;
//!
//! let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
//! let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
//! // ... connect a client to `url`, then:
//! proxy.reset_all();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amqp_rebound_core::transport::support::lock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Connections the proxy carries at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;

const BUFFER: usize = 16 * 1024;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection is to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A TCP reset, both ways.
    Reset,
    /// An orderly close, both ways.
    Close,
    /// The proxy is being dropped.
    Shutdown,
}

/// What every connection task watches.
#[derive(Debug, Clone, Default)]
struct Control {
    /// Connections with a number below this are reset.
    reset_below: u64,
    /// Connections with a number below this are closed.
    close_below: u64,
    /// Single connections to reset or close.
    ending: BTreeMap<u64, End>,
    /// Connections with a number below this forward nothing.
    blackhole_below: u64,
    /// Nothing is forwarded on any connection.
    blackhole_all: bool,
    /// The proxy is being dropped.
    shutdown: bool,
}

impl Control {
    fn end(&self, id: u64) -> Option<End> {
        if self.shutdown {
            Some(End::Shutdown)
        } else if id < self.reset_below {
            Some(End::Reset)
        } else if id < self.close_below {
            Some(End::Close)
        } else {
            self.ending.get(&id).copied()
        }
    }

    fn is_blackholed(&self, id: u64) -> bool {
        self.blackhole_all || id < self.blackhole_below
    }
}

#[derive(Debug, Default)]
struct Shared {
    next_id: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicUsize,
    /// `None`: accept; `Some(t)`: refuse until `t`.
    refuse_until: Mutex<Option<Instant>>,
    /// The connections being forwarded, each with its way in for injected bytes.
    open: Mutex<BTreeMap<u64, mpsc::UnboundedSender<Vec<u8>>>>,
}

impl Shared {
    fn refusing(&self) -> bool {
        let mut until = lock(&self.refuse_until);
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }
}

/// A TCP proxy in front of one upstream address, with fault injection. See the
/// [module docs](self).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (control, control_rx) = watch::channel(Control::default());
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            accept_loop(listener, upstream, control_rx, thread_shared).await
                        }
                        Err(error) => eprintln!("fault proxy: cannot listen: {error}"),
                    }
                });
                // Dropping the runtime here drops every connection task, which
                // closes their sockets.
            })?;
        Ok(FaultProxy {
            addr,
            upstream,
            control,
            shared,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every connection open now with a TCP reset, both ways; returns how
    /// many were open.
    pub fn reset_all(&self) -> usize {
        let below = self.shared.next_id.load(Ordering::SeqCst);
        // counted before the signal: an ended connection leaves `open` at once
        let open = self.open().range(..below).count();
        self.control.send_modify(|c| c.reset_below = below);
        open
    }

    /// Closes every connection open now in order (FIN), both ways; returns how
    /// many were open.
    pub fn close_all(&self) -> usize {
        let below = self.shared.next_id.load(Ordering::SeqCst);
        // counted before the signal: an ended connection leaves `open` at once
        let open = self.open().range(..below).count();
        self.control.send_modify(|c| c.close_below = below);
        open
    }

    /// Closes the `pick`-th open connection (modulo how many are open) with a TCP
    /// reset, both ways; returns its number, or `None` if none is open.
    pub fn reset(&self, pick: usize) -> Option<u64> {
        self.end_one(pick, End::Reset)
    }

    /// Closes the `pick`-th open connection (modulo how many are open) in order
    /// (FIN), both ways; returns its number, or `None` if none is open.
    pub fn close(&self, pick: usize) -> Option<u64> {
        self.end_one(pick, End::Close)
    }

    fn end_one(&self, pick: usize, end: End) -> Option<u64> {
        let open = self.open();
        let id = *open.iter().nth(pick % open.len().max(1))?;
        self.control.send_modify(|c| {
            c.ending.insert(id, end);
        });
        Some(id)
    }

    /// The connections open now stop forwarding, both ways, without closing.
    /// Connections accepted afterwards work.
    pub fn blackhole_existing(&self) {
        let below = self.shared.next_id.load(Ordering::SeqCst);
        self.control.send_modify(|c| c.blackhole_below = below);
    }

    /// While `on`, no connection forwards anything (new ones included); when lifted,
    /// the held-back data flows again (connections blackholed by
    /// [`blackhole_existing`](Self::blackhole_existing) stay silent).
    pub fn blackhole_all(&self, on: bool) {
        self.control.send_modify(|c| c.blackhole_all = on);
    }

    /// While `on`, new connections are accepted and closed at once.
    pub fn refuse(&self, on: bool) {
        let until = on.then(|| Instant::now() + Duration::from_secs(24 * 3600));
        *lock(&self.shared.refuse_until) = until;
    }

    /// Refuses new connections for `duration`, then accepts them again.
    pub fn refuse_for(&self, duration: Duration) {
        *lock(&self.shared.refuse_until) = Some(Instant::now() + duration);
    }

    /// Sends `bytes` to the client of every connection open now, as if the broker
    /// had sent them; returns how many connections got them. They go between two
    /// reads from the broker, so a whole frame is only safe while the broker is
    /// idle. A blackholed connection holds them back too.
    pub fn inject(&self, bytes: &[u8]) -> usize {
        lock(&self.shared.open)
            .values()
            .filter(|inject| inject.send(bytes.to_vec()).is_ok())
            .count()
    }

    /// An AMQP connection-class method frame on channel 0 with its encoded
    /// `arguments`, for [`inject`](Self::inject): `connection.blocked` is method
    /// 60 (its argument a short string, the reason), `connection.unblocked` 61.
    pub fn connection_method(method: u16, arguments: &[u8]) -> Vec<u8> {
        let mut payload = Vec::with_capacity(4 + arguments.len());
        payload.extend_from_slice(&10u16.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(arguments);
        let mut frame = vec![1u8, 0, 0];
        let size = u32::try_from(payload.len()).expect("a method frame under 4 GiB");
        frame.extend_from_slice(&size.to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        frame
    }

    /// Sockets accepted so far, refused ones included: the number of dials.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Sockets closed at once because the proxy was refusing (or full).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections being forwarded now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The numbers of the connections forwarded now (connected upstream), in the
    /// order they were accepted.
    pub fn open(&self) -> BTreeSet<u64> {
        lock(&self.shared.open).keys().copied().collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.control.send_modify(|c| c.shutdown = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    shared: Arc<Shared>,
) {
    loop {
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() || control.borrow().shutdown {
                    return;
                }
            }
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // EMFILE and the like: back off a little instead of spinning
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.refusing() || shared.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                shared.active.fetch_add(1, Ordering::SeqCst);
                let control = control.clone();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    serve(id, client, upstream, control, &shared).await;
                    lock(&shared.open).remove(&id);
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
}

async fn serve(
    id: u64,
    mut client: TcpStream,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    shared: &Shared,
) {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut upstream = match connect.await {
        Ok(Ok(stream)) => stream,
        _ => return, // the client sees the proxy close: like a refused dial
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (inject, injected) = mpsc::unbounded_channel();
    lock(&shared.open).insert(id, inject);
    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        tokio::select! {
            _ = forward(client_read, upstream_write, id, control.clone(), None) => None,
            _ = forward(upstream_read, client_write, id, control.clone(), Some(injected)) => None,
            end = until_ended(id, control) => Some(end),
        }
    };
    if end == Some(End::Reset) {
        // SO_LINGER 0: closing sends RST instead of FIN.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Resolves when this connection is to end, and how.
async fn until_ended(id: u64, mut control: watch::Receiver<Control>) -> End {
    loop {
        if let Some(end) = control.borrow_and_update().end(id) {
            return end;
        }
        if control.changed().await.is_err() {
            return End::Shutdown;
        }
    }
}

/// Copies `from` to `to` until EOF or an error, holding data back while the
/// connection is blackholed, and writing what comes through `injected` between
/// two reads.
async fn forward(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    id: u64,
    mut control: watch::Receiver<Control>,
    mut injected: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        open(id, &mut control).await;
        let extra = async {
            match injected.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let data = tokio::select! {
            read = from.read(&mut buf) => match read? {
                0 => return Ok(()),
                n => Data::Read(n),
            },
            Some(bytes) = extra => Data::Injected(bytes),
        };
        // a blackhole that started during the read holds this data back too
        open(id, &mut control).await;
        match data {
            Data::Read(n) => to.write_all(&buf[..n]).await?,
            Data::Injected(bytes) => to.write_all(&bytes).await?,
        }
    }
}

enum Data {
    Read(usize),
    Injected(Vec<u8>),
}

/// Waits while the connection is blackholed.
async fn open(id: u64, control: &mut watch::Receiver<Control>) {
    loop {
        if !control.borrow_and_update().is_blackholed(id) {
            return;
        }
        if control.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
