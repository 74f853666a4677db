//! The conformance cases that only make sense over TLS, run by
//! [`run_tls`](super::run_tls) against the broker's TLS listener (see
//! [`crate::tls`]): typed handshake errors at first contact and after Ready,
//! EXTERNAL authentication with a client certificate, failover between a TLS
//! and a plain host. (The recovery cases of [`cases`](super::cases) run over
//! TLS too, unchanged: the harness points them at the listener.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use amqp_rebound_core::transport::Transport;
use amqp_rebound_core::{
    Client, Confirmation, ConnectError, ErrorClass, Event, Properties, Supervisor, TlsConfig,
    TlsErrorKind, TransportError,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::{
    Harness, assert_none_lost, close, delete_queues, next_event, queue_name, test_queue,
    wait_ready, within,
};
use crate::broker::{self, BrokerUrl};
use crate::capture::Capture;
use crate::proxy::FaultProxy;
use crate::tls::{EXPIRED_NAME, EXTERNAL_USER, TlsBroker};

const SECOND: Duration = Duration::from_secs(1);

/// A password no error may show.
const PASSWORD: &str = "s3cr3t-tls-pw";

fn tls_of<T>(h: &Harness<T>) -> &TlsBroker {
    h.tls
        .as_ref()
        .expect("a TLS case runs with the TLS listener")
}

/// The plain listener (`AMQP_URL`).
fn plain_url() -> BrokerUrl {
    BrokerUrl::from_env()
}

/// A seed whose host shuffle puts host 0 of `urls` first.
fn seed_keeping_first(urls: &[String]) -> u64 {
    let hosts = amqp_rebound_core::endpoint::parse_hosts(urls).expect("valid hosts");
    (0..10_000u64)
        .find(|&seed| {
            let mut config = amqp_rebound_core::Config::new(hosts.clone());
            config.seed = seed;
            Supervisor::new(config, Instant::now())
                .map(|s| *s.hosts()[0] == hosts[0])
                .unwrap_or(false)
        })
        .expect("a seed that keeps the first host first")
}

/// Builds a client for `url` with `tls` (instead of the harness's) and waits
/// for its first contact.
async fn first_contact<T: Transport>(
    h: &Harness<T>,
    url: &str,
    tls: TlsConfig,
) -> (Client, Result<(), ConnectError>, Duration) {
    let client = h.start(h.builder([url]).pool(1, 1).tls(tls));
    let start = Instant::now();
    let result = within("first contact", 15 * SECOND, client.connected()).await;
    (client, result, start.elapsed())
}

// ---------------------------------------------------------------------------
// typed errors at first contact

/// TLS case: each way a TLS setup goes wrong fails the first-contact connect
/// at once (one round of dials, well under the publish timeout) with
/// [`TransportError::Tls`] of its own [`TlsErrorKind`], classified Refused, its
/// text free of the password: an unknown CA, a name the certificate does not
/// hold, an expired certificate, a client certificate the broker refuses, TLS
/// to the plain port and plain AMQP to the TLS port.
pub async fn tls_errors_are_typed_and_fail_fast<T: Transport>(h: Harness<T>) {
    let tls = tls_of(&h);
    let secret_tls = tls.url.with_password(PASSWORD);
    let plain = plain_url();
    // amqps:// to the plain listener's port
    let tls_to_plain = BrokerUrl {
        scheme: "amqps".into(),
        ..plain.clone()
    }
    .with_password(PASSWORD);
    // amqp:// to the TLS listener's port
    let plain_to_tls = BrokerUrl {
        scheme: "amqp".into(),
        ..tls.url.clone()
    }
    .with_password(PASSWORD);
    let scenarios: Vec<(&str, String, TlsConfig, TlsErrorKind)> = vec![
        (
            "the public roots only: the test CA is unknown",
            secret_tls.clone(),
            TlsConfig::new(),
            TlsErrorKind::UnknownIssuer,
        ),
        (
            "a name the certificate does not hold",
            secret_tls.clone(),
            tls.trusting_ca()
                .server_name("mismatch.rebound.test")
                .expect("a server name"),
            TlsErrorKind::NameMismatch,
        ),
        (
            "an expired certificate",
            secret_tls.clone(),
            tls.trusting_ca()
                .server_name(EXPIRED_NAME)
                .expect("a server name"),
            TlsErrorKind::Expired,
        ),
        (
            "a client certificate from a CA the broker does not trust",
            secret_tls.clone(),
            tls.with_rogue_client_certificate(),
            TlsErrorKind::ClientCertificateRefused,
        ),
        (
            "TLS to the plain port",
            tls_to_plain,
            tls.trusting_ca(),
            TlsErrorKind::NotTlsPort,
        ),
        (
            "plain AMQP to the TLS port",
            plain_to_tls,
            tls.trusting_ca(),
            TlsErrorKind::TlsPort,
        ),
    ];
    for (what, url, config, expected) in scenarios {
        let (client, result, took) = first_contact(&h, &url, config).await;
        let error = match result {
            Err(ConnectError::Transport(error)) => error,
            other => panic!("{what}: expected a TLS error, got {other:?}"),
        };
        eprintln!("{what}: {error} (after {took:?})");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(PASSWORD), "{what}: password shown: {shown}");
        match &error {
            TransportError::Tls { kind, .. } => assert_eq!(*kind, expected, "{what}: {error}"),
            other => panic!("{what}: expected TransportError::Tls({expected:?}), got {other:?}"),
        }
        assert_eq!(error.class(), ErrorClass::Refused, "{what}");
        assert!(took < 5 * SECOND, "{what}: first contact took {took:?}");
        close(client).await;
    }
}

