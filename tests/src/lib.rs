//! `amqp-rebound-tests`: cross-crate tests for amqp-rebound (not published).
//!
//! Purpose: hold the transport conformance suite that every transport (lapin, amqprs,
//! the simulator) must pass against the same cases, and the real-broker fault tests
//! (connection kills, broker restart, memory alarm, TCP faults through a proxy).
//!
//! Status: today it checks the broker helpers used by `scripts/test`; the suite
//! follows the transports.

pub use amqp_rebound_core as core;
