-- farmkeys config DB, migration 2: the leader lease, the audit log, rollover requests,
-- and what `serve` reports about each node.

-- One row: who leads, under which term, until when (by this database's clock).
-- `holder` is one process (node id and instance); `term` rises each time it changes hands.
CREATE TABLE leader_lease (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder       text,
    holder_node  text,
    term         bigint NOT NULL DEFAULT 0 CHECK (term >= 0),
    acquired_at  timestamptz,
    expires_at   timestamptz,
    CHECK ((holder IS NULL) = (holder_node IS NULL))
);
INSERT INTO leader_lease (singleton) VALUES (true);

-- Everything that changed the farm: what, when, by which node, under which term.
CREATE TABLE audit_event (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    node         text NOT NULL,
    term         bigint,                 -- NULL for `init`, which runs before any lease
    action       text NOT NULL,
    purpose      text CHECK (purpose IN ('signing', 'decryption')),
    certificate  uuid,
    thumbprint   text,
    detail       text NOT NULL DEFAULT ''
);
CREATE INDEX audit_event_at ON audit_event (at);

-- `farmkeys rollover` asks the leader through this table and waits for `done_at`.
CREATE TABLE rollover_request (
    id            bigserial PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text NOT NULL,
    purpose       text NOT NULL CHECK (purpose IN ('signing', 'decryption', 'all')),
    urgent        boolean NOT NULL,
    done_at       timestamptz,
    done_by       text,
    term          bigint,
    ok            boolean,
    result        text
);
CREATE INDEX rollover_request_pending ON rollover_request (id) WHERE done_at IS NULL;

ALTER TABLE node
    ADD COLUMN heartbeat_at    timestamptz,  -- set while `serve` runs; NULL after a clean stop
    ADD COLUMN directory_error text,         -- the directory as this node last saw it
    ADD COLUMN hook_error      text,         -- the last failed on_change hook, if any since
    ADD COLUMN hook_at         timestamptz;
