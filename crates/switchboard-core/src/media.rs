//! The media repository: uploads stored as files under `media_store_path` (Synapse's
//! `local_content/aa/bb/rest` layout), metadata in the database, and thumbnails really scaled
//! (`crop` fills the box and cuts the overflow, `scale` fits inside it), cached as files.
//!
//! Downloads are streamed from disk. Thumbnails come only in the configured `thumbnail_sizes`;
//! an image is measured from its header before it is decoded, refused beyond `max_image_pixels`,
//! and decoded a few at a time, so no request can make the server read, decode or store
//! without bound.

use std::{
    io::BufReader,
    path::{Path, PathBuf},
    sync::Arc,
};

use image::{DynamicImage, ImageFormat, ImageReader, imageops::FilterType};
use ruma::{ServerName, UserId};
use switchboard_store::Store;
use tokio::sync::Semaphore;

pub use crate::config::{ThumbnailMethod as Method, ThumbnailSize};
use crate::{
    Error, Result,
    util::{now_ms, random_string},
};

/// Thumbnails decoded at once; more requests wait their turn.
const CONCURRENT_DECODES: usize = 2;

pub struct Media {
    store: Store,
    dir: PathBuf,
    pub max_upload_size: usize,
    max_image_pixels: u64,
    sizes: Vec<ThumbnailSize>,
    decoding: Arc<Semaphore>,
}

/// What a download answers with: a file read as it is sent, or bytes made for the request.
pub enum Body {
    File { file: tokio::fs::File, len: u64 },
    Bytes(Vec<u8>),
}

pub struct Content {
    pub body: Body,
    pub content_type: String,
    pub filename: Option<String>,
}

impl Media {
    pub fn new(
        store: Store,
        dir: PathBuf,
        max_upload_size: usize,
        max_image_pixels: u64,
        sizes: Vec<ThumbnailSize>,
    ) -> Self {
        Self {
            store,
            dir,
            max_upload_size,
            max_image_pixels,
            sizes,
            decoding: Arc::new(Semaphore::new(CONCURRENT_DECODES)),
        }
    }

    fn path(&self, media_id: &str) -> PathBuf {
        let (a, rest) = media_id.split_at(2.min(media_id.len()));
        let (b, rest) = rest.split_at(2.min(rest.len()));
        self.dir.join("local_content").join(a).join(b).join(rest)
    }

    /// Where other servers' media is cached.
    pub(crate) fn remote_root(&self) -> PathBuf {
        self.dir.join("remote_content")
    }

    /// The cached file of another server's media: the original under `remote_content/`, its
    /// thumbnails (`variant`) apart under `remote_thumbnails/`, so no media ID can name another's
    /// file. The whole ID is the file name (a short one cannot name a directory).
    pub(crate) fn remote_path(&self, origin: &ServerName, media_id: &str, variant: &str) -> PathBuf {
        let (a, rest) = media_id.split_at(2.min(media_id.len()));
        let b = &rest[..2.min(rest.len())];
        let root = if variant.is_empty() {
            self.remote_root()
        } else {
            self.dir.join("remote_thumbnails")
        };
        let file = root.join(origin.as_str()).join(a).join(b).join(media_id);
        if variant.is_empty() {
            file
        } else {
            file.join(variant)
        }
    }

    /// A new file name for a download in progress.
    pub(crate) fn temp_path(&self) -> PathBuf {
        self.remote_root().join("incoming").join(random_string(16))
    }

    /// `POST /_matrix/media/v1/create`: reserves an ID to upload to later.
    pub async fn create(&self, uploader: &UserId) -> Result<String> {
        let media_id = random_string(24);
        self.store
            .create_media(&media_id, uploader.as_str(), now_ms() as i64)
            .await?;
        Ok(media_id)
    }

    /// `POST /upload`: stores new content and returns its media ID.
    pub async fn upload(
        &self,
        uploader: &UserId,
        content_type: Option<&str>,
        filename: Option<&str>,
        bytes: &[u8],
    ) -> Result<String> {
        let media_id = self.create(uploader).await?;
        self.store_content(&media_id, content_type, filename, bytes)
            .await?;
        Ok(media_id)
    }

    /// `PUT /upload/{server}/{mediaId}`: fills a reserved ID, once, by whoever reserved it.
    pub async fn upload_to(
        &self,
        uploader: &UserId,
        media_id: &str,
        content_type: Option<&str>,
        filename: Option<&str>,
        bytes: &[u8],
    ) -> Result<()> {
        let (owner, _, _, uploaded) = self
            .store
            .media(media_id)
            .await?
            .ok_or_else(|| Error::NotFound("Unknown media ID".to_owned()))?;
        if owner != uploader.as_str() {
            return Err(Error::Forbidden(
                "This media ID was created by someone else".to_owned(),
            ));
        }
        if uploaded {
            return Err(Error::CannotOverwriteMedia);
        }
        self.store_content(media_id, content_type, filename, bytes).await
    }

