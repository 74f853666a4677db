//! placeholder, replaced below
pub mod backoff;
pub mod endpoint;
pub mod error;
