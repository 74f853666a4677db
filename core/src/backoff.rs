//! Reconnect delays: exponential backoff with jitter, computed from a caller-supplied
//! seeded RNG so that the same seed always gives the same delays.
//!
//! [`Backoff`] only hands out durations; the caller owns the clock. It waits the
//! delay, counts how long a connection then stays Ready, and calls [`Backoff::reset`]
//! once that reaches [`BackoffConfig::reset_after`].
//!
//! ```
//! use amqp_rebound_core::backoff::{Backoff, BackoffConfig, Jitter};
//! use std::time::Duration;
//!
//! let config = BackoffConfig { jitter: Jitter::None, ..BackoffConfig::default() };
//! config.validate()?;
//! let mut backoff = Backoff::new(config);
//! let mut rng = fastrand::Rng::with_seed(7);
//! assert_eq!(backoff.next_delay(&mut rng), Duration::from_millis(50));
//! assert_eq!(backoff.next_delay(&mut rng), Duration::from_millis(100));
//! assert_eq!(backoff.attempt(), 2);
//! # Ok::<(), amqp_rebound_core::error::ConfigError>(())
//! ```

use std::time::Duration;

use crate::error::ConfigError;

/// How much randomness goes into each delay.
///
/// Jitter spreads out clients that lost the same broker at the same moment, so they
/// do not all come back in the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// No randomness: `min(cap, initial * multiplier^attempt)`.
    None,
    /// Uniform in `[0, d]` while `d = initial * multiplier^attempt` is below the
    /// cap (AWS "full jitter"), then uniform in `[cap / 2, cap]`.
    ///
    /// The default. Below the cap the delays spread clients that lost the same
    /// broker at the same moment as widely as they can be spread, so they do not all
    /// come back in the same instant. At the cap the floor bounds the dial rate
    /// during a long outage (one dial per `0.75 * cap` on average), and no wait is
    /// longer than the cap once the broker is back.
    #[default]
    Full,
    /// AWS "decorrelated jitter": `min(cap, uniform in [initial, previous * 3])`, the
    /// previous delay starting at `initial`. Ignores the multiplier.
    Decorrelated,
}

/// The shape of the reconnect delays.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffConfig {
    /// The base delay, before any growth; must be above zero.
    pub initial: Duration,
    /// How much the delay grows per attempt; finite and at least 1.
    pub multiplier: f64,
    /// No delay is ever longer than this; at least `initial`.
    pub cap: Duration,
    /// How the delays are randomised.
    pub jitter: Jitter,
    /// How long a connection (or channel) must stay Ready to count as having done
    /// useful work. The caller measures this: when such a connection is lost it is
    /// redialled at once and [`Backoff::reset`] starts its delays over; one lost
    /// sooner counts as a failed dial and its delay grows, so a broker that accepts
    /// every connection and drops it right away cannot cause a hot loop.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    /// 50 ms initial, doubling, capped at 2 s, full jitter, reset after 150 ms
    /// Ready.
    ///
    /// Why these values:
    /// - the cap bounds how long an outage lasts for the user after the broker is
    ///   back: the next dial is at most 2 s away (about 0.6 s at the median), while
    ///   a connection dials at most once per 1 s (1.5 s on average) once its delay
    ///   reached the cap;
    /// - `reset_after` is above the 100 ms within which a broker that refuses us
    ///   after the handshake (or a proxy that accepts and drops) closes a
    ///   connection, so such a broker meets a growing backoff; and below the time a
    ///   connection lives between faults that come every 200 ms, so even dense
    ///   faults find each connection redialled at once.
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(50),
            multiplier: 2.0,
            cap: Duration::from_secs(2),
            jitter: Jitter::Full,
            reset_after: Duration::from_millis(150),
        }
    }
}

impl BackoffConfig {
    /// Checks the configuration, in this order: a zero `initial` is
    /// [`ConfigError::ZeroBackoff`]; a `multiplier` that is NaN, infinite or below 1
    /// is [`ConfigError::InvalidMultiplier`]; a `cap` below `initial` is
    /// [`ConfigError::BackoffCapBelowInitial`].
    ///
    /// [`Backoff`] never panics on an invalid configuration, but its delays are then
    /// meaningless (a zero `initial` retries in a hot loop).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.initial.is_zero() {
            return Err(ConfigError::ZeroBackoff);
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(ConfigError::InvalidMultiplier(self.multiplier));
        }
        if self.cap < self.initial {
            return Err(ConfigError::BackoffCapBelowInitial {
                initial: self.initial,
                cap: self.cap,
            });
        }
        Ok(())
    }
}

