DROP TABLE fixed_ips;
DROP TABLE networks;
