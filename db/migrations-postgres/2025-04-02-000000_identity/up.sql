-- Identity: the subset of Keystone v3 that the compute API needs. Ids are Keystone's 32-character
-- hex uuids. Projects and users are soft-deleted like everything else, so a name is unique only
-- among live rows of its domain. Roles are a fixed set (admin, member, reader), so an assignment
-- names its role directly and goes away with a plain DELETE. A token is stored only as the hex
-- SHA-256 of its text: a copy of the database does not hand out working tokens.

CREATE TABLE projects (
    id BIGSERIAL PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    domain_id TEXT NOT NULL DEFAULT 'default',
    description TEXT NOT NULL DEFAULT '',
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_projects_domain_id_name_deleted UNIQUE (domain_id, name, deleted)
);

CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    domain_id TEXT NOT NULL DEFAULT 'default',
    password_hash TEXT NOT NULL,
    default_project_uuid TEXT REFERENCES projects (uuid),
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_users_domain_id_name_deleted UNIQUE (domain_id, name, deleted)
);

CREATE TABLE role_assignments (
    id BIGSERIAL PRIMARY KEY,
    user_uuid TEXT NOT NULL REFERENCES users (uuid),
    project_uuid TEXT NOT NULL REFERENCES projects (uuid),
    role TEXT NOT NULL CHECK (role IN ('admin', 'member', 'reader')),
    created_at TIMESTAMP NOT NULL,
    CONSTRAINT uniq_role_assignments_user_project_role UNIQUE (user_uuid, project_uuid, role)
);
CREATE INDEX role_assignments_project_uuid_idx ON role_assignments (project_uuid);

CREATE TABLE tokens (
    id BIGSERIAL PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    user_uuid TEXT NOT NULL REFERENCES users (uuid),
    project_uuid TEXT REFERENCES projects (uuid),
    issued_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP
);
CREATE INDEX tokens_expires_at_idx ON tokens (expires_at);
CREATE INDEX tokens_user_uuid_idx ON tokens (user_uuid);
