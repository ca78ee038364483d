//! Media across servers: other servers' media fetched for local clients (the authenticated
//! federation routes, `multipart/mixed`, falling back to the legacy unauthenticated routes for
//! servers without them), streamed to disk under `max_upload_size` and cached, and thumbnails
//! as the origin made them. Nothing is recorded until the whole file is on disk: a server that
//! breaks off, lies about a length or sends too much leaves nothing behind.

use std::path::Path;

use ruma::{ServerName, UserId};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::FederationError;
use crate::{
    Error, Homeserver, Result,
    media::{Content, Method},
    util::now_ms,
};

/// Room for the multipart framing and the JSON part around the file.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// What a fetch of remote media names: the original or one thumbnail.
#[derive(Clone, Copy)]
enum Variant {
    Original,
    Thumbnail { width: u32, height: u32, method: Method },
}

impl Variant {
    fn key(self) -> String {
        match self {
            Variant::Original => String::new(),
            Variant::Thumbnail {
                width,
                height,
                method,
            } => format!("{width}x{height}-{}", method_name(method)),
        }
    }
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Crop => "crop",
        Method::Scale => "scale",
    }
}

impl Homeserver {
    /// Media for a download: this server's, or another server's (from the cache, or fetched now
    /// for `fetch_for`, whose allowance of remote downloads it is counted against; `None` when
    /// the route may not fetch).
    pub async fn media_content(
        &self,
        server: &ServerName,
        media_id: &str,
        fetch_for: Option<&UserId>,
    ) -> Result<Content> {
        if server == self.server_name {
            return self.media.download(server, &self.server_name, media_id).await;
        }
        self.remote_media(server, media_id, Variant::Original, fetch_for)
            .await
    }

    /// A thumbnail: made here of this server's media, or as the origin made it of its own.
    pub async fn media_thumbnail(
        &self,
        server: &ServerName,
        media_id: &str,
        (width, height, method): (u32, u32, Method),
        fetch_for: Option<&UserId>,
    ) -> Result<Content> {
        if server == self.server_name {
            return self
                .media
                .thumbnail(server, &self.server_name, media_id, width, height, method)
                .await;
        }
        let variant = Variant::Thumbnail {
            width,
            height,
            method,
        };
        self.remote_media(server, media_id, variant, fetch_for).await
    }