// ---------------------------------------------------------------------------
// EXTERNAL

/// TLS case: EXTERNAL authentication with the client certificate (no user name
/// or password in the URI): the broker logs the client in as the certificate's
/// CN, and a publish is confirmed.
pub async fn external_auth_with_a_client_certificate<T: Transport>(h: Harness<T>) {
    let tls = tls_of(&h);
    let (client, result, _) =
        first_contact(&h, &tls.external_url(), tls.with_client_certificate()).await;
    result.unwrap_or_else(|e| panic!("EXTERNAL login: {e}"));
    publish_one(&client).await;
    let prefix = h.connection_prefix();
    let listed = broker::ctl(&[
        "list_connections",
        "user",
        "ssl",
        "auth_mechanism",
        "client_properties",
    ])
    .await;
    let ours: Vec<&str> = listed.lines().filter(|l| l.contains(&prefix)).collect();
    assert!(
        !ours.is_empty()
            && ours.iter().all(|l| {
                let mut fields = l.split('\t');
                (fields.next(), fields.next(), fields.next())
                    == (Some(EXTERNAL_USER), Some("true"), Some("EXTERNAL"))
            }),
        "the broker's view of our connections: {ours:?}"
    );
    close(client).await;
}

// ---------------------------------------------------------------------------
// failover between a TLS and a plain host

/// TLS case: a host list with a TLS host and a plain one, each in turn first and
/// behind a proxy that drops the connection and starts refusing: the client
/// fails over to the other host at once, whatever its scheme, and nothing
/// confirmed is lost.
pub async fn failover_between_tls_and_plain<T: Transport>(h: Harness<T>) {
    let tls = tls_of(&h);
    let plain = plain_url();
    let name = queue_name(&h, "tls-failover");
    let mut published = 0u32;
    for tls_first in [true, false] {
        let (first, second) = if tls_first {
            (tls.url.clone(), plain.clone())
        } else {
            (plain.clone(), tls.url.clone())
        };
        let proxy = FaultProxy::start(first.socket_addr()).expect("a fault proxy");
        let urls = vec![first.at(proxy.addr()), second.url()];
        let seed = seed_keeping_first(&urls);
        let client = h.start(h.builder(&urls).seed(seed).pool(1, 1));
        wait_ready(&client, 15 * SECOND).await;
        assert_eq!(
            proxy.active(),
            1,
            "connected to the {} host first",
            first.scheme
        );
        client
            .declare_queue(test_queue(&name))
            .await
            .expect("declare");
        let payload = format!("{published}:");
        assert_eq!(
            client
                .publish("", &name, payload, Properties::default())
                .await,
            Ok(Confirmation::Confirmed)
        );
        published += 1;
        let mut events = client.watch();
        proxy.refuse(true);
        proxy.reset_all();
        let start = Instant::now();
        next_event(&mut events, "the loss", 5 * SECOND, |e| {
            matches!(e, Event::RecoveryFailed { .. })
        })
        .await;
        wait_ready(&client, 10 * SECOND).await;
        eprintln!(
            "{} -> {}: failed over in {:?}",
            first.scheme,
            second.scheme,
            start.elapsed()
        );
        assert_eq!(proxy.refused(), 0, "the next host is dialled, not the same");
        assert_eq!(proxy.active(), 0, "Ready on the {} host", second.scheme);
        let payload = format!("{published}:");
        assert_eq!(
            client
                .publish("", &name, payload, Properties::default())
                .await,
            Ok(Confirmation::Confirmed)
        );
        published += 1;
        close(client).await;
    }
    let client = h.client().await;
    let report = assert_none_lost(&h, &client, &test_queue(&name), published).await;
    assert_eq!(report.in_queue, published);
    close(client).await;
    delete_queues(&h, &[&name]).await;
}

// ---------------------------------------------------------------------------
// a TLS error after Ready

/// A TCP forwarder whose target port can be switched; switching closes the
/// connections it carries.
struct Forwarder {
    addr: SocketAddr,
    target: Arc<AtomicU16>,
    cut: Arc<Notify>,
}

impl Forwarder {
    async fn start(target: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let target = Arc::new(AtomicU16::new(target));
        let cut = Arc::new(Notify::new());
        let (to, cut_all) = (Arc::clone(&target), Arc::clone(&cut));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = to.load(Ordering::SeqCst);
                let cut = Arc::clone(&cut_all);
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Forwarder { addr, target, cut }
    }

