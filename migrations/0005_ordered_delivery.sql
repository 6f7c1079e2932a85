-- Ordered delivery per object (issue 14).
--
-- A target with ordering 'object' gives each of its deliveries an order_key
-- (objectType + objectId of the event, or the value at the target's JSON
-- pointer) and a position in that key's queue (order_pos, drawn from a
-- sequence while the key's advisory lock is held, so positions follow commit
-- order). Of a key's undelivered deliveries one at a time is "active" (due,
-- leased or retrying); the others are parked: pending with no next_attempt_at.
-- When the active one ends (succeeded, or dead with on_dead 'skip'), the parked
-- one with the lowest position becomes due, in the same transaction.

ALTER TABLE targets
    ADD COLUMN ordering text NOT NULL DEFAULT 'none' CHECK (ordering IN ('none', 'object')),
    ADD COLUMN ordering_key text CHECK (ordering_key IS NULL OR ordering_key LIKE '/%'),
    ADD COLUMN on_dead text NOT NULL DEFAULT 'skip' CHECK (on_dead IN ('skip', 'block'));

CREATE SEQUENCE deliveries_order_pos_seq AS bigint;

ALTER TABLE deliveries
    ADD COLUMN order_key text,
    ADD COLUMN order_pos bigint,
    ADD CONSTRAINT deliveries_order_check CHECK ((order_key IS NULL) = (order_pos IS NULL));

-- A parked delivery is pending without a next attempt time.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_schedule_check CHECK (
    (status IN ('pending', 'retrying')) = (next_attempt_at IS NOT NULL)
    OR (status = 'pending' AND next_attempt_at IS NULL AND order_key IS NOT NULL)
);

-- A key's queue: its head, what is parked behind it, and (on_dead 'block') its dead letters.
CREATE INDEX deliveries_order_idx ON deliveries (target_id, order_key, order_pos)
    WHERE order_key IS NOT NULL AND status IN ('pending', 'retrying', 'dead');
