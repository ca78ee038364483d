-- PostgreSQL twin of migrations/sqlite/0001_core.sql: the same tables, BIGINT for integers,
-- BOOLEAN for flags.
-- Accounts, devices and access tokens.
CREATE TABLE users (
    user_id        TEXT PRIMARY KEY,
    password_hash  TEXT,
    is_admin       BOOLEAN NOT NULL DEFAULT FALSE,
    appservice_id  TEXT,
    displayname    TEXT,
    avatar_url     TEXT,
    deactivated    BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts     BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id       TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    display_name  TEXT,
    created_ts    BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Only a SHA-256 of each token is stored: a leaked database does not leak sessions.
CREATE TABLE access_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    created_ts  BIGINT NOT NULL
);
CREATE INDEX access_tokens_user ON access_tokens (user_id, device_id);

CREATE TABLE rooms (
    room_id       TEXT PRIMARY KEY,
    room_version  TEXT NOT NULL,
    creator       TEXT NOT NULL,
    created_ts    BIGINT NOT NULL
);

-- Every accepted event, in the one global stream order. Positions come from the sequence below:
-- a failed transaction leaves a gap, and readers never assume the stream is gap-free.
-- Keep CACHE 1 (the default): with a per-connection cache, connections would hand out
-- interleaved ranges and positions would no longer ascend in the order they were reserved.
CREATE SEQUENCE events_stream_pos;
CREATE TABLE events (
    stream_pos  BIGINT PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    room_id     TEXT NOT NULL,
    sender      TEXT NOT NULL,
    type        TEXT NOT NULL,
    state_key   TEXT,
    depth       BIGINT NOT NULL,
    pdu         TEXT NOT NULL,
    unsigned    TEXT,
    txn_device  TEXT,
    txn_id      TEXT
);
CREATE INDEX events_room_pos ON events (room_id, stream_pos);
CREATE INDEX events_room_state ON events (room_id, type, state_key, stream_pos) WHERE state_key IS NOT NULL;

-- The current state of each room; membership is copied out of member events for quick lookups.
CREATE TABLE current_state (
    room_id     TEXT NOT NULL,
    type        TEXT NOT NULL,
    state_key   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL,
    membership  TEXT,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE INDEX current_state_members ON current_state (state_key, membership) WHERE type = 'm.room.member';

-- Client transaction IDs, written in the same database transaction as the event: a retry after a
-- crash finds the original event. The spec scopes a txn ID to the request path, hence room and type.
CREATE TABLE event_txns (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    txn_id      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id, event_type, txn_id)
);

CREATE TABLE room_aliases (
    alias    TEXT PRIMARY KEY,
    room_id  TEXT NOT NULL,
    creator  TEXT NOT NULL
);
CREATE INDEX room_aliases_room ON room_aliases (room_id);

CREATE TABLE filters (
    user_id    TEXT NOT NULL,
    filter_id  BIGINT NOT NULL,
    filter     TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

-- Rooms a user has forgotten; cleared by any new membership of theirs in the room.
CREATE TABLE forgotten_rooms (
    user_id  TEXT NOT NULL,
    room_id  TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
