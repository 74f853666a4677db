//! `amqp-rebound-tests`: cross-crate tests for amqp-rebound (not published).
//!
//! - [`proxy`]: [`FaultProxy`](proxy::FaultProxy), a TCP proxy that resets,
//!   closes, blackholes or refuses connections, or slips frames to the client,
//!   on command (`amqp_rebound_sim::proxy`, shared with `rebound-chaos`);
//! - [`broker`]: the broker at `AMQP_URL`, `rabbitmqctl` wrappers (kill every
//!   connection, restart, memory alarm, suspend listeners) with guards that undo
//!   them even when a test panics, the broker lock, unique names;
//! - [`suite`]: the transport conformance suite, the same cases for every
//!   transport, instantiated with [`conformance_suite!`];
//! - [`adapter`]: the adapter suite, each transport's traits against the broker
//!   without the client on top, instantiated with [`adapter_suite!`] from each
//!   adapter's `tests/broker.rs`; [`task_leak`]: failed dials leave no tasks,
//!   instantiated with [`task_leak_suite!`];
//! - [`capture`]: tracing output captured in memory, to check that no password
//!   is logged;
//! - [`bench`](mod@bench) and `src/bin/bench_{lapin,amqprs}.rs`: the side-by-side figures
//!   (raw client against amqp-rebound over it; recovery stall, lost and
//!   duplicates after a kill); `src/bin/bench_memory.rs`: client-side memory.
//!
//! # Running
//!
//! The suite needs a RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and, for the exclusive cases,
//! `rabbitmqctl` for that node (on `PATH`, or `$RABBITMQCTL`). `scripts/test`
//! starts or repairs a local broker first. Without a broker a case is skipped
//! (it says so on stderr), except under `CI=true` (or `REBOUND_BROKER_AVAILABLE=1`,
//! which `scripts/test` sets), where a missing broker fails it.
//!
//! ```text
//! cargo nextest run -p amqp-rebound-tests      # or: cargo test -p amqp-rebound-tests
//! cargo nextest run -p amqp-rebound-tests -E 'test(/::exclusive::/)'   # only the broker-wide faults
//! REBOUND_SEED=42 cargo test -p amqp-rebound-tests lapin::shared::failover  # replay a client seed
//! ```
//!
//! # TLS
//!
//! Each transport's module has a `tls` submodule: the TLS cases
//! ([`suite::tls_cases`]) and recovery cases of the others, over the broker's TLS
//! listener (`AMQPS_URL`, the test PKI in `REBOUND_TLS_DIR`; see [`tls`](mod@tls)).
//! `scripts/test` sets that listener up (`scripts/lib/tls.sh`); without it the
//! TLS cases skip, except under `CI=true` (or with `REBOUND_TLS_DIR` set), where
//! a missing listener fails them.
//!
//! ```text
//! AMQPS_URL=amqps://guest:guest@localhost:5671/%2f REBOUND_TLS_DIR=/tmp/amqp-rebound-tls \
//!     cargo nextest run -p amqp-rebound-tests -E 'test(/::tls::/)'
//! ```
//!
//! # Serialisation
//!
//! The cases share one broker. Each is either *shared* (module `shared`: it hurts
//! only its own connections, through a [`FaultProxy`](proxy::FaultProxy), and uses
//! queues with unique names) or *exclusive* (module `exclusive`: it restarts the
//! broker, raises a memory alarm, suspends the listeners or closes every
//! connection). Two mechanisms keep an exclusive case alone:
//!
//! 1. **The broker lock** ([`broker::BrokerLock`]), taken by every case before it
//!    starts: an `flock(2)` readers-writer lock on
//!    `$TMPDIR/amqp-rebound-tests.<host>-<port>.lock`. Shared cases take it shared,
//!    exclusive ones exclusive. `flock` works between threads of one process (each
//!    lock opens the file anew) and between processes, so it covers `cargo test`
//!    (one process, many threads) and `cargo nextest` (one process per test) alike,
//!    and even two checkouts testing against the same broker. The kernel drops it
//!    when a process dies. A second lock file, the turnstile, lets a waiting
//!    exclusive case go before shared cases that come after it.
//! 2. **A nextest test group**, in `.config/nextest.toml` at the workspace root:
//!    `rabbitmq-exclusive` (`max-threads = 1`) holds the exclusive cases and the
//!    broker tests of the transport crates (which do not take the lock), so nextest
//!    never starts them side by side, and an exclusive case never sits in a slot
//!    waiting for the lock while the other slot runs a transport's broker test.
//!
//! Under `cargo test --workspace` test binaries run one after another, so the
//! transport crates' broker tests never overlap this crate's.
//!
//! # Adding a transport
//!
//! One line in `tests/tests/conformance.rs` (and the crate in this crate's
//! dependencies), as for lapin and amqprs:
//!
//! ```ignore
//! amqp_rebound_tests::conformance_suite!(amqprs, amqp_rebound_amqprs::AmqprsTransport::new());
//! ```
//!
//! The cases are the same for every transport. Where a transport's client cannot
//! do what the others do, the case asserts that transport's documented behaviour
//! instead of skipping, through what the transport says of itself, never its
//! name: [`Transport::reports_blocked`](amqp_rebound_core::transport::Transport::reports_blocked)
//! (case 6 checks the unannounced fallback) and the flags of
//! [`Transport::capabilities`](amqp_rebound_core::transport::Transport::capabilities)
//! (missed heartbeats as an I/O error, case 3b; logins refused after 3 s, case 9;
//! the channel-close race, case 5; a known log leak, case 9; non-UTF-8 headers,
//! the bad-input edge case).

