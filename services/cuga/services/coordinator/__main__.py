"""``python -m cuga.services.coordinator``: serve the coordinator."""

from __future__ import annotations

if __name__ == "__main__":
    from cuga.shared import grpc_env

    grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

    from cuga.services.coordinator.app import build
    from cuga.shared.bootstrap import serve
    from cuga.shared.config import load_settings
    from cuga.shared.loop import run

    settings = load_settings()
    run(serve("coordinator", build, settings), settings.common.event_loop)
