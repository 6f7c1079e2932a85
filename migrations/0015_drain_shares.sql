-- A target's cap is shared by the worker processes that drain it (issue 24).
--
-- A target's claims are capped at max_in_flight leases in all (0014). The first
-- worker process to drain a target claimed the whole cap and, recording and
-- claiming again at once, kept it: a second process woken for the same target
-- found no room, ended its drainer, and stayed idle while the first ran at a full
-- core (durable_ratio.py: one process at 68 % of a core, the other at 1 %, with
-- the machine 35 % idle).
--
-- Each drainer that sees more due deliveries than it could claim (a backlog)
-- keeps a row here for a second. A claim divides the cap by the drainers that
-- keep one (itself and the others), and holds no more than its part; a drainer
-- kept out by the others' leases keeps its row and tries again shortly. A row
-- is deleted when its drainer ends; one left by a dead process lapses.
--
-- Unlogged: the rows live a second and mean nothing after a crash.

CREATE UNLOGGED TABLE drain_shares (
    target_id text NOT NULL,
    holder    text NOT NULL,
    until     timestamptz NOT NULL,
    PRIMARY KEY (target_id, holder)
);
