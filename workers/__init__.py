"""Dramatiq workers: the broker, the deliver actor and the sweeper."""
