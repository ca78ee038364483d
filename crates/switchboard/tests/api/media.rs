//! The media repository: upload, download byte for byte, thumbnails really scaled, async upload.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, errcode};

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::DynamicImage::new_rgb8(width, height);
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

#[tokio::test]
async fn upload_download_thumbnail() {
    let s = Server::start_with(&format!(
        "{}\nmax_upload_size: 100K",
        crate::harness::RELAXED_LIMITS
    ))
    .await;
    let alice = s.register("alice").await;
    let client = reqwest::Client::new();
    let bytes = png(200, 100);
    let uploaded: Value = client
        .post(format!("{}/_matrix/media/v3/upload?filename=pic.png", s.base))
        .bearer_auth(&alice.token)
        .header("Content-Type", "image/png")
        .body(bytes.clone())
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    let uri = uploaded["content_uri"].as_str().expect("content_uri");
    let media = uri.strip_prefix("mxc://").expect("mxc");

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

    for (method, expected) in [("crop", (32, 32)), ("scale", (32, 16))] {
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
async fn async_upload_to_a_reserved_id() {
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
