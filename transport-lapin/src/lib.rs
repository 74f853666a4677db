//! `amqp-rebound-lapin`: the transport adapter that binds
//! [`amqp-rebound-core`](amqp_rebound_core) to [lapin] 4 on tokio.
//!
//! Its purpose is to translate, and nothing more: core's transport calls into
//! lapin calls, lapin's errors into core's classified errors, and lapin's
//! notifications (connection events, confirms, returns, deliveries) into core's
//! event streams. It holds no policy and never retries: recovery is the core's job,
//! so lapin's own auto-recovery stays off.
//!
//! Status: the transport traits it implements arrive with the driver (layer 2 of the
//! core); until then this crate only fixes its place in the workspace.
//!
//! [lapin]: https://docs.rs/lapin

pub use amqp_rebound_core as core;