    fn switch(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
        self.cut.notify_waiters();
    }
}

/// TLS case: a client that was Ready over TLS finds a plain port where its TLS
/// host was: every dial fails with the typed TLS error, reported each time
/// (`RecoveryFailed`, class Refused) and spaced at the backoff cap, never in a
/// hot loop; once the TLS port is back, the client is Ready again.
pub async fn tls_error_after_ready_is_reported_at_every_dial<T: Transport>(h: Harness<T>) {
    let tls = tls_of(&h);
    let plain = plain_url();
    let forwarder = Forwarder::start(tls.url.port).await;
    // 127.0.0.1 is in the broker certificate's names
    let url = tls.url.at(forwarder.addr);
    let client = h.start(h.builder([url]).pool(1, 1));
    wait_ready(&client, 15 * SECOND).await;
    let cap = h
        .builder(["amqp://x"])
        .config()
        .expect("config")
        .backoff
        .cap;
    let mut events = client.watch();
    forwarder.switch(plain.port);
    let watch_for = 3 * cap + cap / 2;
    let start = Instant::now();
    let mut failures: Vec<(Duration, Duration)> = Vec::new();
    while start.elapsed() < watch_for {
        let left = watch_for.saturating_sub(start.elapsed());
        let Ok(Some(event)) =
            tokio::time::timeout(left, futures::StreamExt::next(&mut events)).await
        else {
            continue;
        };
        if let Event::RecoveryFailed {
            error,
            class,
            retry_in,
            ..
        } = &event
        {
            let loss = failures.is_empty();
            if !loss {
                // every dial after the loss: the TLS error, typed, refused
                assert!(
                    matches!(
                        error,
                        TransportError::Tls {
                            kind: TlsErrorKind::NotTlsPort,
                            ..
                        }
                    ),
                    "dial {}: {error:?}",
                    failures.len()
                );
                assert_eq!(*class, ErrorClass::Refused);
                assert!(*retry_in >= cap / 2, "retry in {retry_in:?}, below cap / 2");
            }
            failures.push((start.elapsed(), *retry_in));
        }
    }
    eprintln!("failures (at, retry in): {failures:?}");
    // the loss, then a dial at once and one every [cap / 2, cap]
    let dials = failures.len().saturating_sub(1);
    assert!(
        (3..=8).contains(&dials),
        "{dials} failed dials in {watch_for:?} with a cap of {cap:?}: {failures:?}"
    );
    forwarder.switch(tls.url.port);
    wait_ready(&client, 2 * cap + 10 * SECOND).await;
    publish_one(&client).await;
    close(client).await;
}

// ---------------------------------------------------------------------------
// server name override, insecure switch, secrets in logs

/// TLS case: the broker reached by an address its certificate does not name
/// (127.0.0.2) fails with a name mismatch, and connects with the server name
/// overridden to one it does name (with a client certificate, whose key never
/// shows in the logs); the development-only switch that accepts any
/// certificate connects with the public roots alone, and says so in a warning.
pub async fn server_name_override_and_insecure_switch<T: Transport>(h: Harness<T>) {
    let capture = Capture::start();
    let tls = tls_of(&h);
    let unnamed = BrokerUrl {
        host: "127.0.0.2".into(),
        ..tls.url.clone()
    }
    .url();
    let (client, result, _) = first_contact(&h, &unnamed, tls.trusting_ca()).await;
    match result {
        Err(ConnectError::Transport(TransportError::Tls {
            kind: TlsErrorKind::NameMismatch,
            ..
        })) => {}
        other => panic!("127.0.0.2 is not in the certificate: {other:?}"),
    }
    close(client).await;

    let overridden = tls
        .with_client_certificate()
        .server_name("localhost")
        .expect("a server name");
    let (client, result, _) = first_contact(&h, &unnamed, overridden).await;
    result.unwrap_or_else(|e| panic!("with the server name overridden: {e}"));
    publish_one(&client).await;
    close(client).await;

    let insecure = TlsConfig::new().danger_accept_invalid_certs(true);
    let (client, result, _) = first_contact(&h, &tls.url.url(), insecure).await;
    result.unwrap_or_else(|e| panic!("with any certificate accepted: {e}"));
    publish_one(&client).await;
    close(client).await;

    let logged = capture.output();
    assert!(
        logged.contains("certificate verification is off"),
        "no warning for the insecure switch"
    );
    let key = String::from_utf8(tls.pem("client.key")).expect("PEM is text");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logged.contains(line), "the client key was logged");
    }
}

async fn publish_one(client: &Client) {
    wait_ready(client, 10 * SECOND).await;
    let queue = client
        .declare_queue(amqp_rebound_core::QueueDecl::server_named())
        .await
        .expect("declare");
    assert_eq!(
        client
            .publish("", &queue.name(), "0:", Properties::default())
            .await,
        Ok(Confirmation::Confirmed)
    );
}
