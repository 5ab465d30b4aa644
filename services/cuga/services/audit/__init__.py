"""The audit authority: a durable, tamper-evident trail of every orchestration decision."""
