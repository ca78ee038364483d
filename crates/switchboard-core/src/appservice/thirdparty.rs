//! Third-party lookups (`/_matrix/client/v3/thirdparty/...`), answered by fanning out to the
//! services that declared the protocol in their registration, as Synapse does.

use reqwest::Method;
use serde_json::{Map, Value};

use super::{
    AppServices,
    http::{Family, Reply},
};
use crate::{Error, Result, util::percent_encode};

/// What is looked up: a user or a location (room alias).
#[derive(Clone, Copy)]
pub enum Lookup {
    User,
    Location,
}

impl Lookup {
    fn path(self) -> &'static str {
        match self {
            Lookup::User => "user",
            Lookup::Location => "location",
        }
    }
}

impl AppServices {
    async fn third_party_get(&self, service: &super::AppService, suffix: &str) -> Option<Value> {
        let v1 = format!("/thirdparty/{suffix}");
        let legacy = format!("/_matrix/app/unstable/thirdparty/{suffix}");
        match self
            .delivery
            .http()
            .request(service, Family::ThirdParty, Method::GET, &v1, &legacy, None)
            .await
        {
            Some(Reply::Status { status, body, .. }) if status.is_success() => {
                serde_json::from_str(&body).ok()
            }
            Some(other) => {
                tracing::debug!(service = service.id(), reply = %other.describe(), "third-party lookup failed");
                None
            }
            None => None,
        }
    }

    /// The merged description of one protocol; each instance gets `instance_id` = `<as_id>|<network_id>`.
    pub async fn protocol(&self, protocol: &str) -> Result<Option<Value>> {
        let mut merged: Option<Map<String, Value>> = None;
        let services: Vec<_> = self
            .registry()
            .services
            .iter()
            .filter(|s| s.registration.protocols.iter().any(|p| p == protocol))
            .cloned()
            .collect();
        for service in services {
            let Some(Value::Object(mut description)) = self
                .third_party_get(&service, &format!("protocol/{}", percent_encode(protocol)))
                .await
            else {
                continue;
            };
            let mut instances = match description.remove("instances") {
                Some(Value::Array(instances)) => instances,
                _ => Vec::new(),
            };
            for instance in &mut instances {
                if let Some(obj) = instance.as_object_mut() {
                    let network = obj
                        .get("network_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    obj.insert(
                        "instance_id".to_owned(),
                        Value::from(format!("{}|{network}", service.id())),
                    );
                }
            }
            match &mut merged {
                None => {
                    description.insert("instances".to_owned(), Value::Array(instances));
                    merged = Some(description);
                }
                Some(existing) => {
                    if let Some(Value::Array(all)) = existing.get_mut("instances") {
                        all.extend(instances);
                    }
                }
            }
        }
        Ok(merged.map(Value::Object))
    }

    /// All protocols any service declared, with their merged descriptions.
    pub async fn protocols(&self) -> Result<Map<String, Value>> {
        let mut names: Vec<String> = self
            .registry()
            .services
            .iter()
            .flat_map(|s| s.registration.protocols.clone())
            .collect();
        names.sort();
        names.dedup();
        let mut out = Map::new();
        for name in names {
            if let Some(description) = self.protocol(&name).await? {
                out.insert(name, description);
            }
        }
        Ok(out)
    }

    /// Users or locations of a protocol matching the given fields, from every service serving it.
    pub async fn third_party_search(
        &self,
        lookup: Lookup,
        protocol: &str,
        query: &str,
    ) -> Result<Vec<Value>> {
        let services: Vec<_> = self
            .registry()
            .services
            .iter()
            .filter(|s| s.registration.protocols.iter().any(|p| p == protocol))
            .cloned()
            .collect();
        if services.is_empty() {
            return Err(Error::NotFound(format!(
                "No application service serves protocol `{protocol}`"
            )));
        }
        let suffix = format!(
            "{}/{}{}",
            lookup.path(),
            percent_encode(protocol),
            with_query(query)
        );
        let mut results = Vec::new();
        for service in services {
            if let Some(Value::Array(found)) = self.third_party_get(&service, &suffix).await {
                results.extend(found.into_iter().filter(Value::is_object));
            }
        }
        Ok(results)
    }

    /// Reverse lookups: `?alias=` for locations, `?userid=` for users, asked of every service.
    pub async fn third_party_reverse(&self, lookup: Lookup, query: &str) -> Result<Vec<Value>> {
        let suffix = format!("{}{}", lookup.path(), with_query(query));
        let mut results = Vec::new();
        for service in self.registry().services.clone() {
            if let Some(Value::Array(found)) = self.third_party_get(&service, &suffix).await {
                results.extend(found.into_iter().filter(Value::is_object));
            }
        }
        Ok(results)
    }
}

fn with_query(query: &str) -> String {
    if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    }
}
