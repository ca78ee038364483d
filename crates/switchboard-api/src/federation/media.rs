//! This server's media, as other servers fetch it (`/_matrix/federation/v1/media`): answered as
//! `multipart/mixed`, a JSON metadata part (empty) and the file, streamed from disk.

use std::sync::Arc;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::StreamExt;
use switchboard_core::{Homeserver, media::Content, util::random_string};

use super::{FedResult, Federated};
use crate::{
    extract::Params,
    media::{ThumbnailParams, chunks, disposition, length},
};

pub(super) fn routes() -> Router<Arc<Homeserver>> {
    Router::new()
        .route("/_matrix/federation/v1/media/download/{media_id}", get(download))
        .route(
            "/_matrix/federation/v1/media/thumbnail/{media_id}",
            get(thumbnail),
        )
}

async fn download(
    State(hs): State<Arc<Homeserver>>,
    Path(media_id): Path<String>,
    _request: Federated,
) -> FedResult<Response> {
    let content = hs
        .media
        .download(&hs.server_name, &hs.server_name, &media_id)
        .await?;
    Ok(multipart(content))
}

async fn thumbnail(
    State(hs): State<Arc<Homeserver>>,
    Path(media_id): Path<String>,
    Params(params): Params<ThumbnailParams>,
    _request: Federated,
) -> FedResult<Response> {
    let (width, height, method) = params.size()?;
    let content = hs
        .media
        .thumbnail(&hs.server_name, &hs.server_name, &media_id, width, height, method)
        .await?;
    Ok(multipart(content))
}

/// The spec's answer: `--boundary`, the metadata part (`{}`), the file part with its type and
/// disposition, the closing boundary.
fn multipart(content: Content) -> Response {
    let boundary = random_string(32);
    let file_headers = format!(
        "Content-Type: {}\r\nContent-Disposition: {}\r\nContent-Length: {}",
        content.content_type.replace(['\r', '\n'], ""),
        disposition(&content.content_type, content.filename.as_deref()),
        length(&content.body),
    );
    let head = format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n{file_headers}\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let stream = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(chunks(content.body))
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Body::from_stream(stream).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
