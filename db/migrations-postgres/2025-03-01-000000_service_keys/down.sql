ALTER TABLE services DROP COLUMN rpc_public_key;
