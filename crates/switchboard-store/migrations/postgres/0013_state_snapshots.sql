-- The state of a room after each event, for state resolution when servers' histories fork.
-- A snapshot is its parent's state plus `delta` (a JSON object: "<type>\u001f<state_key>" →
-- event ID); past a chain of 50 a full snapshot (no parent) is written instead. Events that
-- change no state share their predecessor's snapshot.
CREATE TABLE state_snapshots (
    snapshot_id  BIGINT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    parent_id    BIGINT,
    chain        BIGINT NOT NULL,
    delta        TEXT NOT NULL
);

-- The snapshot of the state right after each event (events from before this table have none:
-- their history was linear, and the state at a stream position stands in).
CREATE TABLE event_state (
    event_id     TEXT PRIMARY KEY,
    snapshot_id  BIGINT NOT NULL
);
