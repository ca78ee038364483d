-- Read receipts, latest per (room, type, user, thread); stream_pos is on the auxiliary stream.
CREATE TABLE receipts (
    room_id       TEXT NOT NULL,
    receipt_type  TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    thread_id     TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    ts            BIGINT NOT NULL,
    stream_pos    BIGINT NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_stream ON receipts (stream_pos);
