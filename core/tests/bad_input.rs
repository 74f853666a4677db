//! Nothing a user passes makes the library panic or stall: arbitrary URIs,
//! durations, counts, names and property values, through the builder, the
//! client and the driver (over the in-memory transport, in virtual time). Every
//! call ends with a value or a typed error, and the password never shows.
//!
//! The proptest RNG is seeded: `REBOUND_SEED=<n>` replays a run.

mod support;

use std::time::Duration;

use amqp_rebound_core::endpoint::{Endpoint, redact};
use amqp_rebound_core::message::AMQPValue;
use amqp_rebound_core::{
    BackoffConfig, Client, FieldTable, Jitter, Message, Properties, PublishOptions, QueueDecl,
};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngSeed};
use support::{ManualClock, MemoryTransport, drive};

const PW: &str = "s3cr3t-pw";

/// How many generated configurations the builder accepted (the property must
/// reach the driver often, not just the builder's refusals).
static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn proptest_config(cases: u32) -> PtConfig {
    let seed = std::env::var("REBOUND_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xbad_1200);
    eprintln!("proptest seed: REBOUND_SEED={seed}");
    PtConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..PtConfig::default()
    }
}

/// Any duration, the extremes (zero, `Duration::MAX`) included often.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        1 => Just(Duration::ZERO),
        3 => Just(Duration::MAX),
        2 => Just(Duration::from_nanos(1)),
        2 => (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        4 => (1u64..100_000).prop_map(Duration::from_millis),
    ]
}

/// Strings around the wire's limits: empty, 255, 256 bytes, multi-byte, any.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("x".repeat(255)),
        Just("x".repeat(256)),
        Just("é".repeat(128)),
        ".{0,300}",
    ]
}

/// URIs that are almost right: a valid one with pieces replaced by junk.
fn uri() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("amqp"), Just("amqps"), Just("http"), Just("")],
        prop_oneof![
            Just(format!("guest:{PW}@")),
            Just(String::new()),
            ".{0,20}@"
        ],
        prop_oneof![
            Just("127.0.0.1".to_string()),
            Just("[::1]".to_string()),
            "[a-z0-9.%_-]{0,70}"
        ],
        prop_oneof![
            Just(":5672".to_string()),
            Just(String::new()),
            ":[0-9]{0,7}",
            ":.{0,5}"
        ],
        prop_oneof![
            Just("/%2f".to_string()),
            "/.{0,300}",
            Just("/%zz".to_string())
        ],
        prop_oneof![
            Just(String::new()),
            "\\?[a-z_]{1,20}=.{0,20}",
            Just("?heartbeat=99999".to_string())
        ],
    )
        .prop_map(|(scheme, user, host, port, vhost, query)| {
            format!("{scheme}://{user}{host}{port}{vhost}{query}")
        })
}

fn headers() -> impl Strategy<Value = Option<FieldTable>> {
    proptest::option::of(
        proptest::collection::vec(
            (
                text(),
                prop_oneof![
                    text().prop_map(|t| AMQPValue::LongString(t.into())),
                    proptest::collection::vec(any::<u8>(), 0..8)
                        .prop_map(|b| AMQPValue::LongString(b.into())),
                    any::<i64>().prop_map(AMQPValue::LongLongInt),
                    Just(AMQPValue::ShortString("s".into())),
                ],
            ),
            0..4,
        )
        .prop_map(|pairs| {
            let mut table = FieldTable::default();
            for (k, v) in pairs {
                // a key past 255 bytes cannot even be built: ShortString panics
                // in amq-protocol; keys are checked where they can exist
                if k.len() <= 255 {
                    table.insert(k.as_str().into(), v);
                }
            }
            table
        }),
    )
}

fn properties() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<u8>()),
        headers(),
    )
        .prop_map(
            |(message_id, content_type, reply_to, expiration, app_id, priority, headers)| {
                let mut p = Properties::default();
                p.message_id = message_id;
                p.content_type = content_type;
                p.reply_to = reply_to;
                p.expiration = expiration;
                p.app_id = app_id;
                p.priority = priority;
                p.headers = headers;
                p
            },
        )
}