/// The delay sequence for one connection: a [`BackoffConfig`], the number of delays
/// handed out since the last reset, and the previous delay (for
/// [`Jitter::Decorrelated`]).
///
/// Every delay is within `[0, cap]`, for any attempt count and any multiplier; nothing
/// here panics or overflows.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    previous: Duration,
}

impl Backoff {
    /// Starts a sequence at attempt 0.
    pub fn new(config: BackoffConfig) -> Self {
        let previous = config.initial;
        Backoff {
            config,
            attempt: 0,
            previous,
        }
    }

    /// The configuration this sequence follows.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// How many delays were handed out since the last [`reset`](Backoff::reset).
    /// Saturates at `u32::MAX`.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, as the [`Jitter`] kind says; then counts the
    /// attempt.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let cap = self.config.cap;
        let delay = match self.config.jitter {
            Jitter::None => self.exponential(),
            Jitter::Full => {
                let d = self.exponential();
                if d >= cap {
                    uniform(rng, cap / 2, cap)
                } else {
                    uniform(rng, Duration::ZERO, d)
                }
            }
            Jitter::Decorrelated => {
                let low = self.config.initial;
                let high = self.previous.saturating_mul(3).max(low);
                uniform(rng, low, high).min(cap)
            }
        };
        self.record(delay)
    }

    /// A delay around the cap, for failures that retrying soon will not fix (the broker
    /// refused us); then counts the attempt.
    ///
    /// [`Jitter::None`] gives the cap; the other kinds give a uniform delay in
    /// `[cap / 2, cap]`, so refused clients still spread out.
    pub fn at_cap(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let cap = self.config.cap;
        let delay = match self.config.jitter {
            Jitter::None => cap,
            Jitter::Full | Jitter::Decorrelated => uniform(rng, cap / 2, cap),
        };
        self.record(delay)
    }

    /// Starts over at attempt 0, as after a connection stayed Ready for
    /// [`BackoffConfig::reset_after`].
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.previous = self.config.initial;
    }

    fn record(&mut self, delay: Duration) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.previous = delay;
        delay
    }

    /// `min(cap, initial * multiplier^attempt)`, in `[0, cap]` whatever the inputs.
    fn exponential(&self) -> Duration {
        let BackoffConfig {
            initial,
            multiplier,
            cap,
            ..
        } = self.config;
        // In f64, where overflow becomes infinity instead of a panic; clamped below.
        let secs = initial.as_secs_f64() * multiplier.powf(f64::from(self.attempt));
        if secs.is_nan() {
            // Only an invalid multiplier gets here; waiting the longest is the safe
            // choice.
            return cap;
        }
        if secs <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(secs).map_or(cap, |d| d.min(cap))
    }
}

/// A uniform duration in `[low, high]`, to the nanosecond; `high` if `high < low`.
fn uniform(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return high;
    }
    from_nanos(rng.u128(low.as_nanos()..=high.as_nanos()))
}

