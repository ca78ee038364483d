-- Other servers' signing keys: every key ever seen, so old signatures stay verifiable.
CREATE TABLE server_keys (
    server_name     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    verify_key      TEXT NOT NULL,
    -- Until when the server vouched for the key (its response's valid_until_ts).
    valid_until_ts  BIGINT NOT NULL,
    -- Set for a key the server lists under old_verify_keys.
    expired_ts      BIGINT,
    PRIMARY KEY (server_name, key_id)
);

-- The newest signed key response of each server, served again when this server acts as a notary.
CREATE TABLE server_key_responses (
    server_name     TEXT PRIMARY KEY,
    response        TEXT NOT NULL,
    valid_until_ts  BIGINT NOT NULL
);
