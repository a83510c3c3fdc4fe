-- TLS termination in the edge: a project's HSTS setting, and wake-ups for what the edges
-- serve besides routes: certificates (HTTPS) and ACME challenges (plain HTTP).

-- Strict-Transport-Security max-age (seconds) on the project's HTTPS responses; null: none.
-- At most two years, as browsers' preload lists ask for at least one.
ALTER TABLE projects ADD COLUMN hsts_max_age integer
    CONSTRAINT projects_hsts_max_age_check CHECK (hsts_max_age BETWEEN 0 AND 63072000);

-- The edges LISTEN on zeitwork_routes; the payload is the table's name, so a certificate
-- change reloads certificates only, a challenge change the routing table (which carries them).
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON certificates
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON acme_challenges
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
