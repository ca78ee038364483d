-- Application services receive the to-device messages of their users in transactions (MSC4203):
-- each sender reads the messages after its place in the auxiliary stream.
CREATE INDEX to_device_pos ON to_device (stream_pos);
