DROP TABLE shadow_key_pairs;
DROP TABLE shadow_instance_faults;
DROP TABLE shadow_instance_actions;
DROP TABLE shadow_instances;
DROP TABLE shadow_compute_nodes;
DROP TABLE shadow_services;
