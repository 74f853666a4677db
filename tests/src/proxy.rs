//! [`FaultProxy`]: the TCP fault proxy of `amqp-rebound-sim` (feature `proxy`),
//! which `rebound-chaos` runs its real-broker mode through too. See
//! [`amqp_rebound_sim::proxy`] for its faults.

pub use amqp_rebound_sim::proxy::{FaultProxy, MAX_CONNECTIONS};
