//! The media repository: uploads stored as files under `media_store_path` (Synapse's
//! `local_content/aa/bb/rest` layout), metadata in the database, and thumbnails really scaled
//! (`crop` fills the box and cuts the overflow, `scale` fits inside it), cached as files.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, imageops::FilterType};
use ruma::{ServerName, UserId};
use switchboard_store::Store;

use crate::{
    Error, Result,
    util::{now_ms, random_string},
};

pub struct Media {
    store: Store,
    dir: PathBuf,
    pub max_upload_size: usize,
}

pub struct Content {
    pub bytes: Vec<u8>,
    pub content_type: String,
    pub filename: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Crop,
    Scale,
}

impl Media {
    pub fn new(store: Store, dir: PathBuf, max_upload_size: usize) -> Self {
        Self {
            store,
            dir,
            max_upload_size,
        }
    }

    fn path(&self, media_id: &str) -> PathBuf {
        let (a, rest) = media_id.split_at(2.min(media_id.len()));
        let (b, rest) = rest.split_at(2.min(rest.len()));
        self.dir.join("local_content").join(a).join(b).join(rest)
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

    /// The content of local media. Remote media would need federation, which is not built.
    pub async fn download(&self, server: &ServerName, own: &ServerName, media_id: &str) -> Result<Content> {
        if server != own {
            return Err(Error::NotFound(
                "Remote media is not available: federation is not supported".to_owned(),
            ));
        }
        let (_, content_type, filename, uploaded) = self
            .store
            .media(media_id)
            .await?
            .ok_or_else(|| Error::NotFound("Media not found".to_owned()))?;
        if !uploaded {
            return Err(Error::NotYetUploaded);
        }
        let bytes = tokio::fs::read(self.path(media_id))
            .await
            .map_err(|e| Error::Internal(format!("media file {media_id}: {e}")))?;
        Ok(Content {
            bytes,
            content_type: content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
            filename,
        })
    }

    /// A thumbnail no larger than the original, generated once and then served from disk.
    pub async fn thumbnail(
        &self,
        server: &ServerName,
        own: &ServerName,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
    ) -> Result<Content> {
        let original = self.download(server, own, media_id).await?;
        // Requests snap to Synapse's standard sizes, so nobody can fill the disk with one
        // thumbnail per pixel size.
        let (width, height) = snap(width, height);
        let cached = self
            .dir
            .join("thumbnails")
            .join(format!("{media_id}-{width}x{height}-{method:?}"));
        let format = match original.content_type.as_str() {
            "image/jpeg" => ImageFormat::Jpeg,
            _ => ImageFormat::Png,
        };
        let content_type = if format == ImageFormat::Jpeg {
            "image/jpeg"
        } else {
            "image/png"
        }
        .to_owned();
        if let Ok(bytes) = tokio::fs::read(&cached).await {
            return Ok(Content {
                bytes,
                content_type,
                filename: None,
            });
        }
        let bytes =
            tokio::task::spawn_blocking(move || render(&original.bytes, width, height, method, format))
                .await
                .map_err(Error::internal)??;
        write_file(&cached, &bytes).await?;
        Ok(Content {
            bytes,
            content_type,
            filename: None,
        })
    }
}

/// The smallest standard size covering the request (32, 96, 320, 640, 800 px).
fn snap(width: u32, height: u32) -> (u32, u32) {
    const SIZES: [u32; 5] = [32, 96, 320, 640, 800];
    let pick = |n: u32| SIZES.iter().copied().find(|s| *s >= n).unwrap_or(800);
    let side = pick(width.max(height));
    let scale = |n: u32| ((n as u64 * side as u64) / width.max(height).max(1) as u64).max(1) as u32;
    (scale(width), scale(height))
}

fn render(bytes: &[u8], width: u32, height: u32, method: Method, format: ImageFormat) -> Result<Vec<u8>> {
    let image = image::load_from_memory(bytes)
        .map_err(|e| Error::BadState(format!("Cannot make a thumbnail of this media: {e}")))?;
    let thumbnail = thumbnail_image(&image, width, height, method);
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
    // Unique per write: two requests rendering the same thumbnail must not share a file.
    let tmp = path.with_extension(format!("tmp{}", random_string(8)));
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(())
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
        assert_eq!(snap(32, 32), (32, 32));
        assert_eq!(snap(50, 25), (96, 48), "snaps up, keeping the requested shape");
        assert_eq!(snap(5000, 5000), (800, 800));
        let big = thumbnail_image(&image, 1000, 1000, Method::Scale);
        assert_eq!((big.width(), big.height()), (400, 200));
    }
}
