-- Zova's initial schema, PostgreSQL edition: the same tables, columns and types as the SQLite set
-- in ../migrations, with BIGSERIAL keys where SQLite has INTEGER PRIMARY KEY AUTOINCREMENT. Every
-- table is soft-deleted as in Nova: a live row has deleted = 0 and a deleted one has deleted = id,
-- so unique keys that include `deleted` let a name be reused.

CREATE TABLE services (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    "binary" TEXT NOT NULL,
    topic TEXT NOT NULL,
    rpc_endpoint TEXT NOT NULL,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    disabled_reason TEXT,
    report_count BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_services_host_binary_deleted UNIQUE (host, "binary", deleted)
);

CREATE TABLE compute_nodes (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    hypervisor_hostname TEXT NOT NULL,
    hypervisor_type TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    local_gb BIGINT NOT NULL,
    vcpus_used BIGINT NOT NULL,
    memory_mb_used BIGINT NOT NULL,
    local_gb_used BIGINT NOT NULL,
    free_ram_mb BIGINT NOT NULL,
    free_disk_gb BIGINT NOT NULL,
    running_vms BIGINT NOT NULL,
    extra_resources TEXT NOT NULL DEFAULT '{}',
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_compute_nodes_host_hypervisor_hostname_deleted
        UNIQUE (host, hypervisor_hostname, deleted)
);

CREATE TABLE flavors (
    id BIGSERIAL PRIMARY KEY,
    flavorid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    root_gb BIGINT NOT NULL,
    ephemeral_gb BIGINT NOT NULL DEFAULT 0,
    swap_mb BIGINT NOT NULL DEFAULT 0,
    is_public BOOLEAN NOT NULL DEFAULT TRUE,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE images (
    id BIGSERIAL PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    disk_format TEXT NOT NULL,
    container_format TEXT NOT NULL,
    status TEXT NOT NULL,
    min_disk BIGINT NOT NULL DEFAULT 0,
    min_ram BIGINT NOT NULL DEFAULT 0,
    size_bytes BIGINT NOT NULL,
    location TEXT,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE instances (
    id BIGSERIAL PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    project_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    flavorid TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    root_gb BIGINT NOT NULL,
    ephemeral_gb BIGINT NOT NULL,
    swap_mb BIGINT NOT NULL,
    vm_state TEXT NOT NULL,
    task_state TEXT,
    power_state INTEGER NOT NULL,
    host TEXT,
    node TEXT,
    scheduler_hints TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    reservation_id TEXT NOT NULL,
    launch_index INTEGER NOT NULL,
    launched_at TIMESTAMP,
    terminated_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted_at TIMESTAMP,
    deleted BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX instances_project_id_deleted_idx ON instances (project_id, deleted);
CREATE INDEX instances_host_deleted_idx ON instances (host, deleted);

CREATE TABLE instance_actions (
    id BIGSERIAL PRIMARY KEY,
    action TEXT NOT NULL,
    instance_uuid TEXT NOT NULL,
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    start_time TIMESTAMP NOT NULL,
    finish_time TIMESTAMP,
    message TEXT,
    deleted BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX instance_actions_instance_uuid_idx ON instance_actions (instance_uuid);

CREATE TABLE instance_faults (
    id BIGSERIAL PRIMARY KEY,
    instance_uuid TEXT NOT NULL,
    code INTEGER NOT NULL,
    message TEXT NOT NULL,
    details TEXT NOT NULL,
    host TEXT,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX instance_faults_instance_uuid_idx ON instance_faults (instance_uuid);
