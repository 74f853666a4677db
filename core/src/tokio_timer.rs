//! [`TokioTimer`]: the [`Timer`] over tokio's clock (feature `tokio`).

use std::time::Instant;

use crate::transport::{Sleep, Timer};

/// The [`Timer`] over tokio's clock (feature `tokio`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
            deadline,
        )))
    }
}
