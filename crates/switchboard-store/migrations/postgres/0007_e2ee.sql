-- End-to-end encryption plumbing: device keys, one-time and fallback keys, device-list changes
-- and to-device messages. Positions come from the auxiliary stream.
CREATE TABLE device_keys (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    keys       TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE one_time_keys (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    key        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

CREATE TABLE fallback_keys (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    key        TEXT NOT NULL,
    used       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

CREATE TABLE device_list_changes (
    user_id     TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL
);
CREATE INDEX device_list_changes_pos ON device_list_changes (stream_pos);

CREATE TABLE to_device (
    stream_pos  BIGINT NOT NULL,
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    sender      TEXT NOT NULL,
    type        TEXT NOT NULL,
    content     TEXT NOT NULL
);
CREATE INDEX to_device_target ON to_device (user_id, device_id, stream_pos);

CREATE TABLE to_device_txns (
    sender     TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    txn_id     TEXT NOT NULL,
    PRIMARY KEY (sender, device_id, txn_id)
);
