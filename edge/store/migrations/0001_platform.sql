-- The platform's state: regions, nodes, projects and their environments, deployments and
-- their instances, custom domains, certificates, ACME challenges, GitHub webhooks, instance
-- logs and the audit log.

CREATE TABLE regions (
    code        text PRIMARY KEY CHECK (code ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    name        text NOT NULL,
    country     text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE nodes (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    region          text NOT NULL REFERENCES regions (code),
    hostname        text NOT NULL UNIQUE,
    address         text NOT NULL,
    vcpu            integer NOT NULL CHECK (vcpu > 0),
    memory_mb       integer NOT NULL CHECK (memory_mb > 0),
    state           text NOT NULL DEFAULT 'ready'
                    CHECK (state IN ('ready', 'draining', 'drained', 'down')),
    token_hash      text,
    last_heartbeat  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org                 text NOT NULL CHECK (org ~ '^[a-z0-9][a-z0-9-]{0,38}$'),
    name                text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,38}$'),
    github_repo         text,
    branch              text NOT NULL DEFAULT 'main',
    auto_deploy         boolean NOT NULL DEFAULT false,
    vcpu                numeric(6, 2) NOT NULL DEFAULT 1 CHECK (vcpu > 0),
    memory_mb           integer NOT NULL DEFAULT 512 CHECK (memory_mb > 0),
    app_port            integer NOT NULL DEFAULT 3000 CHECK (app_port BETWEEN 1 AND 65535),
    health_check_path   text NOT NULL DEFAULT '/' CHECK (health_check_path LIKE '/%'),
    rate_limit_rps      integer CHECK (rate_limit_rps > 0),
    rate_limit_burst    integer CHECK (rate_limit_burst > 0),
    image_template      text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org, name)
);

CREATE TABLE environments (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id              uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name                    text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    current_deployment_id   uuid,
    previous_deployment_id  uuid,
    created_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE deployments (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id              uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    environment_id          uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    nanoid                  text NOT NULL UNIQUE CHECK (nanoid ~ '^[a-z0-9]{7}$'),
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'placing', 'starting', 'healthy',
                                              'active', 'draining', 'inactive', 'failed')),
    image                   text,
    command                 text,
    commit_sha              text,
    commit_message          text,
    instances_per_region    integer NOT NULL DEFAULT 1 CHECK (instances_per_region > 0),
    failure_reason          text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    placing_at              timestamptz,
    starting_at             timestamptz,
    healthy_at              timestamptz,
    active_at               timestamptz,
    draining_at             timestamptz,
    inactive_at             timestamptz,
    failed_at               timestamptz,
    CHECK (image IS NOT NULL OR command IS NOT NULL)
);
CREATE INDEX deployments_project ON deployments (project_id, created_at DESC);

ALTER TABLE environments
    ADD FOREIGN KEY (current_deployment_id) REFERENCES deployments (id) ON DELETE SET NULL,
    ADD FOREIGN KEY (previous_deployment_id) REFERENCES deployments (id) ON DELETE SET NULL;

CREATE TABLE instances (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    deployment_id   uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    node_id         uuid REFERENCES nodes (id) ON DELETE SET NULL,
    region          text NOT NULL REFERENCES regions (code),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'starting', 'running', 'stopping', 'stopped',
                                     'failed')),
    address         text,
    port            integer CHECK (port BETWEEN 1 AND 65535),
    healthy         boolean NOT NULL DEFAULT false,
    boot_time_ms    integer CHECK (boot_time_ms >= 0),
    last_health_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_deployment ON instances (deployment_id);
CREATE INDEX instances_node ON instances (node_id);

CREATE TABLE domains (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                text NOT NULL UNIQUE CHECK (name = lower(name)),
    project_id          uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    environment_id      uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    verification_token  text NOT NULL,
    verified_at         timestamptz,
    last_checked_at     timestamptz,
    pointing_at_edge    boolean,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE certificates (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain          text NOT NULL UNIQUE,
    cert_pem        text NOT NULL,
    key_encrypted   bytea NOT NULL,
    not_before      timestamptz NOT NULL,
    not_after       timestamptz NOT NULL,
    issuer          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (not_after > not_before)
);

CREATE TABLE acme_challenges (
    token               text PRIMARY KEY,
    key_authorization   text NOT NULL,
    domain              text NOT NULL,
    expires_at          timestamptz NOT NULL
);

CREATE TABLE github_webhooks (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    secret      text NOT NULL,
    events      text[] NOT NULL DEFAULT ARRAY['push'],
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE github_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id      uuid NOT NULL REFERENCES github_webhooks (id) ON DELETE CASCADE,
    delivery_id     text NOT NULL UNIQUE,
    event           text NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'received'
                    CHECK (status IN ('received', 'processed', 'ignored', 'failed')),
    error           text,
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instance_logs (
    id              bigserial PRIMARY KEY,
    instance_id     uuid NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    deployment_id   uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    stream          text NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    line            text NOT NULL,
    logged_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_logs_deployment ON instance_logs (deployment_id, id);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text,
    details     jsonb NOT NULL DEFAULT '{}'
);

-- Every change that can alter a route wakes the edges (LISTEN zeitwork_routes). One
-- notification per statement: the listeners reload the whole table, debounced.
CREATE FUNCTION zeitwork_notify_routes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('zeitwork_routes', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON projects
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON environments
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON deployments
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON domains
    FOR EACH STATEMENT EXECUTE FUNCTION zeitwork_notify_routes();
