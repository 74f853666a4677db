//! A pool of 20 connections x 10 channels through a broker restart: every channel
//! is Ready again within the backoff cap plus one connect after the broker is back,
//! and the reconnects back off instead of looping hot. (`rebound-chaos
//! --bench-mode` runs the 100 x 100 version.)

use std::time::Duration;

use amqp_rebound_core::BackoffConfig;
use amqp_rebound_sim::{Fault, FaultPlan, Scenario, Settings, Simulation, Workload};

#[test]
fn a_pool_recovers_from_a_broker_restart_within_the_bound_without_a_dial_storm() {
    let restart_at = Duration::from_secs(5);
    let downtime = Duration::from_secs(2);
    let scenario = Scenario {
        seed: 9,
        settings: Settings {
            connections: 20,
            channels: 10,
            hosts: 1,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(5),
            probe: false,
            after_close: Duration::from_secs(5),
            ..Settings::default()
        },
        workload: Workload::default(),
        plan: FaultPlan::new().at(restart_at, Fault::Restart { downtime }),
    };
    let outcome = Simulation::new(&scenario).run();
    outcome.check_liveness().unwrap();
    outcome.check_close_is_terminal().unwrap();
    let ready = outcome.ready_at.expect("Ready at the end");
    assert!(ready > restart_at + downtime, "it was down: {ready:?}");
    assert_eq!(
        outcome
            .dial_times
            .iter()
            .filter(|t| **t < restart_at)
            .count(),
        20
    );
    // Full jitter from 50 ms doubling: a refused connection dials a handful of
    // times in 2 s, not hundreds.
    let during = outcome
        .dial_times
        .iter()
        .filter(|t| **t >= restart_at && **t < restart_at + downtime)
        .count();
    assert!((20..=20 * 8).contains(&during), "{during} dials while down");
    // Once the broker is back, the dials are spread by jitter.
    let burst = outcome.max_dials_within(Duration::from_millis(100), restart_at + downtime);
    assert!(
        burst < 20,
        "{burst} of 20 connections dialled within 100 ms"
    );
}

#[test]
fn max_dials_within_counts_a_sliding_window() {
    let scenario = Scenario {
        seed: 1,
        settings: Settings {
            connections: 3,
            channels: 1,
            hosts: 1,
            probe: false,
            close: false,
            ..Settings::default()
        },
        workload: Workload::default(),
        plan: FaultPlan::new(),
    };
    let mut outcome = Simulation::new(&scenario).run();
    outcome.dial_times = [0, 50, 100, 101, 250, 260, 270, 280]
        .map(Duration::from_millis)
        .to_vec();
    let window = Duration::from_millis(100);
    assert_eq!(outcome.max_dials_within(window, Duration::ZERO), 4);
    assert_eq!(
        outcome.max_dials_within(window, Duration::from_millis(101)),
        4
    );
    assert_eq!(
        outcome.max_dials_within(Duration::from_millis(50), Duration::ZERO),
        4
    );
    assert_eq!(outcome.max_dials_within(Duration::ZERO, Duration::ZERO), 1);
    assert_eq!(outcome.max_dials_within(window, Duration::from_secs(1)), 0);
}
