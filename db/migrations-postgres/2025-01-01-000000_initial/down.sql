DROP TABLE instance_faults;
DROP TABLE instance_actions;
DROP TABLE instances;
DROP TABLE images;
DROP TABLE flavors;
DROP TABLE compute_nodes;
DROP TABLE services;
