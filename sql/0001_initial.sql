-- farmkeys config DB, migration 1: the farm, its certificates and its nodes.
-- Private keys appear here only as sealed blobs (docs/blob-format.md).

CREATE TABLE farm (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton), -- one farm per database
    name          text NOT NULL CHECK (name <> ''),
    dkm_group     uuid NOT NULL UNIQUE,  -- AD FS's DkmSettings Group: names the DKM container
    dkm_container text NOT NULL,         -- DN of that container in the directory
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE certificate (
    id          uuid PRIMARY KEY,
    purpose     text NOT NULL CHECK (purpose IN ('signing', 'decryption')),
    role        text NOT NULL CHECK (role IN ('primary', 'secondary', 'retired', 'archived')),
    thumbprint  text NOT NULL UNIQUE CHECK (thumbprint ~ '^[0-9A-F]{40}$'),  -- SHA-1 of der
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9A-F]{64}$'),
    subject     text NOT NULL,
    key_type    text NOT NULL,
    not_before  timestamptz NOT NULL,
    not_after   timestamptz NOT NULL CHECK (not_after > not_before),
    der         bytea NOT NULL,          -- the certificate: public
    master_key  uuid NOT NULL,           -- the DKM master key the blob is sealed under
    blob        bytea NOT NULL,          -- the PKCS#12, sealed: never the key in the clear
    created_at  timestamptz NOT NULL DEFAULT now(),
    role_since  timestamptz NOT NULL DEFAULT now()
);

-- At most one primary and one secondary per purpose, whatever the code does.
CREATE UNIQUE INDEX certificate_one_primary ON certificate (purpose) WHERE role = 'primary';
CREATE UNIQUE INDEX certificate_one_secondary ON certificate (purpose) WHERE role = 'secondary';
-- A sync reads the live set only: archived history costs it nothing.
CREATE INDEX certificate_live ON certificate (purpose) WHERE role <> 'archived';

CREATE TABLE node (
    id          text PRIMARY KEY,
    last_sync   timestamptz,             -- when it last installed or confirmed the live set
    last_seen   timestamptz NOT NULL DEFAULT now(),
    generation  bigint,                  -- its store's generation after that sync
    installed   jsonb NOT NULL DEFAULT '[]',  -- [{"purpose", "role", "thumbprint"}]
    last_error  text                     -- the last failed sync's one-line error, if any since
);
