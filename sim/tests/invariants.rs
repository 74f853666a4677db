//! The simulator's [`Invariant`](amqp_rebound_sim::Invariant)s, each checked on 256 full-driver simulations (the real
//! Client and Driver against the simulated broker, in virtual time, under 10 to 16
//! random faults in 20 simulated seconds). A failure prints `REBOUND_SEED=<n>`;
//! setting it replays that one scenario bit for bit and prints its trace.

mod support;

use amqp_rebound_sim::{Simulation, check_same_trace};
use support::property;

#[test]
fn only_ready_channels_are_used() {
    property(|s| Simulation::new(s).run().check_only_ready_channels());
}

#[test]
fn no_confirmed_message_is_lost() {
    property(|s| Simulation::new(s).run().check_no_confirmed_loss());
}

#[test]
fn every_publish_resolves_by_its_deadline() {
    property(|s| Simulation::new(s).run().check_every_publish_resolves());
}

#[test]
fn ready_again_within_backoff_cap_and_one_connect_after_the_last_fault() {
    property(|s| Simulation::new(s).run().check_liveness());
}

#[test]
fn close_is_terminal() {
    property(|s| Simulation::new(s).run().check_close_is_terminal());
}

#[test]
fn topology_and_consumers_are_restored_after_recovery() {
    property(|s| Simulation::new(s).run().check_topology_restored());
}

#[test]
fn no_stale_delivery_tag_reaches_the_broker() {
    property(|s| Simulation::new(s).run().check_no_stale_ack());
}

#[test]
fn same_seed_same_trace() {
    property(check_same_trace);
}
