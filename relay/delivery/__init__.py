"""What is sent and what an answer means: wake-ups, ordering, signing, the guarded client."""
