//! [`FaultProxy`]: a TCP proxy between a client and the broker that injects
//! network faults on command.
//!
//! It listens on `127.0.0.1:0` and forwards every accepted connection to one
//! upstream address. Faults:
//!
//! - [`reset_all`](FaultProxy::reset_all): every connection open now is closed
//!   with a TCP reset, both ways (the client sees `ECONNRESET`, the broker an
//!   abrupt close);
//! - [`blackhole_existing`](FaultProxy::blackhole_existing): the connections open
//!   now stop forwarding in both directions without closing — what a dead link or
//!   a dropped NAT entry looks like; only heartbeats can notice it. New
//!   connections are not affected;
//! - [`blackhole_all`](FaultProxy::blackhole_all): a partition: nothing is
//!   forwarded on any connection, old or new, until it is lifted; the data held
//!   back is then delivered;
//! - [`refuse`](FaultProxy::refuse) / [`refuse_for`](FaultProxy::refuse_for): new
//!   connections are accepted and closed at once;
//! - counters: [`accepted`](FaultProxy::accepted) (every accepted socket,
//!   refused ones included), [`refused`](FaultProxy::refused),
//!   [`active`](FaultProxy::active).
//!
//! It runs on a thread of its own (a current-thread tokio runtime), so it works
//! under any test runtime and keeps working while the test's runtime is busy. It is
//! bounded: at most [`MAX_CONNECTIONS`] connections at once (the others are
//! refused), a 16 KiB buffer per direction, a 5 s upstream connect timeout. Dropping
//! the proxy stops it: the listener and every connection close, and the thread is
//! joined.
//!
//! ```no_run
//! use amqp_rebound_tests::proxy::FaultProxy;
//!
//! let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
//! let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
//! // ... connect a client to `url`, then:
//! proxy.reset_all();
//! assert_eq!(proxy.active(), 0);
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Connections the proxy carries at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;

const BUFFER: usize = 16 * 1024;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What every connection task watches.
#[derive(Debug, Clone, Default)]
struct Control {
    /// Connections with an id below this are reset.
    reset_below: u64,
    /// Connections with an id below this forward nothing.
    blackhole_below: u64,
    /// Nothing is forwarded on any connection.
    blackhole_all: bool,
    /// The proxy is being dropped.
    shutdown: bool,
}

impl Control {
    fn is_reset(&self, id: u64) -> bool {
        id < self.reset_below
    }

    fn is_blackholed(&self, id: u64) -> bool {
        self.blackhole_all || id < self.blackhole_below
    }
}

#[derive(Debug, Default)]
struct Counters {
    next_id: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicUsize,
    /// `None`: accept; `Some(t)`: refuse until `t`.
    refuse_until: Mutex<Option<Instant>>,
}

impl Counters {
    fn refusing(&self) -> bool {
        let mut until = self
            .refuse_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    counters: Arc<Counters>,
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
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            accept_loop(listener, upstream, control_rx, thread_counters).await
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
            counters,
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

    /// Closes every connection open now with a TCP reset, both ways.
    pub fn reset_all(&self) {
        let below = self.counters.next_id.load(Ordering::SeqCst);
        self.control.send_modify(|c| c.reset_below = below);
    }

    /// The connections open now stop forwarding, both ways, without closing.
    /// Connections accepted afterwards work.
    pub fn blackhole_existing(&self) {
        let below = self.counters.next_id.load(Ordering::SeqCst);
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
        *self
            .counters
            .refuse_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = until;
    }

    /// Refuses new connections for `duration`, then accepts them again.
    pub fn refuse_for(&self, duration: Duration) {
        *self
            .counters
            .refuse_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now() + duration);
    }

    /// Sockets accepted so far, refused ones included: the number of dials.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Sockets closed at once because the proxy was refusing (or full).
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::SeqCst)
    }

    /// Connections being forwarded now.
    pub fn active(&self) -> usize {
        self.counters.active.load(Ordering::SeqCst)
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
    counters: Arc<Counters>,
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
                let id = counters.next_id.fetch_add(1, Ordering::SeqCst);
                counters.accepted.fetch_add(1, Ordering::SeqCst);
                if counters.refusing() || counters.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    counters.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                counters.active.fetch_add(1, Ordering::SeqCst);
                let control = control.clone();
                let counters = Arc::clone(&counters);
                tokio::spawn(async move {
                    serve(id, client, upstream, control).await;
                    counters.active.fetch_sub(1, Ordering::SeqCst);
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
) {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut upstream = match connect.await {
        Ok(Ok(stream)) => stream,
        _ => return, // the client sees the proxy close: like a refused dial
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let reset = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        tokio::select! {
            _ = forward(client_read, upstream_write, id, control.clone()) => false,
            _ = forward(upstream_read, client_write, id, control.clone()) => false,
            reset = until_reset(id, control) => reset,
        }
    };
    if reset {
        // SO_LINGER 0: closing sends RST instead of FIN.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Resolves `true` when this connection is to be reset, `false` on shutdown.
async fn until_reset(id: u64, mut control: watch::Receiver<Control>) -> bool {
    loop {
        {
            let c = control.borrow_and_update();
            if c.is_reset(id) {
                return true;
            }
            if c.shutdown {
                return false;
            }
        }
        if control.changed().await.is_err() {
            return false;
        }
    }
}

/// Copies `from` to `to` until EOF or an error, holding data back while the
/// connection is blackholed.
async fn forward(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    id: u64,
    mut control: watch::Receiver<Control>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        open(id, &mut control).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        // a blackhole that started during the read holds this data back too
        open(id, &mut control).await;
        to.write_all(&buf[..n]).await?;
    }
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
