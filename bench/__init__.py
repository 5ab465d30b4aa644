"""``make bench``: the orchestrator measured against the bare gRPC floor and LangGraph.

Every figure is compared with a baseline measured in the same run (see
``docs/performance.md``); absolute times on shared machines vary from run to run, ratios
hold. ``python -m bench.run --help`` lists the options.
"""
