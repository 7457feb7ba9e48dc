-- farmkeys config DB, migration 6: the farm state record (farmkeys/farmstate.py).
-- The leader writes it with every change: the live set (which certificate holds which role),
-- a strictly increasing version, and a MAC under a key derived from the current master key,
-- so whoever can write this database but has no master key cannot undo a rollover. `body` is
-- the record's canonical bytes (what the MAC covers); `version` a copy of the record's own,
-- for reading; what counts is the record.
CREATE TABLE farm_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     bigint NOT NULL CHECK (version >= 1),
    body        bytea NOT NULL,
    mac         bytea NOT NULL CHECK (octet_length(mac) = 32),
    term        bigint,                  -- the leader's term that wrote it; NULL for `init`
    written_at  timestamptz NOT NULL DEFAULT now()
);

-- The highest farm state version each node has installed (its store's manifest keeps its own).
ALTER TABLE node ADD COLUMN state_version bigint;

-- `farmkeys repair-state` reaches the leader through the request table, as `rollover` does.
ALTER TABLE rollover_request ADD COLUMN repair_state boolean NOT NULL DEFAULT false;
