"""A function a migration made from the code's statements changes only by a migration."""

from __future__ import annotations

import hashlib

from relay.store import key_queues, migrations


def test_relay_record_ordered_is_the_text_its_last_migration_made() -> None:
    # Databases keep relay_record_ordered() as migration 0020's step made it: if the
    # statements it is made of change (the key locks' buckets, the promotion), the
    # record would lock or promote differently from the code's other writers of keys
    # until a migration makes it again.
    made = hashlib.sha256(key_queues.RECORD_ORDERED_FUNCTION.encode()).hexdigest()
    assert made == migrations.RECORD_ORDERED_SHA256, (
        "relay_record_ordered()'s text changed: add a migration whose Python step calls"
        " key_queues.create_record_ordered, then pin the new hash in"
        " relay/store/migrations.py (RECORD_ORDERED_SHA256)"
    )
