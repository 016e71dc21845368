-- A project's quota usage (COUNT, SUM(vcpus), SUM(memory_mb) of its live instances) read from
-- the index alone, without a visit to each row; its first two columns serve every lookup the
-- index it replaces served.
CREATE INDEX instances_project_usage_idx ON instances (project_id, deleted, vcpus, memory_mb);
DROP INDEX instances_project_id_deleted_idx;
