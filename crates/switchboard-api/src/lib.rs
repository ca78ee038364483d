//! The HTTP surface of Switchboard: axum routers, one module per area of the Client-Server API.
//! Handlers stay thin: extract, call one service method, shape the response. Errors become Matrix
//! errors in `error.rs`.

mod admin;
mod client;
pub mod error;
mod extract;
mod federation;
mod media;
mod metrics;

/// The JSON body parsing of every endpoint, reachable for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub use extract::parse_json;
pub use metrics::router as metrics_router;

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use switchboard_core::Homeserver;

use crate::error::matrix_error;

/// What one listener serves, from its `resources`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resources {
    pub client: bool,
    pub federation: bool,
}

/// The complete router for a listener serving the `client` resource. `x_forwarded` is the
/// listener's setting: only then is `X-Forwarded-For` taken as the client's address.
pub fn router(hs: Arc<Homeserver>, x_forwarded: bool) -> Router {
    router_for(
        hs,
        Resources {
            client: true,
            federation: false,
        },
        x_forwarded,
    )
}

/// The router of a listener serving `resources` (the client API, the federation API, or both).
pub fn router_for(hs: Arc<Homeserver>, resources: Resources, x_forwarded: bool) -> Router {
    let limit = hs.config.max_request_size;
    let uploads = media::router(hs.media.max_upload_size);
    let mut routes = Router::new();
    if resources.client {
        routes = routes
            .merge(client::router())
            .merge(admin::routes())
            .merge(admin::synapse_routes());
    }
    if resources.federation {
        routes = routes.merge(federation::router());
    }
    if let Some(well_known) = federation::well_known(&hs) {
        routes = routes.merge(well_known);
    }
    let uploads = if resources.client { uploads } else { Router::new() };
    routes
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // Merged after the general limit, so uploads get theirs.
        .merge(uploads)
        .layer(middleware::from_fn(refuse_nul))
        .layer(middleware::from_fn(cors))
        .layer(axum::Extension(extract::TrustForwarded(x_forwarded)))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(hs)
}

async fn unrecognized() -> Response {
    matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
}

async fn method_not_allowed() -> Response {
    matrix_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "M_UNRECOGNIZED",
        "Unrecognized request method",
    )
}

/// A NUL in a path or query (`%00`) can only be a mistake or a probe: no Matrix identifier, event
/// type or transaction ID holds one, and PostgreSQL cannot store it in text.
async fn refuse_nul(request: Request, next: Next) -> Response {
    if request
        .uri()
        .path_and_query()
        .is_some_and(|p| p.as_str().contains("%00"))
    {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "NUL characters are not allowed in request paths or queries",
        );
    }
    next.run(request).await
}

/// The CORS headers the spec requires on every response, and the answer to preflights, so web
/// clients such as Element work from any origin.
async fn cors(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Date"),
    );
    response
}
