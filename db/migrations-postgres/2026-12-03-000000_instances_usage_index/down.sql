CREATE INDEX instances_project_id_deleted_idx ON instances (project_id, deleted);
DROP INDEX instances_project_usage_idx;
