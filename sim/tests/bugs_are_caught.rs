//! The properties catch bugs: with a client bug planted between the real client
//! and its transport (the test-only [`ClientBug`] switch of
//! `InstrumentedTransport`), the corresponding property must fail, while the same
//! scenarios pass without it.

mod support;

use amqp_rebound_sim::{ClientBug, Shape, Simulation};
use support::run_property;

#[test]
fn zero_loss_property_catches_a_client_that_does_not_republish() {
    let shape = Shape::small();
    let failure = run_property(&shape, ClientBug::NoRepublish, |s| {
        Simulation::new(s).run().check_no_confirmed_loss()
    })
    .expect_err("dropping re-publishes must lose confirmed messages");
    assert!(
        failure.contains("no confirmed message is lost"),
        "{failure}"
    );
    assert!(
        failure.contains("REBOUND_SEED="),
        "a failure names its seed: {failure}"
    );
}

#[test]
fn ready_channel_property_catches_a_client_that_hands_out_reopening_channels() {
    let shape = Shape::small();
    let failure = run_property(&shape, ClientBug::SkipReopenSetup, |s| {
        Simulation::new(s).run().check_only_ready_channels()
    })
    .expect_err("channels used before their set-up must be seen by the broker");
    assert!(failure.contains("only Ready channels"), "{failure}");
}

#[test]
fn topology_property_catches_a_client_that_skips_the_replay() {
    let shape = Shape::small();
    let failure = run_property(&shape, ClientBug::SkipReopenSetup, |s| {
        Simulation::new(s).run().check_topology_restored()
    })
    .expect_err("a skipped replay must leave consumers or bindings missing");
    assert!(failure.contains("topology restored"), "{failure}");
}

#[test]
fn a_failing_seed_replays_to_the_same_violation() {
    // Find one failing seed of the no-republish client, then run that scenario
    // again: same violation, same trace.
    let shape = Shape::small();
    let seed = (0..256)
        .find(|&seed| {
            let s = amqp_rebound_sim::with_bug(
                &amqp_rebound_sim::Scenario::from_seed(seed, &shape),
                ClientBug::NoRepublish,
            );
            Simulation::new(&s).run().check_no_confirmed_loss().is_err()
        })
        .expect("some seed in 256 loses a message without re-publish");
    let s = amqp_rebound_sim::with_bug(
        &amqp_rebound_sim::Scenario::from_seed(seed, &shape),
        ClientBug::NoRepublish,
    );
    let (a, b) = (Simulation::new(&s).run(), Simulation::new(&s).run());
    assert_eq!(a.check_no_confirmed_loss(), b.check_no_confirmed_loss());
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.lost(), b.lost());
    // The same scenario without the bug loses nothing.
    let fixed = amqp_rebound_sim::Scenario::from_seed(seed, &shape);
    Simulation::new(&fixed)
        .run()
        .check_no_confirmed_loss()
        .expect("the real client re-publishes");
}