    async fn remote_media(
        &self,
        origin: &ServerName,
        media_id: &str,
        variant: Variant,
        fetch_for: Option<&UserId>,
    ) -> Result<Content> {
        // Media IDs are `[A-Za-z0-9_-]+` (the spec's grammar) and server names never start with a
        // dot (`.` and `..` parse as names): nothing else reaches a file path.
        if origin.as_str().starts_with('.')
            || media_id.is_empty()
            || !media_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::NotFound("Media not found".to_owned()));
        }
        let key = variant.key();
        let path = self.media.remote_path(origin, media_id, &key);
        if let Some((content_type, filename, _)) = self
            .store
            .remote_media(origin.as_str(), media_id, &key, now_ms() as i64)
            .await?
        {
            match crate::media::open(&path).await {
                Ok(body) => {
                    return Ok(Content {
                        body,
                        content_type,
                        filename,
                    });
                }
                // The file went (a purge racing this request): fetch it again.
                Err(e) => {
                    tracing::warn!(%origin, media_id, error = %e, "cached remote media is missing its file")
                }
            }
        }
        let Some(requester) = fetch_for else {
            return Err(Error::NotFound(
                "Remote media is only served on the authenticated media routes (/_matrix/client/v1/media)"
                    .to_owned(),
            ));
        };
        // The requester's allowance of remote downloads: refused while in debt, charged with
        // every byte received, whether the download succeeded or not.
        let allowance = &self.limits.remote_media;
        allowance.peek(requester.as_str())?;
        let mut received = 0;
        let fetched = self
            .fetch_remote(origin, media_id, variant, &path, &mut received)
            .await;
        allowance.charge(requester.as_str(), received as f64);
        let (content_type, filename, size) = fetched?;
        self.store
            .add_remote_media(
                origin.as_str(),
                media_id,
                &key,
                &content_type,
                filename.as_deref(),
                size as i64,
                now_ms() as i64,
            )
            .await?;
        tracing::debug!(%origin, media_id, variant = key, size, "remote media cached");
        Ok(Content {
            body: crate::media::open(&path).await?,
            content_type,
            filename,
        })
    }

    /// Fetches media from its origin into `path`: the authenticated federation route first, the
    /// legacy one if the origin does not know it; a file part that points elsewhere
    /// (`Location`) is fetched from there. Returns content type, file name and size; `received`
    /// counts every byte that came in.
    async fn fetch_remote(
        &self,
        origin: &ServerName,
        media_id: &str,
        variant: Variant,
        path: &Path,
        received: &mut u64,
    ) -> Result<(String, Option<String>, u64)> {
        let limit = self.media.max_upload_size as u64;
        let (federation, legacy) = match variant {
            Variant::Original => (
                format!("/_matrix/federation/v1/media/download/{media_id}"),
                format!("/_matrix/media/v3/download/{origin}/{media_id}?allow_remote=false"),
            ),
            Variant::Thumbnail {
                width,
                height,
                method,
            } => {
                let query = format!("width={width}&height={height}&method={}", method_name(method));
                (
                    format!("/_matrix/federation/v1/media/thumbnail/{media_id}?{query}&animated=false"),
                    format!("/_matrix/media/v3/thumbnail/{origin}/{media_id}?{query}&allow_remote=false"),
                )
            }
        };
        let client = &self.federation.client;
        let download = self.media.temp_path();
        let result = async {
            match client.get_stream(origin, &federation, true).await {
                Ok(response) => {
                    let boundary = boundary(&response)?;
                    stream_to_file(response, &download, limit + MULTIPART_OVERHEAD, received).await?;
                    match extract_part(&download, &boundary, path, limit).await? {
                        Part::File(found) => Ok(found),
                        Part::Elsewhere { location, headers } => {
                            let response = client.get_url(&location).await.map_err(remote_error)?;
                            let found = plain_file(response, &download, path, limit, received).await?;
                            // The part's own headers say what the file is, if they say it.
                            Ok((headers.0.unwrap_or(found.0), headers.1.or(found.1), found.2))
                        }
                    }
                }
                Err(e) if unknown_endpoint(&e) => {
                    tracing::debug!(%origin, media_id, "no authenticated media routes; trying the legacy ones");
                    let response = client.get_stream(origin, &legacy, false).await.map_err(remote_error)?;
                    plain_file(response, &download, path, limit, received).await
                }
                Err(e) => Err(remote_error(e)),
            }
        }
        .await;
        let _ = tokio::fs::remove_file(&download).await;
        result
    }

    /// Drops cached remote media not used since `before` (ms): its rows, then its files.
    /// Returns how many pieces were dropped.
    pub async fn purge_remote_media(&self, before: i64) -> Result<usize> {
        let gone = self.store.purge_remote_media(before).await?;
        for (origin, media_id, variant) in &gone {
            if let Ok(origin) = <&ServerName>::try_from(origin.as_str()) {
                let _ = tokio::fs::remove_file(self.media.remote_path(origin, media_id, variant)).await;
            }
        }
        Ok(gone.len())
    }
}

impl Homeserver {
    /// With `media_retention.remote_media_lifetime`: drops, every hour, cached remote media
    /// unused for that long.
    pub async fn expire_remote_media(self: std::sync::Arc<Self>) {
        let Some(lifetime) = self.config.media_retention.remote_media_lifetime else {
            return;
        };
        let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            hourly.tick().await;
            let before = (now_ms() as i64).saturating_sub(u64::from(lifetime) as i64);
            match self.purge_remote_media(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pieces = n, "expired cached remote media"),
                Err(e) => tracing::warn!(error = %e, "cannot expire cached remote media"),
            }
        }
    }
}

/// Whether the origin does not know the authenticated media routes (a server from before Matrix
/// 1.11): Synapse's test — `M_UNRECOGNIZED`, or a 404/405 without a Matrix error of its own.
fn unknown_endpoint(e: &FederationError) -> bool {
    match e {
        FederationError::Remote { status, errcode, .. } => {
            errcode == "M_UNRECOGNIZED"
                || (matches!(status, 404 | 405) && errcode == "M_UNKNOWN")
                || *status == 501
        }
        _ => false,
    }
}

/// The origin's refusal as this server's answer: its "not found" and "not yet uploaded" pass on;
/// anything else is a bad gateway (never the origin's own status or code, which a client would
/// take as this server's — a 401 logs it out).
fn remote_error(e: FederationError) -> Error {
    match e {
        FederationError::Remote { status: 404, .. } => Error::NotFound("Media not found".to_owned()),
        FederationError::Remote { errcode, .. } if errcode == "M_NOT_YET_UPLOADED" => Error::NotYetUploaded,
        FederationError::Remote { status: 413, .. } => {
            Error::RemoteTooLarge("The origin refused: the media is too large".to_owned())
        }
        FederationError::Remote { status, message, .. } => {
            Error::BadGateway(format!("the origin answered {status}: {message}"))
        }
        e => Error::from(e),
    }
}

