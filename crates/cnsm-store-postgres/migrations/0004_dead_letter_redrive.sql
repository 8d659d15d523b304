-- cnsm PostgreSQL store, schema version 4: an operator's redrive of a dead letter (who asked,
-- when), kept beside the letter; the letter's JSON body is stored without it.

ALTER TABLE cnsm_dead_letters
    ADD COLUMN redrive_requested_ms bigint,
    ADD COLUMN redrive_actor text;

-- The deliverer of a target reads its marked letters in position order.
CREATE INDEX cnsm_dead_letters_redrive ON cnsm_dead_letters (target, position)
    WHERE redrive_requested_ms IS NOT NULL;
