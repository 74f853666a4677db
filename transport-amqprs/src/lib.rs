//! `amqp-rebound-amqprs`: the transport adapter that binds
//! [`amqp-rebound-core`](amqp_rebound_core) to [amqprs] 2 on tokio.
//!
//! Its purpose is to translate, and nothing more: core's transport calls into amqprs
//! calls, and amqprs's callbacks (`ConnectionCallback`, `ChannelCallback`,
//! `listen_network_io_failure`) into core's event streams. amqprs reports no
//! per-publish confirm future, so this adapter tracks delivery tags per channel and
//! turns ack/nack (single and multiple) into core's confirm events. No policy, no
//! retries.
//!
//! Status: the transport traits it implements arrive with the driver (layer 2 of the
//! core); until then this crate only fixes its place in the workspace.
//!
//! [amqprs]: https://docs.rs/amqprs

pub use amqp_rebound_core as core;
