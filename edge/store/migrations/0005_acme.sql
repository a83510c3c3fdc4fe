-- ACME (RFC 8555): the leader's account at each CA it has used, and every verified domain's
-- certificate orders (attempts, failures in a row, backoff), for the ACME loop and the API.

-- One account per ACME directory; its key encrypted like the certificates' (edge/secrets.py).
-- The row is written before the CA is asked, so a leader that dies mid-registration leaves
-- the key for the next one (registering an existing key returns its account).
CREATE TABLE acme_accounts (
    directory_url   text PRIMARY KEY,
    key_encrypted   bytea NOT NULL,
    uri             text,
    contact         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A separate table rather than columns of domains: an attempt must not fire the routing
-- table's reload trigger on every edge. A domain without a row has never been attempted.
CREATE TABLE certificate_orders (
    domain_id        uuid PRIMARY KEY REFERENCES domains (id) ON DELETE CASCADE,
    -- When the last order started, and which order it was at the CA (for operators).
    last_attempt_at  timestamptz,
    order_url        text,
    -- Failed orders in a row (0 after a success), and the last one's error.
    failures         integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error       text,
    -- After a failure: the end of the backoff; after a success: when renewal is due.
    next_attempt_at  timestamptz,
    issued_at        timestamptz
);

-- A domain verified (or added verified) wakes the ACME loop (LISTEN zeitwork_acme), so its
-- certificate is ordered at once rather than at the next tick.
CREATE FUNCTION zeitwork_notify_acme() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('zeitwork_acme', NEW.name);
    RETURN NULL;
END;
$$;

CREATE TRIGGER acme_domain_verified AFTER UPDATE OF verified_at ON domains
    FOR EACH ROW WHEN (OLD.verified_at IS NULL AND NEW.verified_at IS NOT NULL)
    EXECUTE FUNCTION zeitwork_notify_acme();
CREATE TRIGGER acme_domain_added_verified AFTER INSERT ON domains
    FOR EACH ROW WHEN (NEW.verified_at IS NOT NULL)
    EXECUTE FUNCTION zeitwork_notify_acme();
