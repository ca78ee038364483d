-- The public room directory. Rooms an application service publishes carry its instance
-- (`<as_id>|<network_id>`, Synapse's third_party_instance_id); the main list has instance ''.
CREATE TABLE room_directory (
    room_id   TEXT PRIMARY KEY,
    instance  TEXT NOT NULL DEFAULT ''
);
