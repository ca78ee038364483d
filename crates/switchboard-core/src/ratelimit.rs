//! Token-bucket rate limiting configured the way Synapse configures it (`per_second`, `burst_count`).

use std::{collections::HashMap, sync::Mutex, time::Instant};

use crate::{Error, Result, config::RateLimit};

pub struct RateLimiter {
    config: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(config: RateLimit) -> Self {
        Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one action for `key`, or fails with `M_LIMIT_EXCEEDED` and the wait until the next.
    pub fn check(&self, key: &str) -> Result<()> {
        self.check_at(key, Instant::now())
    }

    /// Fails as [`RateLimiter::check`] would, without taking an action: for limits that count only
    /// successes (registrations) or failures (wrong passwords).
    pub fn peek(&self, key: &str) -> Result<()> {
        let now = Instant::now();
        let buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::internal("rate limiter poisoned"))?;
        match buckets.get(key).map(|b| self.refilled(b, now)) {
            Some(tokens) if tokens < 1.0 => Err(Error::LimitExceeded {
                retry_after_ms: self.retry_after_ms(tokens),
            }),
            _ => Ok(()),
        }
    }

    /// Gives back an action taken with [`RateLimiter::check`] that did not happen after all (a
    /// registration that stopped at user-interactive auth). Taking first and refunding failures
    /// charges exactly what happened, and concurrent requests cannot all slip past a `peek`.
    pub fn refund(&self, key: &str) {
        let now = Instant::now();
        if let Ok(mut buckets) = self.buckets.lock()
            && let Some(bucket) = buckets.get_mut(key)
        {
            bucket.tokens = (self.refilled(bucket, now) + 1.0).min(self.config.burst_count);
            bucket.updated = now;
        }
    }

    fn retry_after_ms(&self, tokens: f64) -> u64 {
        if self.config.per_second > 0.0 {
            ((1.0 - tokens) / self.config.per_second * 1000.0).ceil() as u64
        } else {
            u64::MAX / 2
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.config.per_second).min(self.config.burst_count)
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<()> {
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::internal("rate limiter poisoned"))?;
        if buckets.len() > 100_000 {
            // Full buckets carry no information; dropping them bounds memory under many keys.
            buckets.retain(|_, b| {
                (b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * self.config.per_second)
                    < self.config.burst_count
            });
        }
        let burst = self.config.burst_count;
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let tokens = self.refilled(bucket, now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            bucket.updated = now;
            return Ok(());
        }
        Err(Error::LimitExceeded {
            retry_after_ms: self.retry_after_ms(tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst_count: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check_at("k", t0).expect("within burst");
        }
        match limiter.check_at("k", t0) {
            Err(Error::LimitExceeded { retry_after_ms }) => assert_eq!(retry_after_ms, 500),
            other => panic!("expected limit, got {other:?}"),
        }
        limiter.check_at("other", t0).expect("keys are independent");
        limiter
            .check_at("k", t0 + Duration::from_millis(500))
            .expect("refilled one token");
        assert!(limiter.peek("k").is_err(), "peek sees the empty bucket");
        limiter.peek("fresh").expect("peek on an unknown key allows");
        limiter.peek("fresh").expect("and does not consume");
    }
}