/// A response whose body is the file itself (the legacy routes, a `Location`): streamed to
/// `download`, then moved to `path`. Returns content type, file name and size.
async fn plain_file(
    response: reqwest::Response,
    download: &Path,
    path: &Path,
    limit: u64,
    received: &mut u64,
) -> Result<(String, Option<String>, u64)> {
    let content_type = header(&response, reqwest::header::CONTENT_TYPE);
    let disposition = header(&response, reqwest::header::CONTENT_DISPOSITION);
    let size = stream_to_file(response, download, limit, received).await?;
    crate::media::rename(download, path).await?;
    Ok((
        content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
        disposition.as_deref().and_then(filename_of),
        size,
    ))
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The boundary of a `multipart/mixed` answer.
fn boundary(response: &reqwest::Response) -> Result<String> {
    let content_type = header(response, reqwest::header::CONTENT_TYPE).unwrap_or_default();
    let (essence, params) = content_type.split_once(';').unwrap_or((&content_type, ""));
    if !essence.trim().eq_ignore_ascii_case("multipart/mixed") {
        return Err(Error::BadGateway(format!(
            "the origin answered {content_type:?}, not multipart/mixed"
        )));
    }
    params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| Error::BadGateway("a multipart answer without a boundary".to_owned()))
}

/// Writes a response body to `path`, failing once it passes `limit` bytes or breaks off (a
/// body shorter or longer than its `Content-Length` breaks off). Returns its size.
async fn stream_to_file(
    mut response: reqwest::Response,
    path: &Path,
    limit: u64,
    received: &mut u64,
) -> Result<u64> {
    let too_large = || {
        Error::RemoteTooLarge(format!(
            "The media is larger than this server takes ({limit} bytes)"
        ))
    };
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::Internal(format!("{}: {e}", parent.display())))?;
    }
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    let mut size = 0u64;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                size += chunk.len() as u64;
                *received += chunk.len() as u64;
                if size > limit {
                    return Err(too_large());
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Error::BadGateway(format!(
                    "the media broke off: {}",
                    crate::util::error_chain(&e)
                )));
            }
        }
    }
    file.flush()
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(size)
}

/// The second part of a federation media answer.
enum Part {
    /// The file, moved into place: content type, file name, size.
    File((String, Option<String>, u64)),
    /// The file is at `location`; the part's content type and file name, if it gave them.
    Elsewhere {
        location: String,
        headers: (Option<String>, Option<String>),
    },
}

