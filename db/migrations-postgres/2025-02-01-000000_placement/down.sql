DROP TABLE flavor_extra_specs;
DROP TABLE allocations;
ALTER TABLE compute_nodes DROP COLUMN placed_disk_mb;
ALTER TABLE compute_nodes DROP COLUMN placed_memory_mb;
ALTER TABLE compute_nodes DROP COLUMN placed_vcpus;
