-- farmkeys config DB, migration 11: `farmkeys rollover --revert` (issue 23). `revert`: the row
-- asks the leader to undo the last promotion of `purpose`. A copy of what the signed body
-- says, for reading: the leader acts on the body alone and refuses a row whose column differs
-- (farmkeys/formats/request.py). What the revert undoes, and the hold it puts on promotion,
-- are in the authenticated farm state record (format 3), never in a column.
ALTER TABLE rollover_request
    ADD COLUMN revert boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT rollover_request_revert CHECK (
        NOT revert OR (purpose IN ('signing', 'decryption') AND NOT urgent AND NOT master_key)
    );
