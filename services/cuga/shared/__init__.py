"""Code every cuga service shares: bootstrap, configuration, errors, telemetry, storage.

Services import this package, the generated protos and the clients; never each other.
"""
