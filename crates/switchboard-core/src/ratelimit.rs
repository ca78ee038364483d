//! Token-bucket rate limiting configured the way Synapse configures it (`per_second`, `burst_count`).

use std::{collections::HashMap, sync::Mutex, time::Instant};

use crate::{
    Error, Result,
    accounts::Session,
    config::{Config, RateLimit},
};

/// The rate limiters of the actions Synapse limits, configured under its keys.
pub struct Limits {
    /// `rc_message`: events, and what fans out into events or devices (`createRoom`, profile
    /// changes, `sendToDevice`, `keys/upload`).
    pub message: RateLimiter,
    pub registration: RateLimiter,
    pub login_address: RateLimiter,
    pub login_account: RateLimiter,
    pub login_failed: RateLimiter,
    /// `rc_joins.local`: joins of rooms this server is in.
    pub joins: RateLimiter,
    /// `rc_joins.remote`: joins that go through another server.
    pub joins_remote: RateLimiter,
    invites_per_room: RateLimiter,
    invites_per_user: RateLimiter,
    invites_per_issuer: RateLimiter,
    /// `rc_admin_redaction`, if set.
    pub admin_redaction: Option<RateLimiter>,
    pub media_create: RateLimiter,
    /// Bytes of other servers' media fetched per user (`remote_media_download_*`).
    pub remote_media: RateLimiter,
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        Self {
            message: RateLimiter::new(config.rc_message),
            registration: RateLimiter::new(config.rc_registration),
            login_address: RateLimiter::new(config.rc_login.address),
            login_account: RateLimiter::new(config.rc_login.account),
            login_failed: RateLimiter::new(config.rc_login.failed_attempts),
            joins: RateLimiter::new(config.rc_joins.local),
            joins_remote: RateLimiter::new(config.rc_joins.remote),
            invites_per_room: RateLimiter::new(config.rc_invites.per_room),
            invites_per_user: RateLimiter::new(config.rc_invites.per_user),
            invites_per_issuer: RateLimiter::new(config.rc_invites.per_issuer),
            admin_redaction: config.rc_admin_redaction.map(RateLimiter::new),
            media_create: RateLimiter::new(config.rc_media_create),
            remote_media: RateLimiter::new(RateLimit {
                per_second: config.remote_media_download_per_second.0 as f64,
                burst_count: config.remote_media_download_burst_count.0 as f64,
            }),
        }
    }

    /// One action of the session's user under `limiter`, unless the session is exempt (a
    /// service's sender, or its users when it registered with `rate_limited: false`).
    pub fn act(&self, limiter: &RateLimiter, session: &Session) -> Result<()> {
        if session.rate_limited() {
            limiter.check(session.user_id.as_str())
        } else {
            Ok(())
        }
    }

    /// One invite, counted into the room (`None` for a room being created, which has no history
    /// to protect), to the invitee and by the inviter: all of them or none.
    pub fn invite(&self, session: &Session, room_id: Option<&str>, invitee: &str) -> Result<()> {
        if !session.rate_limited() {
            return Ok(());
        }
        let buckets: Vec<(&RateLimiter, &str)> = room_id
            .map(|room| (&self.invites_per_room, room))
            .into_iter()
            .chain([
                (&self.invites_per_user, invitee),
                (&self.invites_per_issuer, session.user_id.as_str()),
            ])
            .collect();
        for (taken, (limiter, key)) in buckets.iter().enumerate() {
            if let Err(e) = limiter.check(key) {
                for (limiter, key) in &buckets[..taken] {
                    limiter.refund(key);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

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

    /// Charges `amount` (bytes, say) to `key` after the fact; the bucket may go into debt, and
    /// [`RateLimiter::peek`] refuses until it is paid back.
    pub fn charge(&self, key: &str, amount: f64) {
        let now = Instant::now();
        if let Ok(mut buckets) = self.buckets.lock() {
            let burst = self.config.burst_count;
            let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
                tokens: burst,
                updated: now,
            });
            bucket.tokens = self.refilled(bucket, now) - amount;
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

    #[test]
    fn an_invite_refused_by_one_bucket_is_charged_to_none() {
        let config = Config::parse(
            "server_name: x\nlisteners: [{port: 1, resources: [{names: [client]}]}]\n\
             rc_invites: {per_room: {per_second: 0.001, burst_count: 5}, \
             per_user: {per_second: 0.001, burst_count: 1}, per_issuer: {per_second: 0.001, burst_count: 10}}\n",
            "test.yaml",
            std::path::Path::new("/"),
        )
        .expect("config");
        let limits = Limits::new(&config);
        let session = Session {
            user_id: ruma::owned_user_id!("@a:x"),
            device_id: "D".to_owned(),
            is_admin: false,
            appservice: None,
        };
        let room = Some("!r:x");
        limits.invite(&session, room, "@b:x").expect("first");
        for _ in 0..10 {
            assert!(
                limits.invite(&session, room, "@b:x").is_err(),
                "invitee's bucket empty"
            );
        }
        // The refused ones took nothing from the room's or the inviter's buckets.
        for invitee in ["@c:x", "@d:x", "@e:x", "@f:x"] {
            limits
                .invite(&session, room, invitee)
                .expect("room and inviter still have room");
        }
        assert!(
            limits.invite(&session, room, "@g:x").is_err(),
            "now the room's are spent"
        );
        assert!(
            limits.invite(&session, None, "@h:x").is_ok(),
            "a new room's invites count per invitee and inviter only"
        );
    }
}
