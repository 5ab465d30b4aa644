"""``python -m cuga.services.approval``: run the approval service."""

from __future__ import annotations

if __name__ == "__main__":
    from cuga.shared import grpc_env

    grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

    from cuga.services.approval.app import build
    from cuga.shared.bootstrap import serve
    from cuga.shared.config import load_settings
    from cuga.shared.loop import run

    settings = load_settings()
    run(serve("approval", build, settings), settings.common.event_loop)
