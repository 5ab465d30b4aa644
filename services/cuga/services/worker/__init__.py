"""The worker authority: runs plan steps by calling tools, exactly once per idempotency key."""
