-- farmkeys config DB, migration 9: who asked for what the leader did (issue 22).
-- A request's signed body names the account and host its command ran as and on and the
-- operator's --reason (farmkeys/formats/request.py, format 2); these columns are copies for
-- reading, which the leader refuses when they differ from the body. NULL: a request of a
-- farmkeys before format 2, or a row a DB writer made.
ALTER TABLE rollover_request
    ADD COLUMN account text,
    ADD COLUMN host    text,
    ADD COLUMN reason  text;

-- Each event the leader wrote while carrying out an authenticated request: the request, and
-- who asked as its verified body says (account and host NULL for a format-1 body); the leader
-- only ever copies them from a body whose MAC verified, and a refused request's claimed
-- requester stays in `detail`. NULL request with an account: a command that changed the farm
-- itself (`init`, `escrow`, `nodes remove`) naming who ran it. All NULL: the leader's own
-- schedule.
ALTER TABLE audit_event
    ADD COLUMN request bigint,
    ADD COLUMN account text,
    ADD COLUMN host    text,
    ADD COLUMN reason  text;
