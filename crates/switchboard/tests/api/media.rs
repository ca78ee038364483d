//! The media repository: upload, download byte for byte, thumbnails really scaled, async upload.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, errcode};

pub(crate) fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::DynamicImage::new_rgb8(width, height);
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

#[tokio::test]
async fn uploads_download_byte_for_byte_thumbnail_to_configured_sizes_and_honour_max_upload_size() {
    let s = Server::start_with(&format!(
        "{}\nmax_upload_size: 100K",
        crate::harness::RELAXED_LIMITS
    ))
    .await;
    let alice = s.register("alice").await;
    let client = reqwest::Client::new();
    let bytes = png(1000, 500);
    let media = upload_named(&s, &alice.token, "image/png", bytes.clone(), "?filename=pic.png").await;

    let response = client
        .get(format!("{}/_matrix/media/v3/download/{media}", s.base))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert!(
        response.headers()["content-disposition"]
            .to_str()
            .expect("ascii")
            .contains("pic.png")
    );
    assert_eq!(
        response.bytes().await.expect("bytes").to_vec(),
        bytes,
        "byte for byte"
    );

    let authed = client
        .get(format!("{}/_matrix/client/v1/media/download/{media}", s.base))
        .send()
        .await
        .expect("download");
    assert_eq!(
        authed.status(),
        StatusCode::UNAUTHORIZED,
        "the authenticated route needs a token"
    );

    // The nearest configured sizes: 32×32 crop, and 320×240 scale (the spec lets a thumbnail be
    // larger than asked).
    for (method, expected) in [("crop", (32, 32)), ("scale", (320, 160))] {
        let thumb = client
            .get(format!(
                "{}/_matrix/client/v1/media/thumbnail/{media}?width=32&height=32&method={method}",
                s.base
            ))
            .bearer_auth(&alice.token)
            .send()
            .await
            .expect("thumbnail");
        assert_eq!(thumb.status(), StatusCode::OK);
        let image = image::load_from_memory(&thumb.bytes().await.expect("bytes")).expect("an image");
        assert_eq!((image.width(), image.height()), expected, "{method}");
    }

    let config = s
        .ok(
            Method::GET,
            "/_matrix/client/v1/media/config",
            &alice.token,
            Value::Null,
        )
        .await;
    assert_eq!(config["m.upload.size"], 100 * 1024);
    let too_big = client
        .post(format!("{}/_matrix/media/v3/upload", s.base))
        .bearer_auth(&alice.token)
        .body(vec![0u8; 200 * 1024])
        .send()
        .await
        .expect("upload");
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (status, body) = s
        .call(
            Method::GET,
            "/_matrix/media/v3/download/localhost/nothing",
            None,
            None,
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
}

#[tokio::test]
async fn a_reserved_media_id_is_filled_once_and_only_by_its_creator() {
    let s = Server::start().await;
    let (alice, bob) = (s.register("alice").await, s.register("bob").await);
    let created = s
        .ok(Method::POST, "/_matrix/media/v1/create", &alice.token, json!({}))
        .await;
    let media = created["content_uri"]
        .as_str()
        .expect("uri")
        .strip_prefix("mxc://")
        .expect("mxc")
        .to_owned();
    assert!(created["unused_expires_at"].is_u64());
    let (status, body) = s
        .call(
            Method::GET,
            &format!("/_matrix/media/v3/download/{media}"),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED")
    );

    let client = reqwest::Client::new();
    let put = |token: &str| {
        client
            .put(format!("{}/_matrix/media/v3/upload/{media}", s.base))
            .bearer_auth(token.to_owned())
            .header("Content-Type", "text/plain")
            .body("hello")
            .send()
    };
    assert_eq!(
        put(&bob.token).await.expect("put").status(),
        StatusCode::FORBIDDEN,
        "not bob's ID"
    );
    assert_eq!(put(&alice.token).await.expect("put").status(), StatusCode::OK);
    let again = put(&alice.token).await.expect("put");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(
        again.json::<Value>().await.expect("json")["errcode"],
        "M_CANNOT_OVERWRITE_MEDIA"
    );
    let text = client
        .get(format!("{}/_matrix/media/v3/download/{media}", s.base))
        .send()
        .await
        .expect("get");
    assert_eq!(text.text().await.expect("text"), "hello");
}

async fn upload(s: &Server, token: &str, content_type: &str, bytes: Vec<u8>) -> String {
    upload_named(s, token, content_type, bytes, "").await
}

/// Uploads with `query` (`?filename=…` or empty) after the path; returns `server/mediaId`.
async fn upload_named(s: &Server, token: &str, content_type: &str, bytes: Vec<u8>, query: &str) -> String {
    let uploaded: Value = s
        .http
        .post(format!("{}/_matrix/media/v3/upload{query}", s.base))
        .bearer_auth(token)
        .header("Content-Type", content_type)
        .body(bytes)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    uploaded["content_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix("mxc://"))
        .expect("mxc")
        .to_owned()
}

/// Only types a browser shows harmlessly are `inline`; SVG, HTML, XML and JavaScript are
/// downloads. Every media answer, errors included, says `nosniff`.
#[tokio::test]
async fn media_that_could_run_script_is_served_as_an_attachment() {
    let s = Server::start().await;
    let alice = s.register("alice").await;
    for (kind, disposition) in [
        ("image/svg+xml", "attachment"),
        ("text/html; charset=utf-8", "attachment"),
        ("application/xhtml+xml", "attachment"),
        ("text/xml", "attachment"),
        ("application/javascript", "attachment"),
        ("image/png", "inline"),
        ("text/plain; charset=utf-8", "inline"),
        ("IMAGE/JPEG", "inline"),
    ] {
        let media = upload(&s, &alice.token, kind, b"<svg onload=alert(1)/>".to_vec()).await;
        let response = s
            .http
            .get(format!("{}/_matrix/client/v1/media/download/{media}", s.base))
            .bearer_auth(&alice.token)
            .send()
            .await
            .expect("download");
        let headers = response.headers();
        let served = headers["content-disposition"].to_str().expect("ascii");
        assert!(served.starts_with(disposition), "{kind}: {served}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{kind}");
    }
    let missing = s
        .http
        .get(format!("{}/_matrix/media/v3/download/localhost/nothing", s.base))
        .send()
        .await
        .expect("download");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["x-content-type-options"],
        "nosniff",
        "errors too"
    );
}

/// Thumbnails come only in the configured sizes, so requests for a thousand sizes store at most
/// as many files as the list has; an image beyond `max_image_pixels` is refused from its header
/// (the spec's 413) without being decoded.
#[tokio::test]
async fn thumbnails_come_in_configured_sizes_and_within_max_image_pixels() {
    let s = Server::start_with(&format!(
        "{}\nmax_image_pixels: 100K\nthumbnail_sizes: [{{width: 32, height: 32, method: crop}}, {{width: 64, height: 48, method: scale}}]\n",
        crate::harness::RELAXED_LIMITS
    ))
    .await;
    let alice = s.register("alice").await;
    let thumbnail = |media: String, width: u32, height: u32, method: &'static str| {
        let request = s
            .http
            .get(format!(
                "{}/_matrix/client/v1/media/thumbnail/{media}?width={width}&height={height}&method={method}",
                s.base
            ))
            .bearer_auth(&alice.token);
        async move { request.send().await.expect("thumbnail") }
    };
    let media = upload(&s, &alice.token, "image/png", png(300, 200)).await;
    for side in 1..40 {
        for method in ["crop", "scale"] {
            let answer = thumbnail(media.clone(), side * 3, 100 - side, method).await;
            assert_eq!(answer.status(), StatusCode::OK);
        }
    }
    let stored = std::fs::read_dir(s.dir.path().join("media/thumbnails"))
        .expect("thumbnails")
        .count();
    assert_eq!(stored, 2, "one file per configured size");
    let scaled = thumbnail(media, 500, 500, "scale").await;
    let image = image::load_from_memory(&scaled.bytes().await.expect("bytes")).expect("image");
    assert_eq!(
        (image.width(), image.height()),
        (64, 43),
        "the largest configured scale"
    );

    // 400 × 300 = 120,000 pixels > 100K (102,400).
    let big = upload(&s, &alice.token, "image/png", png(400, 300)).await;
    let answer = thumbnail(big, 32, 32, "crop").await;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = answer.json().await.expect("json");
    assert_eq!(errcode(&body), "M_TOO_LARGE");

    // A PNG header claiming 60,000 × 60,000 pixels: refused before any decoding is tried.
    let mut bomb = png(1, 1);
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let bomb = upload(&s, &alice.token, "image/png", bomb).await;
    let answer = thumbnail(bomb, 32, 32, "crop").await;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// A download is streamed from disk: serving a 40 MB file to a slow reader does not put the file
/// in the server's memory.
#[tokio::test]
async fn downloads_stream_from_disk_instead_of_memory() {
    let mut s = Server::start().await;
    let alice = s.register("alice").await;
    let size = 40 * 1024 * 1024;
    let media = upload(&s, &alice.token, "application/octet-stream", vec![7u8; size]).await;
    // A fresh process, so the upload's buffers are not what is measured.
    s.restart().await;
    let before = s.rss_kib().expect("rss");
    let mut response = s
        .http
        .get(format!("{}/_matrix/client/v1/media/download/{media}", s.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("download");
    assert_eq!(response.content_length(), Some(size as u64));
    let mut received = response.chunk().await.expect("chunk").map_or(0, |c| c.len());
    // The reader stalls; the server holds what it has read so far.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let during = s.rss_kib().expect("rss");
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        received += chunk.len();
    }
    assert_eq!(received, size, "every byte arrives");
    assert!(
        during.saturating_sub(before) < 16 * 1024,
        "the server grew by {} KiB while serving a {} KiB file",
        during.saturating_sub(before),
        size / 1024
    );
}

/// CRC-32 as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