    async fn store_content(
        &self,
        media_id: &str,
        content_type: Option<&str>,
        filename: Option<&str>,
        bytes: &[u8],
    ) -> Result<()> {
        if bytes.len() > self.max_upload_size {
            return Err(Error::TooLarge(format!(
                "Upload is larger than {} bytes",
                self.max_upload_size
            )));
        }
        let path = self.path(media_id);
        write_file(&path, bytes).await?;
        if !self
            .store
            .finish_media(media_id, content_type, filename, bytes.len() as i64)
            .await?
        {
            return Err(Error::CannotOverwriteMedia);
        }
        Ok(())
    }

    /// The stored facts of uploaded local media: content type and file name. (Other servers'
    /// media goes through `crate::federation::media`.)
    async fn uploaded(
        &self,
        server: &ServerName,
        own: &ServerName,
        media_id: &str,
    ) -> Result<(String, Option<String>)> {
        if server != own {
            return Err(Error::NotFound("Media not found".to_owned()));
        }
        let (_, content_type, filename, uploaded) = self
            .store
            .media(media_id)
            .await?
            .ok_or_else(|| Error::NotFound("Media not found".to_owned()))?;
        if !uploaded {
            return Err(Error::NotYetUploaded);
        }
        Ok((
            content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
            filename,
        ))
    }

    /// The content of local media, opened to be streamed.
    pub async fn download(&self, server: &ServerName, own: &ServerName, media_id: &str) -> Result<Content> {
        let (content_type, filename) = self.uploaded(server, own, media_id).await?;
        Ok(Content {
            body: open(&self.path(media_id)).await?,
            content_type,
            filename,
        })
    }

    /// A thumbnail in one of the configured sizes, no larger than the original, made once and
    /// then served from disk.
    pub async fn thumbnail(
        &self,
        server: &ServerName,
        own: &ServerName,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
    ) -> Result<Content> {
        let (content_type, _) = self.uploaded(server, own, media_id).await?;
        let size = pick_size(&self.sizes, width, height, method);
        let cached = self.dir.join("thumbnails").join(format!(
            "{media_id}-{}x{}-{:?}",
            size.width, size.height, size.method
        ));
        let format = match content_type.as_str() {
            "image/jpeg" => ImageFormat::Jpeg,
            _ => ImageFormat::Png,
        };
        let content_type = if format == ImageFormat::Jpeg {
            "image/jpeg"
        } else {
            "image/png"
        }
        .to_owned();
        if let Ok(body) = open(&cached).await {
            return Ok(Content {
                body,
                content_type,
                filename: None,
            });
        }
        let _turn = self
            .decoding
            .acquire()
            .await
            .map_err(|_| Error::internal("decoder semaphore closed"))?;
        let (original, max_pixels) = (self.path(media_id), self.max_image_pixels);
        let bytes = tokio::task::spawn_blocking(move || render(&original, size, format, max_pixels))
            .await
            .map_err(Error::internal)??;
        write_file(&cached, &bytes).await?;
        Ok(Content {
            body: Body::Bytes(bytes),
            content_type,
            filename: None,
        })
    }
}

/// The configured thumbnail size that best answers a request: the smallest of the requested
/// method covering the box, else the largest of that method (either method if the list has none
/// of it) — Synapse's choice among pregenerated sizes.
fn pick_size(sizes: &[ThumbnailSize], width: u32, height: u32, method: Method) -> ThumbnailSize {
    let same: Vec<&ThumbnailSize> = sizes.iter().filter(|s| s.method == method).collect();
    let candidates = if same.is_empty() {
        sizes.iter().collect()
    } else {
        same
    };
    let area = |s: &&&ThumbnailSize| u64::from(s.width) * u64::from(s.height);
    let covering = candidates
        .iter()
        .filter(|s| s.width >= width && s.height >= height)
        .min_by_key(area);
    match covering.or_else(|| candidates.iter().max_by_key(area)) {
        Some(size) => **size,
        // The config refuses an empty list.
        None => ThumbnailSize {
            width,
            height,
            method,
        },
    }
}

