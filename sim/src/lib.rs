//! `amqp-rebound-sim`: deterministic simulation of amqp-rebound.
//!
//! Purpose: run the whole client against an in-memory broker under injected faults
//! (connection kills, refused dials, partitions, broker restarts, channel errors,
//! blocked connections) in virtual time, driven by one seed so that every failing case
//! replays bit for bit.
//!
//! Status: today this crate holds the virtual clock that the core's tests and the
//! simulator share; the in-memory broker, fault plans and the `rebound-chaos` demo
//! follow once the driver exists.

pub use amqp_rebound_core as core;
