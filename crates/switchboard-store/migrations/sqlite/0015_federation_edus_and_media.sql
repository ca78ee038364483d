-- EDUs waiting for another server: typing, receipts, presence, device-list and cross-signing
-- updates, to-device messages. Sent with the destination's next transaction and deleted once it
-- answered. An EDU with a replace_key replaces a waiting one with the same key (only a user's
-- latest typing state, receipt or presence matters; a retried to-device send is not doubled).
CREATE TABLE federation_edus (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination  TEXT NOT NULL,
    edu_type     TEXT NOT NULL,
    content      TEXT NOT NULL,
    replace_key  TEXT,
    created_ts   BIGINT NOT NULL
);
CREATE INDEX federation_edus_destination ON federation_edus (destination, id);

-- The device a device-list change is about (NULL: the user's cross-signing keys).
ALTER TABLE device_list_changes ADD COLUMN device_id TEXT;

-- Other servers' users whose device lists this server keeps (their keys are in device_keys and
-- cross_signing_keys like local ones): the last update's stream_id, and whether an update was
-- missed, so the list must be fetched again before it is used.
CREATE TABLE remote_device_lists (
    user_id    TEXT PRIMARY KEY,
    stream_id  BIGINT NOT NULL,
    stale      BOOLEAN NOT NULL DEFAULT FALSE
);

-- Other servers' media fetched for local clients, cached as files under
-- media_store_path/remote_content: the original (variant '') and thumbnails as the origin made
-- them (variant '<width>x<height>-<method>'). last_access_ts says what the purge may drop.
CREATE TABLE remote_media (
    origin          TEXT NOT NULL,
    media_id        TEXT NOT NULL,
    variant         TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    filename        TEXT,
    size            BIGINT NOT NULL,
    created_ts      BIGINT NOT NULL,
    last_access_ts  BIGINT NOT NULL,
    PRIMARY KEY (origin, media_id, variant)
);
CREATE INDEX remote_media_access ON remote_media (last_access_ts);

-- Signatures a user made on another user's master key (with their user-signing key): kept apart
-- from the key, which its owner's server may replace, and shown only to the signer (the spec's
-- rule; Synapse's e2e_cross_signing_signatures).
CREATE TABLE cross_signing_signatures (
    signer          TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    signing_key_id  TEXT NOT NULL,
    signature       TEXT NOT NULL,
    PRIMARY KEY (signer, user_id, key_id, signing_key_id)
);