#[derive(Debug, Clone)]
struct Settings {
    connections: usize,
    channels: usize,
    window: usize,
    capacity: usize,
    publish_timeout: Duration,
    connect_timeout: Duration,
    close_timeout: Duration,
    backoff: BackoffConfig,
}

fn settings() -> impl Strategy<Value = Settings> {
    // mostly values the builder accepts, so most cases reach the driver
    let count = |valid: std::ops::RangeInclusive<usize>| prop_oneof![12 => valid, 1 => Just(0usize), 1 => Just(70_000), 1 => Just(usize::MAX)];
    (
        (
            count(1..=3),
            count(1..=8),
            count(1..=2048),
            count(1..=20_000),
        ),
        (duration(), duration(), duration()),
        (
            duration(),
            prop_oneof![3 => Just(Duration::MAX), 1 => duration()],
            prop_oneof![12 => Just(2.0), 1 => Just(f64::NAN), 1 => Just(0.5), 1 => Just(f64::MAX)],
        ),
    )
        .prop_map(
            |(
                (connections, channels, window, capacity),
                (publish, connect, close),
                (initial, cap, m),
            )| {
                Settings {
                    connections,
                    channels,
                    window,
                    capacity,
                    publish_timeout: publish,
                    connect_timeout: connect,
                    close_timeout: close,
                    backoff: BackoffConfig {
                        initial,
                        cap,
                        multiplier: m,
                        jitter: Jitter::Full,
                        ..BackoffConfig::default()
                    },
                }
            },
        )
}

proptest! {
    #![proptest_config(proptest_config(2000))]

    /// Any URI: parsed or refused with a typed error; neither shows the password.
    #[test]
    fn any_uri_parses_or_is_refused_without_the_password(uri in uri()) {
        let shown = match Endpoint::parse(&uri) {
            Ok(ep) => format!("{ep} {ep:?} {}", ep.redacted()),
            Err(e) => format!("{e} {e:?}"),
        };
        prop_assert!(!shown.contains(PW), "{uri}: {shown}");
        prop_assert!(!redact(&uri).contains(PW), "{uri}");
    }

    /// Any property values: valid, or refused naming the field; never a panic.
    #[test]
    fn any_properties_are_valid_or_refused(p in properties()) {
        let _ = p.validate();
    }
}

proptest! {
    #![proptest_config(proptest_config(300))]

    /// Any settings, names and properties through the whole client: the builder
    /// refuses or builds; a built client publishes, declares and closes, every
    /// future resolving, in bounded virtual time.
    #[test]
    fn any_settings_and_messages_resolve_without_panicking(
        s in settings(),
        exchange in text(),
        routing_key in text(),
        queue in text(),
        props in properties(),
        per_publish in duration(),
    ) {
        let transport = MemoryTransport::default();
        let clock = ManualClock::new();
        let built = Client::builder()
            .hosts([format!("amqp://guest:{PW}@127.0.0.1:5672/%2f")])
            .pool(s.connections, s.channels)
            .confirm_window(s.window)
            .outbox_capacity(s.capacity)
            .publish_timeout(s.publish_timeout)
            .connect_timeout(s.connect_timeout)
            .close_timeout(s.close_timeout)
            .backoff(s.backoff.clone())
            .seed(7)
            .build(transport.clone(), clock.clone());
        let (client, driver) = match built {
            Ok(pair) => {
                BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pair
            }
            Err(e) => {
                let shown = format!("{e} {e:?}");
                prop_assert!(!shown.contains(PW), "{}", shown);
                return Ok(());
            }
        };
        let mut pool = LocalPool::new();
        pool.spawner().spawn_local(driver).expect("spawn");
        let results = std::rc::Rc::new(std::cell::RefCell::new(0usize));
        let futures = [
            client.publish_message(
                Message::new(exchange.as_str(), routing_key.as_str(), b"x".to_vec())
                    .with_properties(props.clone()),
                PublishOptions::default(),
            ),
            client.publish_message(
                Message::new("", queue.as_str(), b"y".to_vec()).with_properties(props),
                PublishOptions::default().timeout(per_publish),
            ),
            // a valid one, so the extreme settings meet the whole publish path
            client.publish_message(
                Message::new("", "q", b"z".to_vec()),
                PublishOptions::default(),
            ),
        ];
        for f in futures {
            let results = std::rc::Rc::clone(&results);
            pool.spawner()
                .spawn_local(async move {
                    let _ = f.await;
                    *results.borrow_mut() += 1;
                })
                .expect("spawn");
        }
        {
            let client = client.clone();
            let results = std::rc::Rc::clone(&results);
            pool.spawner()
                .spawn_local(async move {
                    let _ = client.declare_queue(QueueDecl::durable(queue.as_str())).await;
                    *results.borrow_mut() += 1;
                })
                .expect("spawn");
        }
        drive(&mut pool, &clock, Duration::from_secs(5), || *results.borrow() == 4);
        // the close is bounded by the close timeout even when nothing drains
        let closed = std::rc::Rc::new(std::cell::RefCell::new(false));
        {
            let (client, closed) = (client.clone(), std::rc::Rc::clone(&closed));
            pool.spawner()
                .spawn_local(async move {
                    client.close_discarding().await;
                    *closed.borrow_mut() = true;
                })
                .expect("spawn");
        }
        let done = drive(&mut pool, &clock, Duration::from_secs(3600), || {
            *closed.borrow() && *results.borrow() == 4
        });
        prop_assert!(done, "not every call resolved: {} of 4, closed {}", results.borrow(), closed.borrow());
    }
}

