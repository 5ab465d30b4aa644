"""gRPC core's settings for cuga's own processes, which gRPC reads once, when it loads.

gRPC core takes some settings only from the environment, and only when ``grpc`` is first
imported: setting them later changes nothing. Every process cuga starts (the six services'
``__main__``, the ``cuga`` command, the benchmarks, the test suite) calls :func:`apply`
before anything imports ``grpc``; the library clients never do, so an application that
embeds them keeps its own gRPC settings.

``GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`` (the default here) runs
client channels and servers on gRPC core's own poller (``epoll1``, driven from the
completion-queue thread) instead of the EventEngine's thread pool: one thread hop less per
message each way. Measured on 2 cores with grpcio 1.85.1: a message on an open stream costs
~30 % less CPU at both ends, B1's time per step falls 5 to 8 % (``docs/performance.md``).
That poller is what gRPC Python ran on by default until grpcio 1.80 moved it onto the
EventEngine; gRPC means to remove the switch some releases later (grpc/grpc#42150).
An operator who sets ``GRPC_EXPERIMENTS`` (empty included, which means gRPC's own
defaults) keeps that value. Revisit on every grpcio upgrade: a test fails when gRPC no
longer knows an experiment named here, and ``make bench`` measures the difference.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set cuga's gRPC core defaults in ``environ`` unless already set.

    Raises:
        RuntimeError: gRPC is already loaded and the setting is not in ``environ``: it
            would be ignored silently, so the caller's import order is wrong.
    """
    if "GRPC_EXPERIMENTS" in environ:
        return
    if "grpc" in sys.modules:
        raise RuntimeError(
            "cuga.shared.grpc_env.apply() must run before grpc is imported:"
            " gRPC core reads GRPC_EXPERIMENTS only when it loads"
        )
    environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
