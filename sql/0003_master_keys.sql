-- farmkeys config DB, migration 3: the master keys' life (rollover, retention, shredding).
-- Never a key's bytes: those live in the directory alone. This table is the journal the
-- leader writes *before* it touches the directory, so every key the directory holds is
-- recorded here, and a roll cut short by a crash is finished by the next leader.

CREATE TABLE master_key (
    id            uuid PRIMARY KEY,
    -- pending: recorded, maybe in the directory, not yet current; current: new blobs are
    -- sealed under it; previous: replaced, kept `retain` after no live blob names it;
    -- deleted: removed from the directory (blobs still naming it are shredded).
    state         text NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    current_since timestamptz,
    replaced_at   timestamptz,
    unused_since  timestamptz,             -- no live blob has named it since then
    delete_now    boolean NOT NULL DEFAULT false,  -- urgent: delete once no live blob names it
    deleted_at    timestamptz,
    urgent        boolean NOT NULL DEFAULT false,  -- made by an urgent roll
    request       bigint,                  -- the `rollover --master-key` request it answers
    reason        text NOT NULL DEFAULT '',
    CHECK ((state = 'deleted') = (deleted_at IS NOT NULL)),
    CHECK (state <> 'current' OR current_since IS NOT NULL)
);
-- One current key and at most one roll in progress, whatever the code does: two leaders
-- can never start two new keys for one roll.
CREATE UNIQUE INDEX master_key_one_current ON master_key ((true)) WHERE state = 'current';
CREATE UNIQUE INDEX master_key_one_pending ON master_key ((true)) WHERE state = 'pending';

-- `farmkeys rollover --master-key`: a request with no purpose.
ALTER TABLE rollover_request
    ALTER COLUMN purpose DROP NOT NULL,
    ADD COLUMN master_key boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT rollover_request_target CHECK (master_key = (purpose IS NULL));

-- Master-key events name their key.
ALTER TABLE audit_event ADD COLUMN master_key uuid;

-- The master keys a node's last sync proved it can open the live blobs with.
ALTER TABLE node ADD COLUMN master_keys uuid[] NOT NULL DEFAULT '{}';
