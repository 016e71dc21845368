-- Shadow tables, as in Nova: `zova-manage db archive-deleted` moves soft-deleted rows here so the
-- live tables stay small while the history is kept. Each mirrors its table column for column
-- (a migration that adds a column to one of these tables must add it to its shadow too; a test
-- checks they match) but has no unique constraints, defaults or autoincrement: the rows keep
-- the ids they had.

CREATE TABLE shadow_services (
    id BIGINT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL,
    "binary" TEXT NOT NULL,
    topic TEXT NOT NULL,
    rpc_endpoint TEXT NOT NULL,
    disabled BOOLEAN NOT NULL,
    disabled_reason TEXT,
    report_count BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted BIGINT NOT NULL,
    rpc_public_key TEXT,
    forced_down BOOLEAN NOT NULL
);

CREATE TABLE shadow_compute_nodes (
    id BIGINT PRIMARY KEY NOT NULL,
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
    extra_resources TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted BIGINT NOT NULL,
    placed_vcpus BIGINT NOT NULL,
    placed_memory_mb BIGINT NOT NULL,
    placed_disk_mb BIGINT NOT NULL
);

CREATE TABLE shadow_instances (
    id BIGINT PRIMARY KEY NOT NULL,
    uuid TEXT NOT NULL,
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
    scheduler_hints TEXT NOT NULL,
    metadata TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    launch_index INTEGER NOT NULL,
    launched_at TIMESTAMP,
    terminated_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    deleted_at TIMESTAMP,
    deleted BIGINT NOT NULL,
    description TEXT,
    key_name TEXT,
    flavor_snapshot TEXT NOT NULL
);
CREATE INDEX shadow_instances_uuid_idx ON shadow_instances (uuid);

CREATE TABLE shadow_instance_actions (
    id BIGINT PRIMARY KEY NOT NULL,
    action TEXT NOT NULL,
    instance_uuid TEXT NOT NULL,
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    start_time TIMESTAMP NOT NULL,
    finish_time TIMESTAMP,
    message TEXT,
    deleted BIGINT NOT NULL
);
CREATE INDEX shadow_instance_actions_instance_uuid_idx ON shadow_instance_actions (instance_uuid);

CREATE TABLE shadow_instance_faults (
    id BIGINT PRIMARY KEY NOT NULL,
    instance_uuid TEXT NOT NULL,
    code INTEGER NOT NULL,
    message TEXT NOT NULL,
    details TEXT NOT NULL,
    host TEXT,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL
);
CREATE INDEX shadow_instance_faults_instance_uuid_idx ON shadow_instance_faults (instance_uuid);

CREATE TABLE shadow_key_pairs (
    id BIGINT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_type TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL
);