/// The inverse of [`Duration::as_nanos`]; `Duration::from_nanos` only takes a `u64`.
fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let subsec = (nanos % NANOS_PER_SEC) as u32; // below 10^9, so it fits
    u64::try_from(nanos / NANOS_PER_SEC).map_or(Duration::MAX, |secs| Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The defaults with a 10 s cap, so that several doublings show.
    fn with(jitter: Jitter) -> Backoff {
        Backoff::new(BackoffConfig {
            jitter,
            cap: Duration::from_secs(10),
            ..BackoffConfig::default()
        })
    }

    fn delays(backoff: &mut Backoff, seed: u64, n: usize) -> Vec<Duration> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| backoff.next_delay(&mut rng)).collect()
    }

    #[test]
    fn defaults() {
        let config = BackoffConfig::default();
        assert_eq!(config.initial, ms(50));
        assert_eq!(config.multiplier, 2.0);
        assert_eq!(config.cap, Duration::from_secs(2));
        assert_eq!(config.jitter, Jitter::Full);
        assert_eq!(config.reset_after, ms(150));
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(Jitter::default(), Jitter::Full);
    }

    #[test]
    fn validate_refuses_bad_configs() {
        let base = BackoffConfig::default();
        let check = |change: fn(&mut BackoffConfig)| {
            let mut config = base.clone();
            change(&mut config);
            config.validate()
        };
        assert_eq!(
            check(|c| c.initial = Duration::ZERO),
            Err(ConfigError::ZeroBackoff)
        );
        assert_eq!(
            check(|c| c.cap = ms(10)),
            Err(ConfigError::BackoffCapBelowInitial {
                initial: ms(50),
                cap: ms(10)
            })
        );
        assert_eq!(
            check(|c| c.multiplier = 0.5),
            Err(ConfigError::InvalidMultiplier(0.5))
        );
        assert_eq!(
            check(|c| c.multiplier = f64::INFINITY),
            Err(ConfigError::InvalidMultiplier(f64::INFINITY))
        );
        assert_eq!(
            check(|c| c.multiplier = -1.0),
            Err(ConfigError::InvalidMultiplier(-1.0))
        );
        // NaN != NaN, so match instead of comparing.
        assert!(matches!(
            check(|c| c.multiplier = f64::NAN),
            Err(ConfigError::InvalidMultiplier(m)) if m.is_nan()
        ));
        assert_eq!(check(|c| c.multiplier = 1.0), Ok(()));
        assert_eq!(check(|c| c.cap = c.initial), Ok(()));
    }

    #[test]
    fn no_jitter_doubles_up_to_the_cap() {
        let mut backoff = with(Jitter::None);
        let expected: Vec<_> = [50, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(delays(&mut backoff, 1, 10), expected);
        assert_eq!(backoff.attempt(), 10);
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_bound() {
        let mut backoff = with(Jitter::Full);
        let mut rng = fastrand::Rng::with_seed(2);
        for attempt in 0..40u32 {
            let bound = ms(50)
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(Duration::from_secs(10));
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= bound, "attempt {attempt}: {delay:?} > {bound:?}");
        }
        // Actually random: over many first attempts, both halves of [0, 50 ms] show up.
        let firsts: Vec<_> = (0..200)
            .map(|_| {
                backoff.reset();
                backoff.next_delay(&mut rng)
            })
            .collect();
        assert!(firsts.iter().any(|d| *d < ms(25)));
        assert!(firsts.iter().any(|d| *d > ms(25)));
    }

    #[test]
    fn full_jitter_draws_from_the_upper_half_once_at_the_cap() {
        let mut backoff = with(Jitter::Full);
        let mut rng = fastrand::Rng::with_seed(4);
        let cap = Duration::from_secs(10);
        for attempt in 0..40u32 {
            let d = ms(50).saturating_mul(2u32.saturating_pow(attempt));
            let delay = backoff.next_delay(&mut rng);
            if d >= cap {
                assert!(
                    cap / 2 <= delay && delay <= cap,
                    "attempt {attempt}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn decorrelated_jitter_grows_from_the_previous_delay() {
        let mut backoff = with(Jitter::Decorrelated);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut previous = ms(50);
        let mut longest = Duration::ZERO;
        for _ in 0..100 {
            let delay = backoff.next_delay(&mut rng);
            assert!(delay >= ms(50), "{delay:?}");
            assert!(
                delay <= (previous * 3).min(Duration::from_secs(10)),
                "{delay:?}"
            );
            previous = delay;
            longest = longest.max(delay);
        }
        // Each step multiplies by 3 * uniform(0, 1), which drifts upwards in log space
        // (E[ln 3U] = ln 3 - 1 > 0), so it wanders up towards the cap.
        assert!(longest > Duration::from_secs(1), "{longest:?}");
    }

    #[test]
    fn at_cap_stays_near_the_cap() {
        let mut rng = fastrand::Rng::with_seed(4);
        let cap = Duration::from_secs(10);
        let mut none = with(Jitter::None);
        assert_eq!(none.at_cap(&mut rng), cap);
        assert_eq!(none.attempt(), 1);
        for jitter in [Jitter::Full, Jitter::Decorrelated] {
            let mut backoff = with(jitter);
            for n in 1..=50 {
                let delay = backoff.at_cap(&mut rng);
                assert!(delay >= cap / 2 && delay <= cap, "{jitter:?}: {delay:?}");
                assert_eq!(backoff.attempt(), n);
            }
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = with(Jitter::None);
        let first = delays(&mut backoff, 5, 6);
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert_eq!(delays(&mut backoff, 5, 6), first);

        let mut backoff = with(Jitter::Decorrelated);
        let mut rng = fastrand::Rng::with_seed(6);
        for _ in 0..50 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        let delay = backoff.next_delay(&mut rng);
        assert!(delay >= ms(50) && delay <= ms(150), "{delay:?}");
    }

    #[test]
    fn same_seed_same_delays() {
        for jitter in [Jitter::None, Jitter::Full, Jitter::Decorrelated] {
            let a = delays(&mut with(jitter), 42, 50);
            let b = delays(&mut with(jitter), 42, 50);
            assert_eq!(a, b, "{jitter:?}");
        }
        assert_ne!(
            delays(&mut with(Jitter::Full), 42, 50),
            delays(&mut with(Jitter::Full), 43, 50)
        );
    }

    #[test]
    fn extremes_neither_panic_nor_overflow() {
        let mut rng = fastrand::Rng::with_seed(7);
        let configs = [
            BackoffConfig {
                multiplier: 1e308,
                ..BackoffConfig::default()
            },
            BackoffConfig {
                initial: Duration::MAX,
                cap: Duration::MAX,
                multiplier: 2.0,
                ..BackoffConfig::default()
            },
            BackoffConfig {
                initial: Duration::from_nanos(1),
                cap: Duration::MAX,
                multiplier: f64::MAX,
                ..BackoffConfig::default()
            },
            // Invalid ones: validate refuses them, but Backoff must still not panic.
            BackoffConfig {
                multiplier: f64::NAN,
                ..BackoffConfig::default()
            },
            BackoffConfig {
                multiplier: -3.0,
                ..BackoffConfig::default()
            },
            BackoffConfig {
                initial: Duration::ZERO,
                ..BackoffConfig::default()
            },
            BackoffConfig {
                initial: Duration::from_secs(60),
                ..BackoffConfig::default()
            },
        ];
        for config in configs {
            for jitter in [Jitter::None, Jitter::Full, Jitter::Decorrelated] {
                let config = BackoffConfig {
                    jitter,
                    ..config.clone()
                };
                let cap = config.cap;
                let mut backoff = Backoff::new(config);
                backoff.attempt = u32::MAX - 2;
                for _ in 0..4 {
                    assert!(backoff.next_delay(&mut rng) <= cap);
                    assert!(backoff.at_cap(&mut rng) <= cap);
                }
                assert_eq!(backoff.attempt(), u32::MAX);
            }
        }
        let mut backoff = with(Jitter::None);
        backoff.attempt = u32::MAX;
        assert_eq!(backoff.next_delay(&mut rng), Duration::from_secs(10));
    }

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Decorrelated)
        ]
    }

    fn valid_config() -> impl Strategy<Value = BackoffConfig> {
        (
            1u64..=u64::MAX,
            0u64..=u64::MAX,
            prop_oneof![1.0f64..4.0, 1.0f64..1e300, Just(1.0)],
            jitter(),
        )
            .prop_map(|(initial_ns, extra_ns, multiplier, jitter)| {
                let initial = Duration::from_nanos(initial_ns);
                BackoffConfig {
                    initial,
                    multiplier,
                    cap: initial.saturating_add(Duration::from_nanos(extra_ns)),
                    jitter,
                    reset_after: Duration::from_secs(30),
                }
            })
    }

    fn config() -> Config {
        Config {
            cases: 512,
            rng_seed: RngSeed::Fixed(0xb0ff),
            failure_persistence: None,
            ..Config::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn delays_stay_within_zero_and_cap(
            config in valid_config(),
            start in prop_oneof![Just(0u32), any::<u32>()],
            steps in 1usize..64,
            seed in any::<u64>(),
            refused in proptest::collection::vec(any::<bool>(), 64),
        ) {
            prop_assert_eq!(config.validate(), Ok(()));
            let cap = config.cap;
            let initial = config.initial;
            let jitter = config.jitter;
            let mut backoff = Backoff::new(config);
            backoff.attempt = start;
            let mut rng = fastrand::Rng::with_seed(seed);
            for &refused in refused.iter().take(steps) {
                let delay = if refused {
                    backoff.at_cap(&mut rng)
                } else {
                    backoff.next_delay(&mut rng)
                };
                prop_assert!(delay <= cap, "{delay:?} > {cap:?}");
                if refused && jitter != Jitter::None {
                    prop_assert!(delay >= cap / 2);
                }
                if jitter == Jitter::Decorrelated && !refused {
                    prop_assert!(delay >= initial);
                }
            }
        }

        #[test]
        fn no_jitter_never_shrinks(
            config in valid_config(),
            start in prop_oneof![Just(0u32), any::<u32>()],
            seed in any::<u64>(),
        ) {
            let mut backoff = Backoff::new(BackoffConfig { jitter: Jitter::None, ..config });
            backoff.attempt = start;
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut previous = Duration::ZERO;
            for _ in 0..64 {
                let delay = backoff.next_delay(&mut rng);
                prop_assert!(delay >= previous, "{delay:?} < {previous:?}");
                previous = delay;
            }
        }
    }
}
