-- The leader checks verified domains' DNS again periodically (edge/domain_checks.py).

-- Whether the last check still found the domain leading to the edge, by its CNAME or its TXT
-- token (null: not checked since this column exists). pointing_at_edge stays what it was:
-- the CNAME alone.
ALTER TABLE domains ADD COLUMN last_check_ok boolean;

-- Routes depend on a domain's name, project, environment and verification only: a check that
-- just records its time and verdict must not make every edge reload its routing table.
DROP TRIGGER routes_changed ON domains;
CREATE TRIGGER routes_changed AFTER INSERT OR DELETE OR TRUNCATE ON domains
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed_update AFTER UPDATE ON domains
    FOR EACH ROW WHEN (
        OLD.name IS DISTINCT FROM NEW.name
        OR OLD.project_id IS DISTINCT FROM NEW.project_id
        OR OLD.environment_id IS DISTINCT FROM NEW.environment_id
        OR OLD.verified_at IS DISTINCT FROM NEW.verified_at
    )
    EXECUTE FUNCTION zeitwork_notify_routes();
