-- Secret rotation: while a subscription's secret is being replaced, the relay signs every
-- request with the new secret and the previous one, so a subscriber can switch keys
-- without refusing a single webhook. `outbox-relay subscription rotate-secret` sets both
-- columns; the relay stops using the previous secret once previous_secret_expires_at has
-- passed (its subscription cache reloads every second).

ALTER TABLE outbox.subscriptions
    ADD COLUMN previous_secret text,
    ADD COLUMN previous_secret_expires_at timestamptz,
    ADD CONSTRAINT previous_secret_format
        CHECK (previous_secret IS NULL OR previous_secret ~ '^whsec_[A-Za-z0-9+/]{22,}={0,2}$');

COMMENT ON COLUMN outbox.subscriptions.previous_secret IS
    'Internal (secret rotation): the secret replaced by the last rotation; requests are also signed with it until previous_secret_expires_at. Set by `outbox-relay subscription rotate-secret`.';
COMMENT ON COLUMN outbox.subscriptions.previous_secret_expires_at IS
    'Internal (secret rotation): end of the overlap during which previous_secret still signs requests. NULL or past = the previous secret is no longer used.';
