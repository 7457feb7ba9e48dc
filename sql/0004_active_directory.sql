-- farmkeys config DB, migration 4: Active Directory farms.

-- Which directory server (domain controller) each node last bound to, so `status` can name
-- it when `directory.url` lists several.
ALTER TABLE node ADD COLUMN directory_server text;

-- `farmkeys import adfs` hands an AD FS certificate to the leader through the request table.
-- Its PKCS#12 travels sealed under the farm's current master key, bound to the id its row
-- will have (never in the clear); the leader opens it, checks it again and writes the row.
ALTER TABLE rollover_request
    ADD COLUMN import_certificate uuid,
    ADD COLUMN import_blob        bytea,
    ADD COLUMN import_role        text CHECK (import_role IN ('primary', 'secondary')),
    ADD COLUMN import_source      text,
    ADD CONSTRAINT rollover_request_import CHECK (
        (import_blob IS NULL) = (import_certificate IS NULL)
        AND (import_blob IS NULL) = (import_role IS NULL)
        AND (import_blob IS NULL OR purpose IN ('signing', 'decryption'))
    );
