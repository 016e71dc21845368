-- What the compute API needs beyond the spine: key pairs (clients list them before a create),
-- per-project quota overrides (the defaults come from [quota] in the configuration) and the
-- server description of microversion 2.19.

CREATE TABLE key_pairs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_type TEXT NOT NULL DEFAULT 'ssh',
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_key_pairs_user_id_name_deleted UNIQUE (user_id, name, deleted)
);

CREATE TABLE quotas (
    id BIGSERIAL PRIMARY KEY,
    project_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    hard_limit BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    CONSTRAINT uniq_quotas_project_id_resource UNIQUE (project_id, resource)
);

ALTER TABLE instances ADD COLUMN description TEXT;
-- The key pair the server was created with (its name, as Nova shows it).
ALTER TABLE instances ADD COLUMN key_name TEXT;

-- An operator's "this host is down" (os-services force-down, microversion 2.11): the scheduler
-- treats the host as down whatever its heartbeat says, until it is cleared.
ALTER TABLE services ADD COLUMN forced_down BOOLEAN NOT NULL DEFAULT FALSE;

-- The flavor as it was when the server was created (name and extra specs; the sizes have their
-- own columns), shown embedded in the server from microversion 2.47 even after the flavor is
-- deleted or changed.
ALTER TABLE instances ADD COLUMN flavor_snapshot TEXT NOT NULL DEFAULT '{}';
