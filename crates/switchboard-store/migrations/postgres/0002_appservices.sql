-- Application-service delivery. The queue is the event stream itself: each service has the
-- stream position up to which every event was considered, and at most one transaction in flight
-- whose body is stored before the first send, so a retry is byte-identical.
CREATE TABLE appservice_state (
    as_id        TEXT PRIMARY KEY,
    last_pos     BIGINT NOT NULL,
    -- txn IDs only grow, also across restarts: services de-duplicate by them.
    last_txn_id  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE appservice_txns (
    as_id        TEXT PRIMARY KEY,
    txn_id       BIGINT NOT NULL,
    -- The stream position this transaction covers up to (inclusive).
    last_pos     BIGINT NOT NULL,
    event_count  BIGINT NOT NULL,
    body         TEXT NOT NULL
);
