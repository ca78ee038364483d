-- Account data, global (room_id = '') and per room. stream_pos orders changes for /sync; it comes
-- from the auxiliary stream (account data, and later receipts), separate from the event stream.
CREATE TABLE account_data (
    user_id     TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    type        TEXT NOT NULL,
    content     TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);
CREATE INDEX account_data_stream ON account_data (user_id, stream_pos);
