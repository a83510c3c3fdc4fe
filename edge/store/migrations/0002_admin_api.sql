-- What the admin API and the node agents need beyond the first schema.

-- Regions as the operations guide adds them by hand with psql: an id, and the country by
-- its name ('United States') rather than an ISO code.
ALTER TABLE regions ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE;
ALTER TABLE regions DROP CONSTRAINT regions_country_check;
ALTER TABLE regions ADD CONSTRAINT regions_country_check
    CHECK (length(country) BETWEEN 1 AND 64);

-- Environment variables set in a deployment's instances (besides PORT).
ALTER TABLE deployments ADD COLUMN env jsonb NOT NULL DEFAULT '{}'
    CONSTRAINT deployments_env_check CHECK (jsonb_typeof(env) = 'object');

-- The agent's word on an instance that failed, exited or turned unhealthy.
ALTER TABLE instances ADD COLUMN message text;

-- A webhook belongs to a GitHub repository ("owner/repo", lower case), as on GitHub: a push
-- to it deploys every project built from that repository and branch.
ALTER TABLE github_webhooks ADD COLUMN repository text;
UPDATE github_webhooks w SET repository = lower(p.github_repo)
    FROM projects p WHERE p.id = w.project_id;
DELETE FROM github_webhooks w WHERE repository IS NULL OR EXISTS (
    SELECT 1 FROM github_webhooks o
    WHERE o.repository = w.repository AND (o.created_at, o.id) > (w.created_at, w.id));
ALTER TABLE github_webhooks
    ALTER COLUMN repository SET NOT NULL,
    ADD CONSTRAINT github_webhooks_repository_check
        CHECK (repository ~ '^[a-z0-9_.-]+/[a-z0-9_.-]+$'),
    ADD CONSTRAINT github_webhooks_repository_key UNIQUE (repository),
    DROP COLUMN project_id;
CREATE INDEX projects_github_repo ON projects (lower(github_repo));