#[test]
fn most_generated_settings_reach_the_driver() {
    any_settings_and_messages_resolve_without_panicking();
    let built = BUILT.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{built} of 300 configurations built");
    assert!(
        built >= 30,
        "only {built} of 300 configurations reached the driver"
    );
}

/// A table nested `depth` deep (the headers themselves are depth 1).
fn nested(depth: usize) -> FieldTable {
    let mut table = FieldTable::default();
    for _ in 1..depth {
        let mut outer = FieldTable::default();
        outer.insert("n".into(), AMQPValue::FieldTable(table));
        table = outer;
    }
    table
}

fn with_header(value: AMQPValue) -> Properties {
    let mut headers = FieldTable::default();
    headers.insert("h".into(), value);
    Properties::default().with_headers(headers)
}

/// What RabbitMQ answers with the loss of a channel or a connection (and what
/// crashes clients reading it back) is refused at the call, naming the field;
/// the values just inside each limit pass.
#[test]
fn what_the_broker_or_its_consumers_cannot_take_is_refused_at_the_call() {
    let refused = |p: Properties, names: &str| {
        let error = p.validate().expect_err(names);
        assert!(error.contains(names), "{error:?} should name {names}");
    };
    for mode in [0u8, 3, 255] {
        refused(
            Properties::default().with_delivery_mode(mode),
            "delivery_mode",
        );
    }
    for mode in [1u8, 2] {
        assert_eq!(
            Properties::default().with_delivery_mode(mode).validate(),
            Ok(())
        );
    }
    let mut p = Properties::default();
    p.expiration = Some("4294967295".into());
    assert_eq!(p.validate(), Ok(()));
    for too_long in ["4294967296", "18446744073709551615", "99999999999999999999"] {
        p.expiration = Some(too_long.into());
        refused(p.clone(), "expiration");
    }
    for value in [
        AMQPValue::Float(f32::NAN),
        AMQPValue::Float(f32::INFINITY),
        AMQPValue::Double(f64::NAN),
        AMQPValue::Double(f64::NEG_INFINITY),
    ] {
        refused(with_header(value), "headers.h");
    }
    assert_eq!(with_header(AMQPValue::Double(1.5)).validate(), Ok(()));
    // nesting: at the limit, one past it, and far past it (no stack overflow
    // in the check)
    assert_eq!(
        Properties::default()
            .with_headers(nested(amqp_rebound_core::message::HEADERS_DEPTH_MAX))
            .validate(),
        Ok(())
    );
    for depth in [amqp_rebound_core::message::HEADERS_DEPTH_MAX + 1, 1000] {
        refused(Properties::default().with_headers(nested(depth)), "deep");
    }
    let mut array = AMQPValue::FieldArray(vec![].into());
    for _ in 0..1000 {
        array = AMQPValue::FieldArray(vec![array].into());
    }
    refused(with_header(array), "deep");
    // one content-header frame: 128 KiB by default
    assert_eq!(
        with_header(AMQPValue::LongString(vec![b'x'; 100_000].into())).validate(),
        Ok(())
    );
    refused(
        with_header(AMQPValue::LongString(vec![b'x'; 140_000].into())),
        "frame",
    );
    let mut many = FieldTable::default();
    for i in 0..20_000 {
        many.insert(
            format!("header-{i}").as_str().into(),
            AMQPValue::Boolean(true),
        );
    }
    refused(Properties::default().with_headers(many), "frame");
}

