-- farmkeys config DB, migration 10: whether a node's `serve` runs, and which farmkeys it runs.
-- `stopped_at`: when its `serve` stopped cleanly (NULL while it serves, or if it never did);
-- `status` warns when a node has been stopped longer than `[status] stopped_warning_seconds`.
-- `software_version`: the farmkeys version its last heartbeat or sync reported, for a
-- rolling upgrade. Both unauthenticated, like the rest of the row: shown, never acted on.
ALTER TABLE node
    ADD COLUMN stopped_at timestamptz,
    ADD COLUMN software_version text;
