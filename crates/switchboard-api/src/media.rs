//! The media repository's HTTP surface: `/_matrix/media/{v3,r0}` (and `v1/create`), plus the
//! authenticated `/_matrix/client/v1/media` routes. Uploads get their own body limit,
//! `max_upload_size`.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ruma::{OwnedServerName, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_core::{
    Error, Homeserver,
    accounts::Session,
    media::{Body as MediaBody, Content, Method},
    util::{now_ms, percent_encode},
};

use crate::{
    error::ApiResult,
    extract::{Auth, Params},
};

pub(crate) fn router(upload_limit: usize) -> Router<Arc<Homeserver>> {
    let media = Router::new()
        .route("/upload", post(upload))
        .route("/upload/{server}/{media_id}", axum::routing::put(upload_to))
        .route("/download/{server}/{media_id}", get(download))
        .route("/download/{server}/{media_id}/{filename}", get(download_named))
        .route("/thumbnail/{server}/{media_id}", get(thumbnail))
        .route("/config", get(config));
    let authenticated = Router::new()
        .route("/download/{server}/{media_id}", get(download_authenticated))
        .route(
            "/download/{server}/{media_id}/{filename}",
            get(download_named_authenticated),
        )
        .route("/thumbnail/{server}/{media_id}", get(thumbnail_authenticated))
        .route("/config", get(config_authenticated));
    Router::new()
        .nest("/_matrix/media/v3", media.clone())
        .nest("/_matrix/media/r0", media)
        .route("/_matrix/media/v1/create", post(create))
        .nest("/_matrix/client/v1/media", authenticated)
        .layer(DefaultBodyLimit::max(upload_limit))
        // Every media answer, errors too: browsers must take the declared type, not guess one.
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                response.headers_mut().insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                response
            },
        ))
}

/// Types a browser may show in place (Synapse's `INLINE_CONTENT_TYPES`); anything else — SVG,
/// HTML, XML, JavaScript — could run script in the server's origin and is a download.
const INLINE_CONTENT_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

fn is_inline(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    INLINE_CONTENT_TYPES.contains(&essence.as_str())
}

