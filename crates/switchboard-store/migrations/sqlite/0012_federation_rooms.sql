-- The room DAG: each event's prev_events. Forward extremities are the events of a room no other
-- event names as a predecessor.
CREATE TABLE event_edges (
    room_id        TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    prev_event_id  TEXT NOT NULL,
    PRIMARY KEY (event_id, prev_event_id)
);
CREATE INDEX event_edges_prev ON event_edges (room_id, prev_event_id);
INSERT INTO event_edges (room_id, event_id, prev_event_id)
    SELECT e.room_id, e.event_id, p.value FROM events e, json_each(e.pdu, '$.prev_events') p;

-- Per destination server: the last position of the event stream sent to it.
CREATE TABLE federation_destinations (
    destination  TEXT PRIMARY KEY,
    sent_pos     BIGINT NOT NULL,
    last_txn_id  BIGINT NOT NULL DEFAULT 0
);
