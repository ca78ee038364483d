-- Events outside every timeline — a joined room's state and auth chain, soft-failed events — are
-- outliers. History fetched from other servers (`/backfill`) is not: it has negative stream
-- positions too (below everything stored), and `/messages` pages through it.
ALTER TABLE events ADD COLUMN outlier BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE events SET outlier = TRUE WHERE stream_pos <= 0;

-- A member event of another server's user that this server took through `send_join` or
-- `send_leave`: this server sends it on to the room's other servers, as it does its own events.
ALTER TABLE events ADD COLUMN relay BOOLEAN NOT NULL DEFAULT FALSE;

-- `/messages` pages in topological order: by depth, then stream position.
CREATE INDEX events_room_topo ON events (room_id, depth, stream_pos);
