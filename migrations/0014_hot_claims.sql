-- A claim writes no index entry of its delivery (issue 24, item 3).
--
-- A claim leased its deliveries by setting locked_until and enqueued_until,
-- both indexed (deliveries_leased_idx, deliveries_target_unsent_idx): every
-- claimed row got a new entry in each of the seven to nine indexes of
-- deliveries_open that cover a waiting delivery (a claim of 10 from a backlog
-- read 215 pages; 57 now), and the due index the next claim reads was left
-- with dead entries until a vacuum.
--
-- Now a claim changes only locked_until and updated_at, indexed nowhere, and
-- the partition keeps room on each page for that new version (fillfactor): the
-- update is HOT. What the two indexes gave is had otherwise:
--   * a target's leases are counted (its cap across worker processes) in
--     delivery_leases, one small row per lease held, written by the claim and
--     removed by whatever gives the lease back (a record, a release) in the same
--     statement. A lease that lapsed (its worker died) is ignored by the count at
--     once; its row goes when the delivery is claimed again, or by the sweeper.
--   * a claimed delivery keeps the enqueued_until it had: the sweeper, which
--     wakes targets whose waiting deliveries nobody carries, passes over those
--     whose lease holds (the lease carries them), as it passed over a lease's
--     enqueued_until before.

CREATE TABLE delivery_leases (
    delivery_id  text PRIMARY KEY,
    target_id    text NOT NULL,
    locked_until timestamptz NOT NULL
);
CREATE INDEX delivery_leases_target_idx ON delivery_leases (target_id, locked_until);

INSERT INTO delivery_leases (delivery_id, target_id, locked_until)
SELECT id, target_id, locked_until FROM deliveries_open WHERE locked_until > now();

DROP INDEX deliveries_leased_idx;

-- room on each page for a claimed row's new version (pages filled before keep
-- theirs until they are rewritten; the rows they hold are moved out soon)
ALTER TABLE deliveries_open SET (fillfactor = 70);
