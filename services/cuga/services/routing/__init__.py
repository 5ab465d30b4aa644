"""The routing authority: a live worker registry and the policies that pick a worker per step."""
