-- Sliding sync orders a user's rooms by their latest "bump" event (a message, not a receipt or
-- a state change): one index seek per room and type finds it the first time a process needs it;
-- after that it follows the stream.
CREATE INDEX events_room_type ON events (room_id, type, stream_pos);
