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
    SELECT room_id, event_id, jsonb_array_elements_text(pdu::jsonb -> 'prev_events') FROM events;

-- Per destination server: the last position of the event stream sent to it.
CREATE TABLE federation_destinations (
    destination  TEXT PRIMARY KEY,
    sent_pos     BIGINT NOT NULL,
    last_txn_id  BIGINT NOT NULL DEFAULT 0
);
