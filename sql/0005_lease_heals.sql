-- farmkeys config DB, migration 5: a lease row that cannot wedge the farm.
-- A holder without an expiry would never expire, so no node could ever take over:
-- the schema forbids it (a row left that way by hand is expired now, so it heals).
UPDATE leader_lease SET expires_at = now() WHERE holder IS NOT NULL AND expires_at IS NULL;
ALTER TABLE leader_lease
    ADD CONSTRAINT leader_lease_holder_expires CHECK (holder IS NULL OR expires_at IS NOT NULL);
