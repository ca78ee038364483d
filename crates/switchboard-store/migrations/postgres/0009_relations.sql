-- Relations (`m.relates_to`): threads, edits, annotations, references.
ALTER TABLE events ADD COLUMN relates_to TEXT;
ALTER TABLE events ADD COLUMN rel_type TEXT;
CREATE INDEX events_relations ON events (relates_to, stream_pos) WHERE relates_to IS NOT NULL;
