-- farmkeys config DB, migration 7: which relying party fetched which signing keys
-- (farmkeys/publish.py). One row per relying party and signing thumbprint it was served in
-- the metadata or the JWKS; `policy.require_fetch` promotes a signing secondary only when
-- every listed relying party has a row for it. Public facts only: no key material.
CREATE TABLE relying_party_fetch (
    relying_party     text NOT NULL CHECK (relying_party ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    thumbprint        text NOT NULL CHECK (thumbprint ~ '^[0-9A-F]{40}$'),
    first_fetched_at  timestamptz NOT NULL DEFAULT now(),
    last_fetched_at   timestamptz NOT NULL DEFAULT now(),
    node              text NOT NULL,      -- the node that answered the last fetch
    document          text NOT NULL CHECK (document IN ('metadata', 'jwks')),
    PRIMARY KEY (relying_party, thumbprint)
);
