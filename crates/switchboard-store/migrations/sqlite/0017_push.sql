-- What the push rules of each local member said about each event (only events that notify or
-- highlight): the source of unread counts, /notifications and what pushers send. thread_id is
-- 'main' or the thread's root.
CREATE TABLE event_push_actions (
    user_id     TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    thread_id   TEXT NOT NULL,
    notify      BOOLEAN NOT NULL,
    highlight   BOOLEAN NOT NULL,
    actions     TEXT NOT NULL,
    PRIMARY KEY (user_id, stream_pos)
);
CREATE INDEX event_push_actions_room ON event_push_actions (user_id, room_id, stream_pos);

-- How far a user has read a room, per thread ('' = every thread: an unthreaded receipt), from
-- their read receipts and their own messages. Counts are of push actions after it.
CREATE TABLE push_read_positions (
    user_id     TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    thread_id   TEXT NOT NULL,
    stream_pos  BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, thread_id)
);

-- The push-rule evaluator's place in the event stream (one row): it resumes there after a
-- restart. Written first at the stream's head, so an upgrade does not evaluate old history.
CREATE TABLE push_progress (
    id             INTEGER PRIMARY KEY,
    evaluated_pos  BIGINT NOT NULL
);

-- Pushers (POST /pushers/set). sent_pos: the last push action handed to the gateway;
-- failing_since: when the gateway last started failing (NULL while it answers).
CREATE TABLE pushers (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id              TEXT NOT NULL,
    device_id            TEXT NOT NULL,
    kind                 TEXT NOT NULL,
    app_id               TEXT NOT NULL,
    pushkey              TEXT NOT NULL,
    app_display_name     TEXT NOT NULL,
    device_display_name  TEXT NOT NULL,
    profile_tag          TEXT,
    lang                 TEXT NOT NULL,
    data                 TEXT NOT NULL,
    created_ts           BIGINT NOT NULL,
    sent_pos             BIGINT NOT NULL,
    failing_since        BIGINT,
    UNIQUE (user_id, app_id, pushkey)
);
CREATE INDEX pushers_app_pushkey ON pushers (app_id, pushkey);
