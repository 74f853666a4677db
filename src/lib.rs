//! # amqp-rebound
//!
//! RabbitMQ (AMQP 0-9-1) publishers and consumers that survive failures.
//!
//! This is the facade crate: it re-exports the runtime-agnostic core
//! ([`amqp_rebound_core`]) and, by Cargo feature, the transport adapters:
//! `lapin` (default) and `amqprs`.

pub use amqp_rebound_core::*;

/// The lapin transport adapter (feature `lapin`, on by default).
#[cfg(feature = "lapin")]
pub use amqp_rebound_lapin as lapin;

/// The amqprs transport adapter (feature `amqprs`).
#[cfg(feature = "amqprs")]
pub use amqp_rebound_amqprs as amqprs;
