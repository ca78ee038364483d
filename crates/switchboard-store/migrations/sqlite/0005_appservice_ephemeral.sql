-- Ephemeral data for application services: how far along the auxiliary stream each service is,
-- and how far each stored transaction covers it.
ALTER TABLE appservice_state ADD COLUMN last_aux INTEGER NOT NULL DEFAULT 0;
ALTER TABLE appservice_txns ADD COLUMN last_aux INTEGER NOT NULL DEFAULT 0;
