ALTER TABLE instances DROP COLUMN key_name;
ALTER TABLE instances DROP COLUMN flavor_snapshot;
ALTER TABLE services DROP COLUMN forced_down;
ALTER TABLE instances DROP COLUMN description;
DROP TABLE quotas;
DROP TABLE key_pairs;
