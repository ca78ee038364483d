-- Media metadata; the bytes live in files under media_store_path.
CREATE TABLE media (
    media_id      TEXT PRIMARY KEY,
    uploader      TEXT NOT NULL,
    content_type  TEXT,
    filename      TEXT,
    size          BIGINT,
    created_ts    BIGINT NOT NULL,
    -- 0 while created by /media/v1/create and waiting for its upload.
    uploaded      BOOLEAN NOT NULL DEFAULT FALSE
);
