"""The planning authority: turns a goal into a validated plan DAG and owns its state."""