/// Takes the file out of a downloaded `multipart/mixed` answer (its second part, after the JSON
/// metadata) into `path`, or finds where the part says the file is.
async fn extract_part(download: &Path, boundary: &str, path: &Path, limit: u64) -> Result<Part> {
    let bad = |why: &str| Error::BadGateway(format!("a malformed multipart answer: {why}"));
    let mut file = tokio::fs::File::open(download).await.map_err(Error::internal)?;
    let total = file.metadata().await.map_err(Error::internal)?.len();
    let mut head = vec![0u8; MULTIPART_OVERHEAD.min(total) as usize];
    file.read_exact(&mut head).await.map_err(Error::internal)?;
    let delimiter = format!("--{boundary}");
    let first = find(&head, delimiter.as_bytes(), 0).ok_or_else(|| bad("no first boundary"))?;
    let second_delimiter = format!("\r\n--{boundary}\r\n");
    let second = find(&head, second_delimiter.as_bytes(), first + delimiter.len())
        .ok_or_else(|| bad("no second part"))?;
    let headers_start = second + second_delimiter.len();
    let headers_end =
        find(&head, b"\r\n\r\n", headers_start).ok_or_else(|| bad("unterminated part headers"))?;
    let headers = String::from_utf8_lossy(&head[headers_start..headers_end]).into_owned();
    let start = (headers_end + 4) as u64;
    let part_header = |name: &str| {
        headers.split("\r\n").find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    if let Some(location) = part_header("location") {
        return Ok(Part::Elsewhere {
            location,
            headers: (
                part_header("content-type"),
                part_header("content-disposition")
                    .as_deref()
                    .and_then(filename_of),
            ),
        });
    }
    // The closing delimiter, searched for from the end.
    let tail_len = 4096.min(total.saturating_sub(start));
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(std::io::SeekFrom::Start(total - tail_len))
        .await
        .map_err(Error::internal)?;
    file.read_exact(&mut tail).await.map_err(Error::internal)?;
    let closing = format!("\r\n--{boundary}--");
    let end_in_tail = rfind(&tail, closing.as_bytes()).ok_or_else(|| bad("no closing boundary"))?;
    let end = total - tail_len + end_in_tail as u64;
    if end < start {
        return Err(bad("the parts overlap"));
    }
    let size = end - start;
    if size > limit {
        return Err(Error::RemoteTooLarge(format!(
            "The media is larger than this server takes ({limit} bytes)"
        )));
    }
    if let Some(declared) = part_header("content-length").and_then(|l| l.parse::<u64>().ok())
        && declared != size
    {
        return Err(bad(&format!(
            "the file part says {declared} bytes but holds {size}"
        )));
    }
    let temp = crate::media::sibling_temp(path);
    let copied = async {
        if let Some(parent) = temp.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut out = tokio::fs::File::create(&temp).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
        tokio::io::copy(&mut (&mut file).take(size), &mut out).await?;
        out.flush().await?;
        std::io::Result::Ok(())
    }
    .await;
    if let Err(e) = copied {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(Error::Internal(format!("{}: {e}", temp.display())));
    }
    crate::media::rename(&temp, path).await?;
    Ok(Part::File((
        part_header("content-type").unwrap_or_else(|| "application/octet-stream".to_owned()),
        part_header("content-disposition")
            .as_deref()
            .and_then(filename_of),
        size,
    )))
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// The file name a `Content-Disposition` gives (`filename*=UTF-8''…` preferred).
fn filename_of(disposition: &str) -> Option<String> {
    let params: Vec<(String, String)> = disposition
        .split(';')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if let Some((_, value)) = params.iter().find(|(k, _)| k == "filename*") {
        let encoded = value
            .strip_prefix("UTF-8''")
            .or_else(|| value.strip_prefix("utf-8''"))?;
        return percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .ok()
            .map(std::borrow::Cow::into_owned);
    }
    params
        .iter()
        .find(|(k, _)| k == "filename")
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_come_from_either_form_of_content_disposition() {
        assert_eq!(
            filename_of("inline; filename=\"cat.png\"").as_deref(),
            Some("cat.png")
        );
        assert_eq!(
            filename_of("attachment; filename=plain.txt").as_deref(),
            Some("plain.txt")
        );
        assert_eq!(
            filename_of("inline; filename*=UTF-8''%E7%8C%AB.png").as_deref(),
            Some("猫.png")
        );
        assert_eq!(filename_of("inline"), None);
    }

    #[tokio::test]
    async fn the_file_part_of_a_multipart_answer_is_taken_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let download = dir.path().join("download");
        let out = dir.path().join("out/file");
        let body = b"--XYZ\r\nContent-Type: application/json\r\n\r\n{}\r\n--XYZ\r\nContent-Type: image/png\r\nContent-Disposition: inline; filename=\"a.png\"\r\n\r\n\x89PNG\r\n--XYZ\r\nbytes\r\n--XYZ--\r\n";
        std::fs::write(&download, body).expect("write");
        let Ok(Part::File((kind, name, size))) = extract_part(&download, "XYZ", &out, 1000).await else {
            panic!("not parsed");
        };
        assert_eq!(
            (kind.as_str(), name.as_deref(), size),
            ("image/png", Some("a.png"), 18)
        );
        assert_eq!(std::fs::read(&out).expect("out"), b"\x89PNG\r\n--XYZ\r\nbytes");
        // Over the limit, a lying Content-Length, no closing boundary: nothing written.
        let out2 = dir.path().join("out/file2");
        assert!(matches!(
            extract_part(&download, "XYZ", &out2, 10).await,
            Err(Error::RemoteTooLarge(_))
        ));
        let lying = String::from_utf8_lossy(body).replace(
            "Content-Type: image/png\r\n",
            "Content-Type: image/png\r\nContent-Length: 5\r\n",
        );
        std::fs::write(&download, lying).expect("write");
        assert!(extract_part(&download, "XYZ", &out2, 1000).await.is_err());
        std::fs::write(&download, &body[..body.len() - 10]).expect("write");
        assert!(extract_part(&download, "XYZ", &out2, 1000).await.is_err());
        assert!(!out2.exists());
    }
}
