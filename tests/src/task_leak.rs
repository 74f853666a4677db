//! Failed dials leave no tokio tasks behind: during an outage the client dials
//! again and again, so anything a failed dial leaves alive grows for as long as the
//! outage lasts. [`task_leak_suite!`](crate::task_leak_suite) makes the cases
//! `#[test]`s for a transport.
//!
//! Against a real RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): a broker that cannot be reached fails
//! the cases, never skips them. Each case has a runtime of its own, so the counts
//! of one do not see the tasks of another. Each case fails its dials at one stage:
//! the TCP connect, the TLS handshake or the AMQP login.

use std::time::{Duration, Instant};

use amqp_rebound_core::transport::{ConnectOptions, Transport};
use amqp_rebound_core::{Endpoint, TlsErrorKind, TransportError};
use futures::stream::{self, StreamExt};

use crate::broker::{Access, BrokerLock, BrokerUrl, broker_reachable};

/// Failed dials per test.
const DIALS: usize = 50;
/// Dials in flight at once: RabbitMQ holds a refused login for 3 s before it closes
/// the socket when the client does not advertise `authentication_failure_close`
/// (amqprs does not; lapin does).
const AT_ONCE: usize = 10;
/// Tasks above the baseline still tolerated once [`DEADLINE`] has passed after the
/// last dial: a constant, never one per dial.
const SLACK: usize = 2;
/// How long any single dial, and the return to the baseline, may take.
const DEADLINE: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .and_then(|list| list.split(',').next().map(str::to_owned))
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's endpoint, with a shared hold on the broker lock (see `broker.rs`).
/// Panics if the broker cannot be reached: a dial failing for that reason would
/// pass for the failure a test means to cause.
fn endpoint() -> Endpoint {
    static SHARED: std::sync::OnceLock<BrokerLock> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| BrokerLock::acquire(Access::Shared));
    let broker = BrokerUrl::from_env();
    assert!(
        broker_reachable(&broker),
        "no broker at {}: these tests need one",
        broker.authority()
    );
    Endpoint::parse(&url()).expect("AMQP_URL is a valid AMQP URI")
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Dials `endpoint` [`DIALS`] times, [`AT_ONCE`] at a time, checking each failure
/// with `expected`; then waits, up to [`DEADLINE`], for the runtime's alive tasks
/// to come back to what they were before the first dial, and fails if they stay
/// more than [`SLACK`] above it.
async fn dials_leave_no_tasks<T: Transport>(
    transport: T,
    endpoint: &Endpoint,
    expected: fn(&TransportError) -> bool,
) {
    let options = ConnectOptions::default();
    let baseline = alive_tasks();
    stream::iter(0..DIALS)
        .map(|dial| {
            let connect = transport.connect(endpoint, &options);
            async move {
                match tokio::time::timeout(DEADLINE, connect).await {
                    Err(_) => panic!("dial {dial} did not fail within {DEADLINE:?}"),
                    Ok(Ok(_)) => panic!("dial {dial} to {endpoint} succeeded"),
                    Ok(Err(error)) => assert!(expected(&error), "dial {dial}: got {error:?}"),
                }
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect::<()>()
        .await;
    let deadline = Instant::now() + DEADLINE;
    let mut alive = alive_tasks();
    while alive > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        alive = alive_tasks();
    }
    eprintln!("alive tasks: {baseline} before {DIALS} failed dials, {alive} after");
    assert!(
        alive <= baseline + SLACK,
        "{alive} tasks alive {DEADLINE:?} after {DIALS} failed dials, {baseline} before"
    );
}

/// Dials to a port nothing listens on: the TCP connect is refused.
pub async fn refused_dials_leave_no_tasks<T: Transport>(transport: T) {
    // Port 1: nothing listens there, so the TCP connect is refused.
    let refused = Endpoint::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
    dials_leave_no_tasks(transport, &refused, |e| matches!(e, TransportError::Io(_))).await;
}

/// Dials with a wrong password: the broker refuses the login.
pub async fn refused_logins_leave_no_tasks<T: Transport>(transport: T) {
    let ep = endpoint();
    let userinfo = format!("{}:{}@", ep.username(), ep.password());
    let url = url();
    assert!(
        url.contains(&userinfo),
        "AMQP_URL must spell out user and password"
    );
    let wrong = format!("{}:wrong-{:x}@", ep.username(), fastrand::u64(..));
    let wrong = Endpoint::parse(&url.replacen(&userinfo, &wrong, 1)).unwrap();
    dials_leave_no_tasks(transport, &wrong, |e| {
        matches!(e, TransportError::Auth(_)) || e.reply_code() == Some(403)
    })
    .await;
}

/// TLS dials to the plain AMQP port: the handshake fails.
pub async fn failed_tls_handshakes_leave_no_tasks<T: Transport>(transport: T) {
    // TLS to the broker's plain AMQP port: the TCP connect succeeds, the TLS
    // handshake fails.
    let ep = endpoint();
    let host = if ep.host().contains(':') {
        format!("[{}]", ep.host())
    } else {
        ep.host().to_owned()
    };
    let tls = Endpoint::parse(&format!("amqps://guest:guest@{host}:{}/%2f", ep.port())).unwrap();
    dials_leave_no_tasks(transport, &tls, |e| {
        matches!(
            e,
            TransportError::Tls {
                kind: TlsErrorKind::NotTlsPort,
                ..
            }
        )
    })
    .await;
}

/// The task-leak cases as `#[tokio::test]`s over `$transport` (an expression
/// making a fresh transport).
///
/// ```ignore
/// amqp_rebound_tests::task_leak_suite!(amqp_rebound_lapin::LapinTransport::new());
/// ```
#[macro_export]
macro_rules! task_leak_suite {
    ($transport:expr $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn refused_dials_leave_no_tasks() {
            $crate::task_leak::refused_dials_leave_no_tasks($transport).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn refused_logins_leave_no_tasks() {
            $crate::task_leak::refused_logins_leave_no_tasks($transport).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failed_tls_handshakes_leave_no_tasks() {
            $crate::task_leak::failed_tls_handshakes_leave_no_tasks($transport).await;
        }
    };
}
