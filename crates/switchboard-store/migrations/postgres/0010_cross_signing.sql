-- Cross-signing keys (master, self_signing, user_signing) per user.
CREATE TABLE cross_signing_keys (
    user_id   TEXT NOT NULL,
    key_type  TEXT NOT NULL,
    keys      TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);
