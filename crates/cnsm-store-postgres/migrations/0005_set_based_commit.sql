-- cnsm PostgreSQL store, schema version 5: a batch committed by one call (instead of one
-- `cnsm_commit_item` call per item), so that `BEGIN`, the call and `COMMIT` travel together in
-- one round trip: `cnsm_commit_items` (at the end) locks and decides, `cnsm_commit_batch`
-- writes the accepted items with set-based statements.
--
-- `cnsm_commit_batch`: the caller has already, in the same transaction, locked the rows of
-- every existing instance of the batch (in one order) and decided which items commit: the
-- compare-and-swap on the version, the previous-hash link, and idempotency keys not already
-- taken were checked under those locks. Arrays hold the accepted items in batch order (one
-- instance's items in chain order); `p_uid` is the instance's uid, NULL for an instance the
-- batch creates.
--
-- The database still guards the chain by itself: (uid, version) is unique in `cnsm_records`,
-- and every updated row must still be at the version and hash the caller read (else the batch
-- fails with a serialization failure and is retried from the start). A create that finds the
-- instance created meanwhile by another node fails the same way; the retry reads the row and
-- answers the create as a conflict.
--
-- Returns the uid of every item, in order. Commits are announced with pg_notify on
-- `p_channel`: `p_origin`, then `uid:version` pairs, in payloads of at most 150 pairs (under
-- PostgreSQL's 8000-byte limit whatever the numbers).
CREATE FUNCTION cnsm_commit_batch(
    p_uid bigint[], p_expected bigint[], p_prev_hash bytea[],
    p_namespace text[], p_id text[], p_version bigint[], p_hash bytea[], p_bytes bytea[],
    p_machine text[], p_state text[], p_status smallint[], p_labels text[], p_body bytea[],
    p_timer_due bigint[], p_timer_seq bigint[], p_timer_kind smallint[],
    p_key text[], p_key_hash bytea[], p_key_expires bigint[],
    p_channel text, p_origin text)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_creates integer;
    v_created integer;
    v_created_uids bigint[];
    v_created_namespaces text[];
    v_created_ids text[];
    v_to_update integer;
    v_updated integer;
    v_uids bigint[];
    v_payload text;
BEGIN
    v_uids := p_uid;
    -- New instances: the row as the create item leaves it (a later item of the batch updates
    -- it); then each item of a new instance gets the uid its create was given.
    SELECT count(*) INTO v_creates FROM unnest(p_uid, p_expected) u(uid, expected)
     WHERE u.uid IS NULL AND u.expected IS NULL;
    IF v_creates > 0 THEN
        WITH created AS (
            INSERT INTO cnsm_instances (namespace, id, machine, state, status, version,
                                        last_hash, labels, body, timer_due_ms,
                                        timer_entry_seq, timer_kind)
            SELECT u.namespace, u.id, u.machine, u.state, u.status, u.version, u.hash,
                   u.labels::jsonb, u.body, u.timer_due, u.timer_seq, u.timer_kind
              FROM unnest(p_uid, p_expected, p_namespace, p_id, p_machine, p_state, p_status,
                          p_version, p_hash, p_labels, p_body, p_timer_due, p_timer_seq,
                          p_timer_kind)
                   u(uid, expected, namespace, id, machine, state, status, version, hash, labels,
                     body, timer_due, timer_seq, timer_kind)
             WHERE u.uid IS NULL AND u.expected IS NULL
            ON CONFLICT (namespace, id) DO NOTHING
            RETURNING uid, namespace, id)
        SELECT count(*), array_agg(uid), array_agg(namespace), array_agg(id)
          INTO v_created, v_created_uids, v_created_namespaces, v_created_ids
          FROM created;
        IF v_created <> v_creates THEN
            RAISE EXCEPTION 'an instance of the batch was created concurrently'
                  USING ERRCODE = 'serialization_failure';
        END IF;
        SELECT array_agg(coalesce(u.uid, c.uid) ORDER BY u.ord) INTO v_uids
          FROM unnest(p_uid, p_namespace, p_id) WITH ORDINALITY u(uid, namespace, id, ord)
          LEFT JOIN unnest(v_created_uids, v_created_namespaces, v_created_ids)
                    c(uid, namespace, id)
            ON u.uid IS NULL AND c.namespace = u.namespace AND c.id = u.id;
    END IF;

    -- Each instance's row set to its last item of the batch. An existing instance must still
    -- be where the caller read it (version and hash before its first item): the caller holds
    -- its row lock, so this only fails if a caller broke that rule.
    WITH last AS (
        SELECT DISTINCT ON (u.uid) u.*,
               first_value(u.expected) OVER w AS first_expected,
               first_value(u.prev_hash) OVER w AS first_prev_hash
          FROM unnest(v_uids, p_expected, p_prev_hash, p_machine, p_state, p_status,
                      p_version, p_hash, p_labels, p_body, p_timer_due, p_timer_seq,
                      p_timer_kind)
               WITH ORDINALITY
               u(uid, expected, prev_hash, machine, state, status, version, hash, labels, body,
                 timer_due, timer_seq, timer_kind, ord)
        WINDOW w AS (PARTITION BY u.uid ORDER BY u.ord)
         ORDER BY u.uid, u.ord DESC),
    updated AS (
        UPDATE cnsm_instances i
           SET machine = l.machine, state = l.state, status = l.status, version = l.version,
               last_hash = l.hash, labels = l.labels::jsonb, body = l.body,
               timer_due_ms = l.timer_due, timer_entry_seq = l.timer_seq,
               timer_kind = l.timer_kind, lease_until_ms = NULL, lease_node = NULL
          FROM last l
         WHERE i.uid = l.uid AND l.expected IS NOT NULL
           AND (l.first_expected IS NULL
                OR (i.version = l.first_expected AND i.last_hash = l.first_prev_hash))
        RETURNING 1)
    SELECT (SELECT count(*) FROM last WHERE last.expected IS NOT NULL),
           (SELECT count(*) FROM updated)
      INTO v_to_update, v_updated;
    IF v_updated <> v_to_update THEN
        RAISE EXCEPTION 'an instance of the batch changed after it was read'
              USING ERRCODE = 'serialization_failure';
    END IF;

    -- The records, in batch order (so `seq` follows it), and the idempotency keys.
    INSERT INTO cnsm_records (uid, version, hash, bytes)
    SELECT u.uid, u.version, u.hash, u.bytes
      FROM unnest(v_uids, p_version, p_hash, p_bytes) WITH ORDINALITY
           u(uid, version, hash, bytes, ord)
     ORDER BY u.ord;
    INSERT INTO cnsm_idempotency (uid, key, request_hash, version, expires_ms)
    SELECT u.uid, u.key, u.key_hash, u.version, u.key_expires
      FROM unnest(v_uids, p_key, p_key_hash, p_version, p_key_expires)
           u(uid, key, key_hash, version, key_expires)
     WHERE u.key IS NOT NULL
    ON CONFLICT (uid, key) DO UPDATE
       SET request_hash = EXCLUDED.request_hash, version = EXCLUDED.version,
           expires_ms = EXCLUDED.expires_ms;

    FOR v_payload IN
        SELECT p_origin || ' ' || string_agg(u.uid || ':' || u.version, ' ' ORDER BY u.ord)
          FROM unnest(v_uids, p_version) WITH ORDINALITY u(uid, version, ord)
         GROUP BY (u.ord - 1) / 150
         ORDER BY (u.ord - 1) / 150
    LOOP
        PERFORM pg_notify(p_channel, v_payload);
    END LOOP;

    RETURN QUERY SELECT u.uid FROM unnest(v_uids) WITH ORDINALITY u(uid, ord) ORDER BY u.ord;
END
$$;

-- A whole batch in one call, so that `BEGIN`, this call and `COMMIT` travel together in one
-- round trip: locks the rows of every existing instance of the batch in (namespace, id) order,
-- decides every item under those locks exactly as `cnsm_commit_item` does one (a create of an
-- existing instance, a version or previous-hash mismatch, an idempotency key the instance
-- holds unexpired or an earlier item of the batch took: a conflict; each item sees the items
-- before it), then writes the accepted ones with `cnsm_commit_batch`. Returns, per item in
-- order: committed, the uid when committed, the instance's version as seen when not.
CREATE FUNCTION cnsm_commit_items(
    p_expected bigint[], p_prev_hash bytea[],
    p_namespace text[], p_id text[], p_version bigint[], p_hash bytea[], p_bytes bytea[],
    p_machine text[], p_state text[], p_status smallint[], p_labels text[], p_body bytea[],
    p_timer_due bigint[], p_timer_seq bigint[], p_timer_kind smallint[],
    p_key text[], p_key_hash bytea[], p_key_expires bigint[], p_now bigint[],
    p_channel text, p_origin text)
RETURNS TABLE (o_committed boolean, o_uid bigint, o_actual bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer := coalesce(array_length(p_version, 1), 0);
    v_ok boolean[] := array_fill(false, ARRAY[v_n]);
    v_uid bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_actual bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_written bigint[];
    r record;
    i integer;
    v_k integer;
    a_uid bigint[];
    a_expected bigint[];
    a_prev_hash bytea[];
    a_namespace text[];
    a_id text[];
    a_version bigint[];
    a_hash bytea[];
    a_bytes bytea[];
    a_machine text[];
    a_state text[];
    a_status smallint[];
    a_labels text[];
    a_body bytea[];
    a_timer_due bigint[];
    a_timer_seq bigint[];
    a_timer_kind smallint[];
    a_key text[];
    a_key_hash bytea[];
    a_key_expires bigint[];
    h_namespace text;
    h_id text;
    h_exists boolean;
    h_uid bigint;
    h_version bigint;
    h_hash bytea;
    h_keys text[];
BEGIN
    PERFORM 1 FROM cnsm_instances
      WHERE (namespace, id) IN (SELECT * FROM unnest(p_namespace, p_id))
      ORDER BY namespace, id FOR UPDATE;

    -- Each instance's items together, in batch order, with the instance's row as locked and
    -- whether the item's key is taken in the store.
    FOR r IN
        SELECT u.ord, u.namespace, u.id, l.uid, l.version, l.last_hash,
               (k.uid IS NOT NULL) AS key_taken
          FROM unnest(p_namespace, p_id, p_key, p_now) WITH ORDINALITY
               u(namespace, id, key, now, ord)
          LEFT JOIN cnsm_instances l ON l.namespace = u.namespace AND l.id = u.id
          LEFT JOIN cnsm_idempotency k
                 ON k.uid = l.uid AND k.key = u.key AND k.expires_ms > u.now
         ORDER BY u.namespace, u.id, u.ord
    LOOP
        IF h_namespace IS DISTINCT FROM r.namespace OR h_id IS DISTINCT FROM r.id THEN
            h_namespace := r.namespace;
            h_id := r.id;
            h_exists := r.uid IS NOT NULL;
            h_uid := r.uid;
            h_version := r.version;
            h_hash := r.last_hash;
            h_keys := '{}';
        END IF;
        i := r.ord;
        IF p_expected[i] IS NULL THEN
            IF h_exists THEN
                v_actual[i] := h_version;
                CONTINUE;
            END IF;
            h_exists := true;
        ELSE
            IF NOT h_exists THEN
                CONTINUE;
            END IF;
            IF h_version <> p_expected[i] OR h_hash <> p_prev_hash[i]
               OR (p_key[i] IS NOT NULL AND (r.key_taken OR p_key[i] = ANY (h_keys))) THEN
                v_actual[i] := h_version;
                CONTINUE;
            END IF;
            IF p_key[i] IS NOT NULL THEN
                h_keys := h_keys || p_key[i];
            END IF;
        END IF;
        v_ok[i] := true;
        v_uid[i] := h_uid;
        h_version := p_version[i];
        h_hash := p_hash[i];
    END LOOP;

    IF true = ANY (v_ok) THEN
        SELECT array_agg(v_uid[o] ORDER BY o), array_agg(p_expected[o] ORDER BY o),
               array_agg(p_prev_hash[o] ORDER BY o), array_agg(p_namespace[o] ORDER BY o),
               array_agg(p_id[o] ORDER BY o), array_agg(p_version[o] ORDER BY o),
               array_agg(p_hash[o] ORDER BY o), array_agg(p_bytes[o] ORDER BY o),
               array_agg(p_machine[o] ORDER BY o), array_agg(p_state[o] ORDER BY o),
               array_agg(p_status[o] ORDER BY o), array_agg(p_labels[o] ORDER BY o),
               array_agg(p_body[o] ORDER BY o), array_agg(p_timer_due[o] ORDER BY o),
               array_agg(p_timer_seq[o] ORDER BY o), array_agg(p_timer_kind[o] ORDER BY o),
               array_agg(p_key[o] ORDER BY o), array_agg(p_key_hash[o] ORDER BY o),
               array_agg(p_key_expires[o] ORDER BY o)
          INTO a_uid, a_expected, a_prev_hash, a_namespace, a_id, a_version, a_hash, a_bytes,
               a_machine, a_state, a_status, a_labels, a_body, a_timer_due, a_timer_seq,
               a_timer_kind, a_key, a_key_hash, a_key_expires
          FROM generate_subscripts(v_ok, 1) o
         WHERE v_ok[o];
        SELECT array_agg(w.uid ORDER BY w.n) INTO v_written
          FROM cnsm_commit_batch(a_uid, a_expected, a_prev_hash, a_namespace, a_id, a_version,
                                 a_hash, a_bytes, a_machine, a_state, a_status, a_labels,
                                 a_body, a_timer_due, a_timer_seq, a_timer_kind, a_key,
                                 a_key_hash, a_key_expires, p_channel, p_origin)
               WITH ORDINALITY w(uid, n);
        v_k := 0;
        FOR i IN 1 .. v_n LOOP
            IF v_ok[i] THEN
                v_k := v_k + 1;
                v_uid[i] := v_written[v_k];
            END IF;
        END LOOP;
    END IF;
    RETURN QUERY SELECT v_ok[o], v_uid[o], v_actual[o]
                   FROM generate_subscripts(v_ok, 1) o ORDER BY o;
END
$$;
