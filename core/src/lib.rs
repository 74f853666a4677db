//! placeholder, replaced below
pub mod error;