pub(crate) async fn open(path: &Path) -> Result<Body> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::Internal(format!("media file {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| Error::Internal(format!("media file {}: {e}", path.display())))?
        .len();
    Ok(Body::File { file, len })
}

/// Measures the image from its header, refuses it beyond `max_pixels` (the spec's 413 for content
/// too large to thumbnail), then decodes it with the decoder's allocations bounded to match.
fn render(original: &Path, size: ThumbnailSize, format: ImageFormat, max_pixels: u64) -> Result<Vec<u8>> {
    let unreadable =
        |e: &dyn std::fmt::Display| Error::BadState(format!("Cannot make a thumbnail of this media: {e}"));
    let reader = || -> Result<ImageReader<BufReader<std::fs::File>>> {
        let file = std::fs::File::open(original).map_err(Error::internal)?;
        ImageReader::new(BufReader::new(file))
            .with_guessed_format()
            .map_err(|e| unreadable(&e))
    };
    let (width, height) = reader()?.into_dimensions().map_err(|e| unreadable(&e))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Error::TooLarge(format!(
            "The image ({width}×{height}) is too large to thumbnail (max_image_pixels {max_pixels})"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Room for the decoded pixels at up to 16 bytes each (RGBA, 32-bit float) and the decoder's own.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(64 << 20));
    let mut reader = reader()?;
    reader.limits(limits);
    let image = reader.decode().map_err(|e| unreadable(&e))?;
    let thumbnail = thumbnail_image(&image, size.width, size.height, size.method);
    let mut out = std::io::Cursor::new(Vec::new());
    thumbnail.write_to(&mut out, format).map_err(Error::internal)?;
    Ok(out.into_inner())
}

/// Never upscales: a box larger than the image gives the image's own size.
pub fn thumbnail_image(image: &DynamicImage, width: u32, height: u32, method: Method) -> DynamicImage {
    let (w, h) = (width.min(image.width()), height.min(image.height()));
    match method {
        Method::Scale => image.resize(w, h, FilterType::Triangle),
        Method::Crop => image.resize_to_fill(w, h, FilterType::Triangle),
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
async fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::Internal(format!("{}: {e}", parent.display())))?;
    }
    let tmp = sibling_temp(path);
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?;
    rename(&tmp, path).await
}

/// A temporary file beside `path`, unique per write: two requests making the same file must
/// not share one.
pub(crate) fn sibling_temp(path: &Path) -> PathBuf {
    path.with_extension(format!("tmp{}", random_string(8)))
}

/// Moves a finished file into place (creating its directory).
pub(crate) async fn rename(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::Internal(format!("{}: {e}", parent.display())))?;
    }
    tokio::fs::rename(from, to)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", to.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_fills_scale_fits_never_upscales() {
        let image = DynamicImage::new_rgb8(400, 200);
        let crop = thumbnail_image(&image, 100, 100, Method::Crop);
        assert_eq!((crop.width(), crop.height()), (100, 100));
        let scale = thumbnail_image(&image, 100, 100, Method::Scale);
        assert_eq!((scale.width(), scale.height()), (100, 50));
        let big = thumbnail_image(&image, 1000, 1000, Method::Scale);
        assert_eq!((big.width(), big.height()), (400, 200));
    }

    #[test]
    fn requests_are_answered_from_the_configured_sizes_only() {
        let sizes = crate::config::Config::parse(
            "server_name: x\nlisteners: [{port: 1, resources: [{names: [client]}]}]\n",
            "t.yaml",
            Path::new("/"),
        )
        .expect("config")
        .thumbnail_sizes;
        let size = |w, h, m| {
            let s = pick_size(&sizes, w, h, m);
            (s.width, s.height, s.method)
        };
        assert_eq!(size(20, 20, Method::Crop), (32, 32, Method::Crop));
        assert_eq!(size(50, 25, Method::Crop), (96, 96, Method::Crop));
        assert_eq!(
            size(500, 500, Method::Crop),
            (96, 96, Method::Crop),
            "the largest crop"
        );
        assert_eq!(size(300, 200, Method::Scale), (320, 240, Method::Scale));
        assert_eq!(size(5000, 5000, Method::Scale), (800, 600, Method::Scale));
        let mut seen = std::collections::HashSet::new();
        for w in 1..900 {
            for h in [1, 50, 200, 500, 900] {
                for method in [Method::Crop, Method::Scale] {
                    seen.insert(size(w, h, method));
                }
            }
        }
        let configured: std::collections::HashSet<_> =
            sizes.iter().map(|s| (s.width, s.height, s.method)).collect();
        assert_eq!(
            seen, configured,
            "every request lands on one of the configured sizes"
        );
    }
}
