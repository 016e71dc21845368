-- With CURVE, each service's ROUTER has its own key pair; callers need the public key of the
-- service they connect to. A compute registers its key next to its endpoint (public keys are not
-- secret), so the schedulers and the API find both in one row.
ALTER TABLE services ADD COLUMN rpc_public_key TEXT;
