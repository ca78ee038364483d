-- Ephemeral data for application services: how far along the auxiliary stream each service is,
-- and how far each stored transaction covers it.
ALTER TABLE appservice_state ADD COLUMN last_aux BIGINT NOT NULL DEFAULT 0;
-- Existing services start at the current auxiliary position, not with all history at once.
UPDATE appservice_state SET last_aux = COALESCE((SELECT MAX(stream_pos) FROM account_data), 0);
ALTER TABLE appservice_txns ADD COLUMN last_aux BIGINT NOT NULL DEFAULT 0;