pub mod adapter;
pub mod bench;
pub mod broker;
pub mod capture;
pub mod cluster;
pub mod proxy;
pub mod suite;
pub mod task_leak;
pub mod tls;

pub use amqp_rebound_core as core;

/// Instantiates the conformance suite for a transport: a module `$name` with
/// submodules `shared` and `exclusive` holding one `#[test]` per case (see
/// [`suite::cases`]). `$transport` is an expression that makes a fresh transport
/// value; it is evaluated on the case's tokio runtime.
///
/// ```ignore
/// amqp_rebound_tests::conformance_suite!(lapin, amqp_rebound_lapin::LapinTransport::new());
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $transport:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn make() -> impl $crate::core::transport::Transport {
                $transport
            }

            /// Cases that hurt only their own connections.
            mod shared {
                $crate::__conformance_case!($name, Shared, publish_and_consume_10k);
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    stats_flush_and_close_agree_with_the_futures
                );
                $crate::__conformance_case!($name, Shared, proxy_reset_while_publishing);
                $crate::__conformance_case!($name, Shared, proxy_blackhole_detected_by_heartbeat);
                $crate::__conformance_case!($name, Shared, proxy_refuses_for_two_seconds);
                $crate::__conformance_case!($name, Shared, publish_to_missing_exchange_is_rejected);
                $crate::__conformance_case!($name, Shared, failover_to_the_next_host);
                $crate::__conformance_case!($name, Shared, ack_after_recovery_is_stale);
                $crate::__conformance_case!($name, Shared, bad_credentials_and_bad_config);
                $crate::__conformance_case!($name, Shared, close_during_reconnect);
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    fire_and_forget_then_close_keeps_every_message
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    close_with_the_broker_unreachable_returns_at_the_timeout
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    close_discarding_confirms_what_is_in_flight
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    flush_reports_what_was_not_confirmed
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    bad_messages_fail_alone_and_at_once
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    consume_on_a_missing_queue_is_refused
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_dropped_consumer_gives_back_what_it_did_not_read
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_publish_to_an_internal_exchange_is_rejected
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    refused_publishes_do_not_strike_the_ones_beside_them
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_binding_the_broker_keeps_refusing_is_dropped_from_the_replay
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_queue_declared_again_elsewhere_with_other_arguments_is_left_to_it
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_server_named_queue_given_by_name_is_followed_across_a_recovery
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_queue_declared_twice_answers_to_both_handles
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    an_exclusive_consumer_comes_back_after_a_blackhole
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    an_exclusive_queue_comes_back_after_a_blackhole
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_publish_right_after_dropping_an_auto_ack_consumer_stays_in_the_queue
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_tag_given_again_after_a_cancel_gets_only_its_own_queues_messages
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_consumer_dropped_while_messages_flow_gives_them_all_back
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    an_abandoned_consume_call_leaves_no_consumer_behind
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_queue_deleted_under_consumers_on_two_channels_stays_deleted
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    nothing_new_is_accepted_while_close_drains
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    auto_delete_entities_stay_deleted_after_a_recovery
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    topology_with_arguments_is_replayed_as_declared
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    requests_during_an_outage_run_once_after_the_replay
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    an_exclusive_queue_declared_again_goes_to_its_own_connection
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    an_unknown_exchange_type_is_refused_once
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    empty_queue_names_and_arguments_past_a_frame_are_refused_at_the_call
                );
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    returns_go_to_the_unroutable_messages_on_a_headers_exchange
                );
                $crate::__conformance_case!($name, Shared, edges, first_contact_names_the_cause);
                $crate::__conformance_case!(
                    $name,
                    Shared,
                    edges,
                    a_uris_connection_timeout_bounds_the_dial
                );
                $crate::__conformance_case!($name, Shared, edges, extreme_settings_never_panic);
            }

            /// Cases that hurt the whole broker: they run alone.
            mod exclusive {
                $crate::__conformance_case!(
                    $name,
                    Exclusive,
                    close_all_connections_while_publishing
                );
                $crate::__conformance_case!($name, Exclusive, suspend_and_resume_listeners);
                $crate::__conformance_case!($name, Exclusive, paused_broker_resumes_without_a_flap);
                $crate::__conformance_case!($name, Exclusive, broker_restart_recovers_topology);
                $crate::__conformance_case!($name, Exclusive, memory_alarm_blocks_and_unblocks);
                $crate::__conformance_case!(
                    $name,
                    Exclusive,
                    edges,
                    close_all_connections_during_the_drain
                );
                $crate::__conformance_case!(
                    $name,
                    Exclusive,
                    edges,
                    a_message_over_the_size_limit_fails_alone
                );
            }

            /// Over the broker's TLS listener (see [`tls`](mod@$crate::tls)): the
            /// TLS cases, and recovery cases of the others unchanged.
            mod tls {
                /// Cases that hurt only their own connections.
                mod shared {
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        tls_cases,
                        tls_errors_are_typed_and_fail_fast
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        tls_cases,
                        external_auth_with_a_client_certificate
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        tls_cases,
                        failover_between_tls_and_plain
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        tls_cases,
                        tls_error_after_ready_is_reported_at_every_dial
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        cases,
                        proxy_reset_while_publishing
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Shared,
                        tls_cases,
                        server_name_override_and_insecure_switch
                    );
                }

                /// Cases that hurt the whole broker: they run alone.
                mod exclusive {
                    $crate::__conformance_tls_case!(
                        $name,
                        Exclusive,
                        cases,
                        close_all_connections_while_publishing
                    );
                    $crate::__conformance_tls_case!(
                        $name,
                        Exclusive,
                        cases,
                        broker_restart_recovers_topology
                    );
                }
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    // a case of `suite::cases`
    ($name:ident, $access:ident, $case:ident) => {
        $crate::__conformance_case!($name, $access, cases, $case);
    };
    // a case of another module of `suite`
    ($name:ident, $access:ident, $module:ident, $case:ident) => {
        #[test]
        fn $case() {
            $crate::suite::run(
                stringify!($name),
                stringify!($case),
                $crate::broker::Access::$access,
                super::make,
                $crate::suite::$module::$case,
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tls_case {
    ($name:ident, $access:ident, $module:ident, $case:ident) => {
        #[test]
        fn $case() {
            $crate::suite::run_tls(
                stringify!($name),
                stringify!($case),
                $crate::broker::Access::$access,
                super::super::make,
                $crate::suite::$module::$case,
            );
        }
    };
}
