-- Fixed-IP pools (nova-network's fixed IPs): one pool per network, one row per address, and an
-- instance holds at most one address (with its MAC) until it is deleted or fails to build.
-- Neither table is archived: a released address is a free row again, not history.

CREATE TABLE networks (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    cidr TEXT NOT NULL,
    gateway TEXT NOT NULL,
    -- The host bridge guests join; NULL: the hypervisor's default network.
    bridge TEXT,
    created_at TIMESTAMP NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT uniq_networks_name_deleted UNIQUE (name, deleted)
);

CREATE TABLE fixed_ips (
    id BIGSERIAL PRIMARY KEY,
    network_id BIGINT NOT NULL REFERENCES networks (id),
    address TEXT NOT NULL,
    instance_uuid TEXT,
    mac TEXT,
    allocated_at TIMESTAMP,
    CONSTRAINT uniq_fixed_ips_network_id_address UNIQUE (network_id, address)
);

CREATE INDEX fixed_ips_instance_uuid_idx ON fixed_ips (instance_uuid);
-- Allocation takes the lowest free address of a pool and checks that a new MAC is unused: both
-- must find their row without scanning a large pool (a /16 has 65,534 rows).
CREATE INDEX fixed_ips_free_idx ON fixed_ips (network_id, id) WHERE instance_uuid IS NULL;
CREATE INDEX fixed_ips_mac_idx ON fixed_ips (mac);
