-- cnsm PostgreSQL store, schema version 3: push delivery (cursors with a lease per target, and
-- dead letters).

CREATE TABLE cnsm_delivery_cursors (
    -- namespace/machine/target
    target         text COLLATE "C" PRIMARY KEY,
    -- The commit position (cnsm_records.seq) below which every matching record is finished.
    position       bigint NOT NULL,
    -- The node delivering for the target, until when (ms since the epoch).
    lease_node     text NOT NULL,
    lease_until_ms bigint NOT NULL
);

CREATE TABLE cnsm_dead_letters (
    target   text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    -- The DeadLetter as JSON.
    body     bytea NOT NULL,
    PRIMARY KEY (target, position)
);
