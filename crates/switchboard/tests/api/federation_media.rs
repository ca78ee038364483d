//! Media across servers: another server's media fetched through the authenticated media routes
//! (multipart federation answers), cached, thumbnailed by its origin, bounded by
//! `max_upload_size`, purged on request — with Synapse and between Switchboards.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    harness::{User, errcode},
    media::png,
    ops::shared_secret_register,
    peers::{Peer, log_of, skip_without},
};

async fn upload(on: &Peer, user: &User, kind: &str, bytes: Vec<u8>) -> String {
    let response = on
        .server
        .http
        .post(format!(
            "{}/_matrix/media/v3/upload?filename=pic.png",
            on.server.base
        ))
        .bearer_auth(&user.token)
        .header("Content-Type", kind)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let uri = body["content_uri"].as_str().expect("content_uri");
    uri.strip_prefix("mxc://").expect("mxc").to_owned()
}

/// GETs `path` on `on` as `user` (or without a token); status, content type and bytes.
async fn get(on: &Peer, user: Option<&User>, path: &str) -> (StatusCode, String, Vec<u8>) {
    let mut request = on.server.http.get(format!("{}{path}", on.server.base));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    let response = request.send().await.expect("get");
    let status = response.status();
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, kind, response.bytes().await.expect("body").to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// Each side downloads and thumbnails the other's upload: the original byte for byte; on `a`,
/// a Switchboard, the thumbnail its origin made (Synapse makes its own of remote media, so on
/// `b` it is only checked to be a smaller image of the same picture).
async fn media_crosses(a: &Peer, b: &Peer, alice: &User, bob: &User, b_is_switchboard: bool) {
    let original = png(640, 480);
    let theirs = upload(b, bob, "image/png", original.clone()).await;
    let download = format!("/_matrix/client/v1/media/download/{theirs}");
    let (status, kind, bytes) = get(a, Some(alice), &download).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}",
        String::from_utf8_lossy(&bytes),
        log_of(a)
    );
    assert_eq!(kind, "image/png");
    assert!(bytes == original, "the download differs from the upload");
    let thumbnail = format!("/_matrix/client/v1/media/thumbnail/{theirs}?width=96&height=96&method=crop");
    let (status, kind, here) = get(a, Some(alice), &thumbnail).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&here));
    let (_, origin_kind, there) = get(b, Some(bob), &thumbnail).await;
    assert_eq!(kind, origin_kind);
    assert!(here == there, "the thumbnail is not the one its origin made");
    assert!(here != original && image::load_from_memory(&here).is_ok());

    let original = png(300, 200);
    let ours = upload(a, alice, "image/png", original.clone()).await;
    let (status, _, bytes) = get(b, Some(bob), &format!("/_matrix/client/v1/media/download/{ours}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}",
        String::from_utf8_lossy(&bytes),
        log_of(b)
    );
    assert!(bytes == original, "the download differs from the upload");
    let thumbnail = format!("/_matrix/client/v1/media/thumbnail/{ours}?width=32&height=32&method=crop");
    let (status, _, there) = get(b, Some(bob), &thumbnail).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}",
        String::from_utf8_lossy(&there),
        log_of(b)
    );
    let (_, _, here) = get(a, Some(alice), &thumbnail).await;
    if b_is_switchboard {
        assert!(here == there, "the thumbnail is not the one Switchboard made");
    } else {
        let thumb = image::load_from_memory(&there).expect("Synapse's thumbnail is an image");
        assert_eq!((thumb.width(), thumb.height()), (32, 32));
    }

    // The legacy unauthenticated route does not fetch other servers' media (Synapse's
    // `enable_authenticated_media` default); an unknown ID is the origin's 404.
    let unfetched = upload(b, bob, "image/png", png(10, 10)).await;
    let (status, _, body) = get(a, None, &format!("/_matrix/media/v3/download/{unfetched}")).await;
    assert_eq!(
        (status, errcode(&json_of(&body))),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );
    let (server, _) = theirs.split_once('/').expect("server/id");
    let (status, _, body) = get(
        a,
        Some(alice),
        &format!("/_matrix/client/v1/media/download/{server}/NoSuchMedia"),
    )
    .await;
    assert_eq!(
        (status, errcode(&json_of(&body))),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );
    // Nothing but the grammar's characters reaches a path.
    let (status, _, _) = get(
        a,
        Some(alice),
        &format!("/_matrix/client/v1/media/download/{server}/..%2F..%2Fsigning.key"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn media_crosses_both_ways_with_synapse_byte_for_byte_with_the_origins_thumbnails() {
    let Some(synapse) = Peer::synapse().await else {
        skip_without("Synapse (tests/interop/setup.sh synapse)");
        return;
    };
    let ours = Peer::switchboard("").await;
    let (alice, sam) = (
        ours.server.register("alice").await,
        synapse.server.register("sam").await,
    );
    media_crosses(&ours, &synapse, &alice, &sam, false).await;
}

#[tokio::test]
async fn media_crosses_between_switchboards_is_cached_bounded_and_purged() {
    let (a, mut b) = (
        Peer::switchboard("max_upload_size: 100K").await,
        Peer::switchboard("").await,
    );
    let (alice, bob) = (a.server.register("alice").await, b.server.register("bob").await);
    media_crosses(&a, &b, &alice, &bob, true).await;

    // Cached: served while the origin is down.
    let original = png(200, 100);
    let media = upload(&b, &bob, "image/png", original.clone()).await;
    let download = format!("/_matrix/client/v1/media/download/{media}");
    assert_eq!(get(&a, Some(&alice), &download).await.2, original);
    b.server.terminate();
    let (status, _, bytes) = get(&a, Some(&alice), &download).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == original);
    b.server.restart().await;

    // Over A's max_upload_size (100 KiB): 502 M_TOO_LARGE, and nothing kept.
    let noise: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big = upload(&b, &bob, "application/octet-stream", noise).await;
    let (status, _, body) = get(
        &a,
        Some(&alice),
        &format!("/_matrix/client/v1/media/download/{big}"),
    )
    .await;
    assert_eq!(
        (status, errcode(&json_of(&body))),
        (StatusCode::BAD_GATEWAY, "M_TOO_LARGE"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let kept: Vec<_> = walk(&a.server.dir.path().join("media/remote_content"))
        .into_iter()
        .filter(|p| {
            p.to_string_lossy()
                .contains(big.split('/').nth(1).unwrap_or_default().get(4..).unwrap_or("?"))
        })
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert!(walk(&a.server.dir.path().join("media/remote_content/incoming")).is_empty());

    // The purge (Synapse's admin API) drops the cache; the next download fetches again.
    let (_, root) = shared_secret_register(&a.server, "root", true, "test").await;
    let root = User {
        user_id: root["user_id"].as_str().expect("user_id").to_owned(),
        token: root["access_token"].as_str().expect("token").to_owned(),
        device_id: String::new(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let (status, body) = a
        .server
        .call(
            Method::POST,
            &format!("/_synapse/admin/v1/purge_media_cache?before_ts={}", now + 1),
            Some(&alice.token),
            Some(json!({})),
        )
        .await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let purged = a
        .server
        .ok(
            Method::POST,
            &format!("/_synapse/admin/v1/purge_media_cache?before_ts={}", now + 1),
            &root.token,
            json!({}),
        )
        .await;
    assert!(purged["deleted"].as_u64().unwrap_or(0) >= 3, "{purged}");
    let mut left: Vec<_> = walk(&a.server.dir.path().join("media/remote_content"));
    left.extend(walk(&a.server.dir.path().join("media/remote_thumbnails")));
    assert!(left.is_empty(), "{left:?}");
    let (status, _, bytes) = get(&a, Some(&alice), &download).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == original);
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn remote_downloads_count_against_each_users_allowance() {
    let (a, b) = (
        Peer::switchboard("remote_media_download_burst_count: 50K\nremote_media_download_per_second: 1K")
            .await,
        Peer::switchboard("").await,
    );
    let (alice, carol, bob) = (
        a.server.register("alice").await,
        a.server.register("carol").await,
        b.server.register("bob").await,
    );
    let noise = |seed: u32| -> Vec<u8> {
        (0..40_000u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    };
    let mut media = Vec::new();
    for seed in 0..3 {
        media.push(upload(&b, &bob, "application/octet-stream", noise(seed)).await);
    }
    let download = |m: &str| format!("/_matrix/client/v1/media/download/{m}");
    // 40 KB, then 40 KB more (the allowance is not yet spent before it): both fetched.
    assert_eq!(
        get(&a, Some(&alice), &download(&media[0])).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&a, Some(&alice), &download(&media[1])).await.0,
        StatusCode::OK
    );
    // Now in debt: refused, with the wait.
    let (status, _, body) = get(&a, Some(&alice), &download(&media[2])).await;
    let body = json_of(&body);
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
        "{body}"
    );
    assert!(body["retry_after_ms"].as_u64().unwrap_or(0) > 1000, "{body}");
    // The cache costs nothing, and another user has an allowance of their own.
    assert_eq!(
        get(&a, Some(&alice), &download(&media[0])).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&a, Some(&carol), &download(&media[2])).await.0,
        StatusCode::OK
    );
}

/// A federation origin that misbehaves: TLS with the test CA's certificate on 127.0.0.1, every
/// request answered with the raw HTTP `answer(path, its port)` gives, then the connection
/// closed. Returns its server name.
async fn scripted_origin(answer: fn(&str, u16) -> Vec<u8>) -> String {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::harness::tls_init();
    let dir = crate::peers::ca_dir();
    let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let path = text.split_whitespace().nth(1).unwrap_or_default().to_owned();
                let _ = tls.write_all(&answer(&path, port)).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    format!("localhost:{port}")
}

fn http(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{headers}\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn an_origin_that_lies_about_lengths_or_sends_too_much_leaves_nothing_and_old_servers_are_asked_the_old_way()
 {
    let ours = Peer::switchboard("max_upload_size: 100K").await;
    let alice = ours.server.register("alice").await;
    let origin = scripted_origin(|path, port| {
        let multipart = b"--B\r\nContent-Type: application/json\r\n\r\n{}\r\n--B\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--B--\r\n";
        if path.ends_with("/short") {
            // Says 5000 bytes, sends fewer and hangs up.
            http("200 OK", "Content-Type: multipart/mixed; boundary=B\r\nContent-Length: 5000\r\n", multipart)
        } else if path.ends_with("/huge") {
            http("200 OK", "Content-Type: multipart/mixed; boundary=B\r\nContent-Length: 10000000\r\n", multipart)
        } else if path.ends_with("/endless") {
            // No length at all, and more than max_upload_size.
            let mut body = b"--B\r\nContent-Type: application/json\r\n\r\n{}\r\n--B\r\nContent-Type: image/png\r\n\r\n".to_vec();
            body.extend(std::iter::repeat_n(b'x', 300_000));
            http("200 OK", "Content-Type: multipart/mixed; boundary=B\r\n", &body)
        } else if path.ends_with("/elsewhere") {
            // The file part points to where the file is (the spec allows it).
            let body = format!(
                "--B\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--B\r\nLocation: https://localhost:{port}/files/real\r\n\r\n\r\n--B--\r\n"
            );
            http("200 OK", "Content-Type: multipart/mixed; boundary=B\r\n", body.as_bytes())
        } else if path == "/files/real" {
            http("200 OK", "Content-Type: image/png\r\nContent-Length: 8\r\n", b"REALFILE")
        } else if path.ends_with("/unauthorized") {
            // An origin trying to make clients log out: never passed on as this server's answer.
            let body = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"who are you"}"#;
            http("401 Unauthorized", &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()), body)
        } else if path.starts_with("/_matrix/federation/v1/media/download/bare404") {
            // An old server's plain 404 for an unknown route: the legacy route is tried.
            http("404 Not Found", "Content-Length: 0\r\n", b"")
        } else if path.starts_with("/_matrix/media/v3/download/") && path.contains("/bare404") {
            http("307 Temporary Redirect", "Location: /files/moved\r\nContent-Length: 0\r\n", b"")
        } else if path == "/files/moved" {
            http("200 OK", "Content-Type: text/plain\r\nContent-Length: 5\r\n", b"moved")
        } else if path.starts_with("/_matrix/federation/v1/media/") {
            // A server from before Matrix 1.11.
            let body = br#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#;
            http("404 Not Found", &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()), body)
        } else if path.starts_with("/_matrix/media/v3/download/") {
            http(
                "200 OK",
                "Content-Type: text/plain\r\nContent-Disposition: inline; filename=\"old.txt\"\r\nContent-Length: 11\r\n",
                b"legacy body",
            )
        } else {
            http("404 Not Found", "Content-Length: 0\r\n", b"")
        }
    })
    .await;
    let fetch = |id: &str| format!("/_matrix/client/v1/media/download/{origin}/{id}");
    let (status, _, body) = get(&ours, Some(&alice), &fetch("short")).await;
    let body = json_of(&body);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("broke off"),
        "{body}"
    );
    for id in ["huge", "endless"] {
        let (status, _, body) = get(&ours, Some(&alice), &fetch(id)).await;
        assert_eq!(
            (status, errcode(&json_of(&body))),
            (StatusCode::BAD_GATEWAY, "M_TOO_LARGE"),
            "{id}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let left = walk(&ours.server.dir.path().join("media/remote_content"));
    assert!(left.is_empty(), "nothing half-stored: {left:?}");
    // The legacy route, for a server without the authenticated ones.
    let (status, kind, body) = get(&ours, Some(&alice), &fetch("oldmedia")).await;
    assert_eq!(
        (status, kind.as_str(), body.as_slice()),
        (StatusCode::OK, "text/plain", &b"legacy body"[..])
    );
    // A plain 404 for the route counts as an old server too; its legacy answer redirects.
    let (status, _, body) = get(&ours, Some(&alice), &fetch("bare404")).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"moved"[..]));
    // A file part pointing elsewhere is fetched from there.
    let (status, kind, body) = get(&ours, Some(&alice), &fetch("elsewhere")).await;
    assert_eq!(
        (status, kind.as_str(), body.as_slice()),
        (StatusCode::OK, "image/png", &b"REALFILE"[..])
    );
    // The origin's 401 is this server's 502.
    let (status, _, body) = get(&ours, Some(&alice), &fetch("unauthorized")).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
}