/// The frame a URI asks for bounds the properties too, at the call.
#[test]
fn properties_that_outgrow_the_uris_frame_max_fail_at_the_call() {
    let mut pool = LocalPool::new();
    let clock = ManualClock::new();
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=4096"])
        .build(MemoryTransport::default(), clock.clone())
        .expect("config");
    pool.spawner().spawn_local(driver).expect("spawn");
    let big = with_header(AMQPValue::LongString(vec![b'x'; 5_000].into()));
    let small = with_header(AMQPValue::LongString(vec![b'x'; 1_000].into()));
    let results = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    for p in [big, small] {
        let future = client.publish("", "q", "x", p);
        let results = std::rc::Rc::clone(&results);
        pool.spawner()
            .spawn_local(async move {
                let result = future.await;
                results.borrow_mut().push(result);
            })
            .expect("spawn");
    }
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || results
        .borrow()
        .len()
        == 2));
    let results = results.borrow();
    assert!(
        results.iter().any(|r| matches!(r, Err(amqp_rebound_core::PublishError::Invalid(e)) if e.contains("frame_max 4096"))),
        "{results:?}"
    );
    assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
}

/// A connection name past what the broker reads before tuning is refused by
/// `build`, not left to fail every dial without a word.
#[test]
fn a_connection_name_past_the_limit_is_refused_at_build() {
    use amqp_rebound_core::ConfigError;
    use amqp_rebound_core::config::MAX_CONNECTION_NAME;
    let named = |len: usize| {
        Client::builder()
            .hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"])
            .connection_name("n".repeat(len))
            .config()
    };
    assert!(named(MAX_CONNECTION_NAME).is_ok());
    assert_eq!(
        named(MAX_CONNECTION_NAME + 1).err(),
        Some(ConfigError::ConnectionNameTooLong(MAX_CONNECTION_NAME + 1))
    );
    assert!(named(10_000).is_err());
}

/// `AMQP_URL` set to bytes that are not UTF-8 is refused, not replaced by the
/// default broker (the client would quietly connect to localhost as guest).
/// Checked in a child process, the one place the variable can be set.
#[cfg(unix)]
#[test]
fn an_amqp_url_that_is_not_utf8_is_refused_not_replaced_by_the_default() {
    use std::os::unix::ffi::OsStrExt;
    const CHILD: &str = "REBOUND_TEST_CHILD_NOT_UTF8";
    const NAME: &str = "an_amqp_url_that_is_not_utf8_is_refused_not_replaced_by_the_default";
    if std::env::var_os(CHILD).is_some() {
        let config = Client::builder().from_env().config();
        let shown = format!("{config:?}");
        assert!(
            matches!(
                config,
                Err(amqp_rebound_core::ConfigError::InvalidUri { index: 0, .. })
            ),
            "{shown}"
        );
        assert!(!shown.contains("rabbit.example"), "{shown}");
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", NAME, "--nocapture"])
        .env(CHILD, "1")
        .env(
            "AMQP_URL",
            std::ffi::OsStr::from_bytes(b"amqp://u:p\xffw@rabbit.example:5672/%2f"),
        )
        .output()
        .expect("the child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
