//! Runs a check over many full-driver simulations: proptest draws the seeds, each
//! seed names a whole scenario ([`Scenario::from_seed`]), a failure prints the
//! seed, and `REBOUND_SEED=<n>` replays exactly that scenario (printing its trace).
//!
//! `REBOUND_CASES=<n>` changes the number of cases (default 256).

#![allow(dead_code)] // each test binary uses part of it

use amqp_rebound_sim::{
    ClientBug, Scenario, Shape, Simulation, Violation, seed_from_env, with_bug,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// Cases per property.
pub fn cases() -> u32 {
    std::env::var("REBOUND_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

/// Runs `check` on `cases()` scenarios of `shape` with `bug` planted. `Err` carries
/// the first violation's text (with its seed). The case generator is seeded, so a
/// run is the same every time.
pub fn run_property(
    shape: &Shape,
    bug: ClientBug,
    check: impl Fn(&Scenario) -> Result<(), Violation>,
) -> Result<(), String> {
    if let Some(seed) = seed_from_env() {
        let scenario = with_bug(&Scenario::from_seed(seed, shape), bug);
        return check(&scenario).map_err(|v| {
            let trace = Simulation::new(&scenario).run().trace;
            format!("{v}\n--- scenario ---\n{scenario:#?}\n--- trace ---\n{trace}")
        });
    }
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5eed_0007),
        // A seed names a scenario; a "smaller" seed is not a simpler scenario.
        max_shrink_iters: 0,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    match runner.run(&any::<u64>(), |seed| {
        let scenario = with_bug(&Scenario::from_seed(seed, shape), bug);
        check(&scenario).map_err(|v| TestCaseError::fail(v.to_string()))
    }) {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, _)) => Err(reason.to_string()),
        Err(TestError::Abort(reason)) => Err(reason.to_string()),
    }
}

/// Like [`run_property`] without a bug; panics with the violation.
pub fn property(check: impl Fn(&Scenario) -> Result<(), Violation>) {
    if let Err(failure) = run_property(&Shape::small(), ClientBug::None, check) {
        panic!("{failure}");
    }
}
