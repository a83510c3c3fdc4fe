-- What the embedded scheduler needs: the regions a deployment runs in, indexes for its
-- snapshot, and a wake-up when a node changes state.

-- Recorded when a deployment leaves 'placing': its instances are kept in these regions.
ALTER TABLE deployments ADD COLUMN regions text[];

-- The scheduler reads the deployments still in the lifecycle and the instances that hold a
-- node (or failed lately) on every pass; both sets stay small while history grows.
CREATE INDEX deployments_live ON deployments (status)
    WHERE status NOT IN ('inactive', 'failed');
CREATE INDEX instances_holding ON instances (node_id)
    WHERE state IN ('pending', 'starting', 'running', 'stopping');
CREATE INDEX instances_failed ON instances (deployment_id, updated_at)
    WHERE state = 'failed';

-- Nodes registered, removed, or changing state wake the scheduler (LISTEN zeitwork_scheduler).
-- Heartbeats, which only move last_heartbeat, do not: they come every few seconds per node.
CREATE FUNCTION zeitwork_notify_scheduler() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('zeitwork_scheduler', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER scheduler_nodes_added_removed AFTER INSERT OR DELETE ON nodes
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_scheduler();
CREATE TRIGGER scheduler_nodes_state AFTER UPDATE OF state ON nodes
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION zeitwork_notify_scheduler();
