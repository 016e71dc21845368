-- Placement. A scheduler commits each placement to the database before it sends the work, so
-- that several schedulers (or one with a stale host queue) can never push a node past its
-- limits. What is placed on a node is kept twice, in one transaction: as running totals on the
-- node row, so that a single conditional UPDATE both checks the room and takes it, and as one
-- allocation row per instance, so that a delete, an error or a reschedule gives back exactly
-- what was taken, once.

ALTER TABLE compute_nodes ADD COLUMN placed_vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE compute_nodes ADD COLUMN placed_memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE compute_nodes ADD COLUMN placed_disk_mb BIGINT NOT NULL DEFAULT 0;

CREATE TABLE allocations (
    id BIGSERIAL PRIMARY KEY,
    instance_uuid TEXT NOT NULL UNIQUE,
    compute_node_id BIGINT NOT NULL REFERENCES compute_nodes (id),
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX allocations_compute_node_id_idx ON allocations (compute_node_id);

-- Flavor extra specs (Nova's `flavor_extra_specs`); the scheduler reads `queue_name`.
CREATE TABLE flavor_extra_specs (
    id BIGSERIAL PRIMARY KEY,
    flavor_id BIGINT NOT NULL REFERENCES flavors (id),
    spec_key TEXT NOT NULL,
    spec_value TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    CONSTRAINT uniq_flavor_extra_specs_flavor_id_spec_key UNIQUE (flavor_id, spec_key)
);

-- Instances that already run (or are being built) on a node hold their resources from the start,
-- so an upgraded database does not look empty to the schedulers.
INSERT INTO allocations (instance_uuid, compute_node_id, vcpus, memory_mb, disk_mb, created_at)
SELECT i.uuid, n.id, i.vcpus, i.memory_mb, 1024 * (i.root_gb + i.ephemeral_gb) + i.swap_mb,
       CURRENT_TIMESTAMP
FROM instances i
JOIN compute_nodes n ON n.host = i.host AND n.hypervisor_hostname = i.node AND n.deleted = 0
WHERE i.deleted = 0 AND i.vm_state NOT IN ('error', 'deleted');

UPDATE compute_nodes SET
    placed_vcpus = COALESCE(
        (SELECT SUM(a.vcpus) FROM allocations a WHERE a.compute_node_id = compute_nodes.id), 0),
    placed_memory_mb = COALESCE(
        (SELECT SUM(a.memory_mb) FROM allocations a WHERE a.compute_node_id = compute_nodes.id), 0),
    placed_disk_mb = COALESCE(
        (SELECT SUM(a.disk_mb) FROM allocations a WHERE a.compute_node_id = compute_nodes.id), 0);
