-- farmkeys config DB, migration 8: requests the leader can authenticate (farmkeys/requests.py).
-- The command that files a request signs it: `body` is the request's canonical bytes (every
-- field the leader acts on, the row's id, a nonce, its creation time and expiry), `mac` an
-- HMAC under a key derived from a master key. The leader acts on `body` alone, and refuses a
-- row without a valid MAC or whose columns disagree with it; the columns stay for reading.
ALTER TABLE rollover_request
    ADD COLUMN body bytea,
    ADD COLUMN mac  bytea CHECK (mac IS NULL OR octet_length(mac) = 32);

-- The thumbprints each node remembers as urgently replaced (its store's manifest), so
-- `farmkeys repair-state` can show the operator any the repair would not keep. Reported by
-- the node, so never an input to what the leader writes: only shown.
ALTER TABLE node ADD COLUMN revoked text[] NOT NULL DEFAULT '{}';

-- A relying party's fetch, marked by the node that served it (farmkeys/fetch_record.py):
-- an HMAC over the farm, the relying party and the thumbprint under a key derived from
-- master key `mac_key`. `policy.require_fetch` counts only the rows whose MAC verifies.
ALTER TABLE relying_party_fetch
    ADD COLUMN mac     bytea CHECK (mac IS NULL OR octet_length(mac) = 32),
    ADD COLUMN mac_key uuid;
