//! `GET /users/{userId}` and `GET /rooms/{alias}` queries: does this user or alias exist? The
//! service may create it before answering 200 — the lazy creation bridges are built on. Queries
//! have their own HTTP client (a slow query never delays transactions), are coalesced per ID
//! (single flight), time out with an error saying so, and negative answers are cached briefly.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::Method;
use tokio::sync::OnceCell;

use super::{
    AppService,
    http::{Family, Reply, ServiceHttp},
};
use crate::{Error, Result, util::percent_encode};

const NEGATIVE_TTL: Duration = Duration::from_secs(10);

type Flight = Arc<OnceCell<Result<bool, String>>>;

pub struct Queries {
    http: ServiceHttp,
    in_flight: Mutex<HashMap<String, Flight>>,
    negative: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone, Copy)]
pub enum Kind {
    User,
    Alias,
}

impl Queries {
    pub fn new(timeout: Duration, legacy_auth: bool) -> Self {
        Self {
            http: ServiceHttp::new(timeout, legacy_auth),
            in_flight: Mutex::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
        }
    }

    /// Asks the services (in order, first 200 wins) whether `id` exists.
    pub async fn exists(&self, kind: Kind, id: &str, services: Vec<Arc<AppService>>) -> Result<bool> {
        if services.is_empty() {
            return Ok(false);
        }
        let key = format!("{}{id}", matches!(kind, Kind::User) as u8);
        if let Ok(negative) = self.negative.lock()
            && negative.get(&key).is_some_and(|at| at.elapsed() < NEGATIVE_TTL)
        {
            return Ok(false);
        }
        let flight = {
            let mut in_flight = self
                .in_flight
                .lock()
                .map_err(|_| Error::internal("queries poisoned"))?;
            in_flight.entry(key.clone()).or_default().clone()
        };
        let answer = flight
            .get_or_init(|| self.ask_all(kind, id, services))
            .await
            .clone();
        if let Ok(mut in_flight) = self.in_flight.lock()
            && in_flight.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            in_flight.remove(&key);
        }
        match answer {
            Ok(true) => Ok(true),
            Ok(false) => {
                if let Ok(mut negative) = self.negative.lock() {
                    negative.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
                    negative.insert(key, Instant::now());
                }
                Ok(false)
            }
            Err(message) => Err(Error::ServiceTimeout(message)),
        }
    }

    async fn ask_all(&self, kind: Kind, id: &str, services: Vec<Arc<AppService>>) -> Result<bool, String> {
        let encoded = percent_encode(id);
        let (family, path) = match kind {
            Kind::User => (Family::Users, format!("/users/{encoded}")),
            Kind::Alias => (Family::Rooms, format!("/rooms/{encoded}")),
        };
        let mut timed_out = None;
        for service in services {
            match self
                .http
                .request(&service, family, Method::GET, &path, &path, None)
                .await
            {
                Some(reply) if reply.is_success() => return Ok(true),
                Some(Reply::TimedOut) => {
                    tracing::warn!(service = service.id(), id, "application service query timed out");
                    timed_out = Some(service.id().to_owned());
                }
                Some(other) => {
                    tracing::debug!(service = service.id(), id, reply = %other.describe(), "query: no")
                }
                None => {}
            }
        }
        match timed_out {
            Some(service) => Err(format!(
                "application service `{service}` did not answer whether {id} exists in time"
            )),
            None => Ok(false),
        }
    }
}