/// The content's bytes as a stream: a file read in chunks (never whole into memory), or bytes.
pub(crate) fn chunks(
    content: MediaBody,
) -> futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>> {
    use futures_util::StreamExt;
    match content {
        MediaBody::Bytes(bytes) => futures_util::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed(),
        MediaBody::File { file, .. } => futures_util::stream::unfold(Some(file), |file| async move {
            use tokio::io::AsyncReadExt;
            let mut file = file?;
            let mut chunk = vec![0u8; 64 * 1024];
            match file.read(&mut chunk).await {
                Ok(0) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some((Ok(Bytes::from(chunk)), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed(),
    }
}

/// The length of the content's bytes.
pub(crate) fn length(content: &MediaBody) -> u64 {
    match content {
        MediaBody::File { len, .. } => *len,
        MediaBody::Bytes(bytes) => bytes.len() as u64,
    }
}

fn body(content: MediaBody) -> axum::body::Body {
    axum::body::Body::from_stream(chunks(content))
}

fn server(raw: &str) -> Result<OwnedServerName, Error> {
    OwnedServerName::try_from(raw).map_err(|e| Error::InvalidParam(format!("invalid server name {raw}: {e}")))
}

fn mxc(hs: &Homeserver, media_id: &str) -> String {
    format!("mxc://{}/{media_id}", hs.server_name)
}

#[derive(Deserialize)]
struct UploadParams {
    filename: Option<String>,
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn upload(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Params(params): Params<UploadParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let kind = content_type(&headers);
    let media_id = hs
        .media
        .upload(
            &session.user_id,
            kind.as_deref(),
            params.filename.as_deref(),
            &body,
        )
        .await?;
    Ok(Json(json!({ "content_uri": mxc(&hs, &media_id) })))
}

async fn create(State(hs): State<Arc<Homeserver>>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    hs.limits.act(&hs.limits.media_create, &session)?;
    let media_id = hs.media.create(&session.user_id).await?;
    // Synapse's default: a reserved ID must be used within 24 hours.
    let expires = now_ms() + 24 * 3600 * 1000;
    Ok(Json(
        json!({ "content_uri": mxc(&hs, &media_id), "unused_expires_at": expires }),
    ))
}

async fn upload_to(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Params(params): Params<UploadParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if server(&server_name)? != hs.server_name {
        return Err(Error::Forbidden("Media can only be uploaded to this server".to_owned()).into());
    }
    let kind = content_type(&headers);
    hs.media
        .upload_to(
            &session.user_id,
            &media_id,
            kind.as_deref(),
            params.filename.as_deref(),
            &body,
        )
        .await?;
    Ok(Json(json!({})))
}

/// The `Content-Disposition` of served media: `inline` only for types a browser may show.
pub(crate) fn disposition(content_type: &str, filename: Option<&str>) -> String {
    let kind = if is_inline(content_type) {
        "inline"
    } else {
        "attachment"
    };
    match filename {
        // Non-ASCII names go in RFC 6266's `filename*`, percent-encoded UTF-8.
        Some(name) if !name.is_ascii() => format!("{kind}; filename*=UTF-8''{}", percent_encode(name)),
        Some(name) => format!(
            "{kind}; filename=\"{}\"",
            name.replace(['"', '\\', '\r', '\n'], "_")
        ),
        None => kind.to_owned(),
    }
}

/// Media answers carry the spec's security headers: served content must not run scripts.
fn media_response(content: Content, filename: Option<String>) -> Response {
    let filename = filename.or(content.filename);
    let disposition = disposition(&content.content_type, filename.as_deref());
    let length = length(&content.body);
    let mut response = body(content.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let set = |value: &str| {
        HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
    };
    headers.insert(header::CONTENT_TYPE, set(&content.content_type));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    response
}

/// For whom a route may fetch other servers' media: the authenticated ones for their user, the
/// legacy ones only with `enable_authenticated_media: false` (Synapse's rule), for nobody in
/// particular.
fn fetch_for<'a>(hs: &Homeserver, session: Option<&'a Session>) -> Option<&'a UserId> {
    static ANONYMOUS: std::sync::LazyLock<ruma::OwnedUserId> = std::sync::LazyLock::new(|| {
        ruma::OwnedUserId::try_from("@anonymous:media.invalid").expect("a valid user ID")
    });
    match session {
        Some(session) => Some(&session.user_id),
        None if !hs.config.enable_authenticated_media => Some(&ANONYMOUS),
        None => None,
    }
}

async fn fetch(
    hs: &Homeserver,
    server_name: &str,
    media_id: &str,
    filename: Option<String>,
    session: Option<&Session>,
) -> ApiResult<Response> {
    let content = hs
        .media_content(&server(server_name)?, media_id, fetch_for(hs, session))
        .await?;
    Ok(media_response(content, filename))
}

async fn download(
    State(hs): State<Arc<Homeserver>>,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    fetch(&hs, &server_name, &media_id, None, None).await
}

async fn download_named(
    State(hs): State<Arc<Homeserver>>,
    Path((server_name, media_id, filename)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    fetch(&hs, &server_name, &media_id, Some(filename), None).await
}

async fn download_authenticated(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    fetch(&hs, &server_name, &media_id, None, Some(&session)).await
}

async fn download_named_authenticated(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((server_name, media_id, filename)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    fetch(&hs, &server_name, &media_id, Some(filename), Some(&session)).await
}

#[derive(Deserialize)]
pub(crate) struct ThumbnailParams {
    width: u32,
    height: u32,
    method: Option<String>,
}

impl ThumbnailParams {
    /// `(width, height, method)`, with the spec's default method `scale`.
    pub(crate) fn size(&self) -> Result<(u32, u32, Method), Error> {
        let method = match self.method.as_deref() {
            None | Some("scale") => Method::Scale,
            Some("crop") => Method::Crop,
            Some(other) => {
                return Err(Error::InvalidParam(format!(
                    "method must be crop or scale, not `{other}`"
                )));
            }
        };
        Ok((self.width, self.height, method))
    }
}

async fn make_thumbnail(
    hs: &Homeserver,
    server_name: &str,
    media_id: &str,
    params: ThumbnailParams,
    session: Option<&Session>,
) -> ApiResult<Response> {
    let content = hs
        .media_thumbnail(
            &server(server_name)?,
            media_id,
            params.size()?,
            fetch_for(hs, session),
        )
        .await?;
    Ok(media_response(content, None))
}

async fn thumbnail(
    State(hs): State<Arc<Homeserver>>,
    Path((server_name, media_id)): Path<(String, String)>,
    Params(params): Params<ThumbnailParams>,
) -> ApiResult<Response> {
    make_thumbnail(&hs, &server_name, &media_id, params, None).await
}

async fn thumbnail_authenticated(
    State(hs): State<Arc<Homeserver>>,
    Auth(session): Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Params(params): Params<ThumbnailParams>,
) -> ApiResult<Response> {
    make_thumbnail(&hs, &server_name, &media_id, params, Some(&session)).await
}

async fn config(State(hs): State<Arc<Homeserver>>) -> Json<Value> {
    Json(json!({ "m.upload.size": hs.media.max_upload_size }))
}

async fn config_authenticated(State(hs): State<Arc<Homeserver>>, _auth: Auth) -> Json<Value> {
    Json(json!({ "m.upload.size": hs.media.max_upload_size }))
}
