//! The one place internal errors become Matrix error responses (`errcode` + `error`).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use switchboard_core::Error;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl From<switchboard_store::StoreError> for ApiError {
    fn from(e: switchboard_store::StoreError) -> Self {
        Self(Error::Store(e))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A Matrix error not produced by the services: bad request bodies, unknown routes.
pub fn matrix_error(status: StatusCode, errcode: &str, error: impl std::fmt::Display) -> Response {
    (
        status,
        Json(json!({ "errcode": errcode, "error": error.to_string() })),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let message = e.to_string();
        let (status, errcode) = match &e {
            Error::Forbidden(_) | Error::RegistrationDisabled => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Error::UserDeactivated => (StatusCode::FORBIDDEN, "M_USER_DEACTIVATED"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            Error::NotJson(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            Error::BadJson(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            Error::InvalidParam(_) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            Error::MissingParam(_) => (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"),
            Error::MissingToken => (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            Error::UnknownToken => {
                let body = json!({ "errcode": "M_UNKNOWN_TOKEN", "error": message, "soft_logout": false });
                return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            }
            Error::UserInUse => (StatusCode::BAD_REQUEST, "M_USER_IN_USE"),
            Error::InvalidUsername(_) => (StatusCode::BAD_REQUEST, "M_INVALID_USERNAME"),
            Error::RoomInUse => (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "M_UNKNOWN"),
            Error::UnsupportedRoomVersion(_) => (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Error::RemoteTooLarge(_) => (StatusCode::BAD_GATEWAY, "M_TOO_LARGE"),
            Error::Unrecognized(_) => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            Error::IncompatibleRoomVersion(version) => {
                let body = json!({ "errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": message, "room_version": version });
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
            Error::BadGateway(_) => (StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            Error::UnableToGrantJoin(_) => (StatusCode::BAD_REQUEST, "M_UNABLE_TO_GRANT_JOIN"),
            Error::Remote { status, errcode, .. } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
                return matrix_error(status, errcode, message);
            }
            Error::BadState(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            Error::UnknownPos(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN_POS"),
            // MSC4190's code, as Synapse 1.163 sends it.
            Error::AppserviceLoginUnsupported(_) => {
                (StatusCode::BAD_REQUEST, "M_APPSERVICE_LOGIN_UNSUPPORTED")
            }
            Error::WrongRoomKeysVersion { current_version } => {
                let body = json!({ "errcode": "M_WRONG_ROOM_KEYS_VERSION", "error": message, "current_version": current_version });
                return (StatusCode::FORBIDDEN, Json(body)).into_response();
            }
            Error::LimitExceeded { retry_after_ms } => {
                let body = json!({ "errcode": "M_LIMIT_EXCEEDED", "error": message, "retry_after_ms": retry_after_ms });
                let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
                let seconds = retry_after_ms.div_ceil(1000).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return response;
            }
            Error::UiaRequired {
                session,
                flows,
                error,
            } => {
                let flows: Vec<_> = flows.iter().map(|stages| json!({ "stages": stages })).collect();
                let mut body = json!({ "session": session, "flows": flows, "params": {} });
                if let Some((errcode, error)) = error {
                    body["errcode"] = json!(errcode);
                    body["error"] = json!(error);
                }
                return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            }
            Error::ServiceTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN"),
            Error::Exclusive(_) => (StatusCode::BAD_REQUEST, "M_EXCLUSIVE"),
            Error::UnknownDevice(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN_DEVICE"),
            Error::CannotOverwriteMedia => (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA"),
            Error::NotYetUploaded => (StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED"),
            Error::Ping {
                http_status,
                errcode,
                message,
                status,
                body,
            } => {
                let mut json = json!({ "errcode": errcode, "error": message });
                if let Some(status) = status {
                    json["status"] = json!(status);
                }
                if let Some(body) = body {
                    json["body"] = json!(body);
                }
                let code = StatusCode::from_u16(*http_status).unwrap_or(StatusCode::BAD_GATEWAY);
                return (code, Json(json)).into_response();
            }
            Error::Store(_) | Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                return matrix_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "M_UNKNOWN",
                    "Internal server error",
                );
            }
        };
        matrix_error(status, errcode, message)
    }
}
