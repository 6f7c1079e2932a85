-- The claim plans its statements once per connection (issue 24, item 3).
--
-- relay_claim (0019) left plan_cache_mode at its default, so PL/pgSQL planned
-- the claim's main statement (the pick, the lease, the update) afresh at every
-- call: the planner found the custom plan cheaper than the generic one, and a
-- custom plan is made again each time. pg_stat_statements over a drain of 20,000
-- deliveries (bench/drain.py, 634 claims): 235 ms of planning for 554 ms of
-- execution, 370 µs a claim. The generic plan is the one its settings already
-- force (the due index, in its order, rows locked and updated by ctid:
-- tests/integration/test_claim_cost.py and test_delivery_plan.py hold it), so it
-- is planned once per connection, as relay_record and relay_ingest are (0017,
-- 0018). The payloads' read stays an EXECUTE: planned with the ids as values, it
-- opens only their events' partitions.
ALTER FUNCTION relay_claim(text, int, int, float8, text, int, float8, int, text[], int)
    SET plan_cache_mode = force_generic_plan;
