-- cnsm PostgreSQL store, schema version 2: canary rollouts, and an index for reading the
-- commit log in order (audit outbox).

CREATE TABLE cnsm_rollouts (
    namespace text COLLATE "C" NOT NULL,
    name      text COLLATE "C" NOT NULL,
    -- The Rollout as JSON.
    body      bytea NOT NULL,
    PRIMARY KEY (namespace, name)
);

CREATE INDEX cnsm_records_seq ON cnsm_records (seq);
