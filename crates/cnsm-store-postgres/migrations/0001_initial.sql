-- cnsm PostgreSQL store, schema version 1.
-- Text keys use the "C" collation so that ordering is by bytes, as in the embedded store.

CREATE TABLE cnsm_definitions (
    namespace  text COLLATE "C" NOT NULL,
    name       text COLLATE "C" NOT NULL,
    revision   integer NOT NULL CHECK (revision > 0),
    hash       bytea NOT NULL CHECK (length(hash) = 32),
    created_ms bigint NOT NULL,
    -- The StateMachine as JSON.
    body       bytea NOT NULL,
    PRIMARY KEY (namespace, name, revision)
);

CREATE TABLE cnsm_instances (
    uid             bigserial PRIMARY KEY,
    namespace       text COLLATE "C" NOT NULL,
    id              text COLLATE "C" NOT NULL,
    machine         text COLLATE "C" NOT NULL,
    state           text COLLATE "C" NOT NULL,
    -- 0 active, 1 succeeded, 2 failed, 3 cancelled.
    status          smallint NOT NULL,
    version         bigint NOT NULL CHECK (version >= 0),
    -- The hash of record `version`: the next record must name it as its previous hash.
    last_hash       bytea NOT NULL CHECK (length(last_hash) = 32),
    labels          jsonb NOT NULL,
    -- The Instance as JSON (the fold of its records).
    body            bytea NOT NULL,
    -- The pending timer (none once the instance is final); kind 0 timeout, 1 wait, 2 backoff.
    timer_due_ms    bigint,
    timer_entry_seq bigint,
    timer_kind      smallint,
    -- A node's claim on the due timer; every commit to the instance clears it.
    lease_until_ms  bigint,
    lease_node      text,
    UNIQUE (namespace, id)
);
CREATE INDEX cnsm_instances_timer ON cnsm_instances (timer_due_ms) WHERE timer_due_ms IS NOT NULL;
CREATE INDEX cnsm_instances_active ON cnsm_instances (namespace, machine) WHERE status = 0;

-- History: the exact sealed bytes of every record. (uid, version) is unique, so a chain never
-- forks; `seq` orders commits but is not gap-free (sequences become visible out of order).
CREATE TABLE cnsm_records (
    uid     bigint NOT NULL REFERENCES cnsm_instances (uid),
    version bigint NOT NULL CHECK (version >= 0),
    hash    bytea NOT NULL CHECK (length(hash) = 32),
    bytes   bytea NOT NULL,
    seq     bigserial NOT NULL,
    PRIMARY KEY (uid, version)
);

CREATE TABLE cnsm_idempotency (
    uid          bigint NOT NULL REFERENCES cnsm_instances (uid),
    key          text COLLATE "C" NOT NULL,
    request_hash bytea NOT NULL CHECK (length(request_hash) = 32),
    version      bigint NOT NULL,
    expires_ms   bigint NOT NULL,
    PRIMARY KEY (uid, key)
);
CREATE INDEX cnsm_idempotency_expiry ON cnsm_idempotency (expires_ms);

-- Commits one item inside the caller's transaction: compare-and-swap on the version under the
-- instance's row lock, the previous-hash link, an idempotency key not already taken, then the
-- record, the row and the key. Returns (committed, uid, actual version when not committed).
CREATE FUNCTION cnsm_commit_item(
    p_namespace text, p_id text, p_expected bigint, p_prev_hash bytea,
    p_version bigint, p_hash bytea, p_bytes bytea,
    p_machine text, p_state text, p_status smallint, p_labels text, p_body bytea,
    p_timer_due bigint, p_timer_seq bigint, p_timer_kind smallint,
    p_key text, p_key_hash bytea, p_key_expires bigint, p_now bigint)
RETURNS TABLE (o_committed boolean, o_uid bigint, o_actual bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_uid bigint;
    v_version bigint;
    v_hash bytea;
BEGIN
    IF p_expected IS NULL THEN
        INSERT INTO cnsm_instances (namespace, id, machine, state, status, version, last_hash,
                                    labels, body, timer_due_ms, timer_entry_seq, timer_kind)
        VALUES (p_namespace, p_id, p_machine, p_state, p_status, p_version, p_hash,
                p_labels::jsonb, p_body, p_timer_due, p_timer_seq, p_timer_kind)
        ON CONFLICT (namespace, id) DO NOTHING
        RETURNING uid INTO v_uid;
        IF v_uid IS NULL THEN
            SELECT version INTO v_version FROM cnsm_instances
             WHERE namespace = p_namespace AND id = p_id;
            RETURN QUERY SELECT false, NULL::bigint, v_version;
            RETURN;
        END IF;
    ELSE
        SELECT uid, version, last_hash INTO v_uid, v_version, v_hash FROM cnsm_instances
         WHERE namespace = p_namespace AND id = p_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        IF v_version <> p_expected THEN
            RETURN QUERY SELECT false, NULL::bigint, v_version;
            RETURN;
        END IF;
        -- The expected version with another record: the item was computed on top of an earlier
        -- item of its batch that lost a race to another node. A conflict, like a version
        -- mismatch; the chain stays whole either way.
        IF v_hash <> p_prev_hash THEN
            RETURN QUERY SELECT false, NULL::bigint, v_version;
            RETURN;
        END IF;
        -- A key another node committed for this instance since the request arrived.
        IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM cnsm_idempotency
                                          WHERE uid = v_uid AND key = p_key
                                            AND expires_ms > p_now) THEN
            RETURN QUERY SELECT false, NULL::bigint, v_version;
            RETURN;
        END IF;
        UPDATE cnsm_instances
           SET machine = p_machine, state = p_state, status = p_status, version = p_version,
               last_hash = p_hash, labels = p_labels::jsonb, body = p_body,
               timer_due_ms = p_timer_due, timer_entry_seq = p_timer_seq,
               timer_kind = p_timer_kind, lease_until_ms = NULL, lease_node = NULL
         WHERE uid = v_uid;
    END IF;
    INSERT INTO cnsm_records (uid, version, hash, bytes) VALUES (v_uid, p_version, p_hash, p_bytes);
    IF p_key IS NOT NULL THEN
        INSERT INTO cnsm_idempotency (uid, key, request_hash, version, expires_ms)
        VALUES (v_uid, p_key, p_key_hash, p_version, p_key_expires)
        ON CONFLICT (uid, key) DO UPDATE
           SET request_hash = EXCLUDED.request_hash, version = EXCLUDED.version,
               expires_ms = EXCLUDED.expires_ms;
    END IF;
    RETURN QUERY SELECT true, v_uid, NULL::bigint;
END
$$;
