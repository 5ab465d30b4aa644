"""B0's server process: one bare grpc.aio unary method echoing raw bytes.

No interceptors, no protobuf, no health service: the cheapest unary call grpc.aio can
serve, which is what every other figure is divided by. A second method streams paced
messages (what one server-stream message costs when messages come one at a time, as a
run's events do). Prints its port on stdout, then serves until stdin closes (the parent's
lifetime bounds it).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

SERVICE = "bench.Floor"
METHOD = f"/{SERVICE}/Echo"
STREAM_METHOD = f"/{SERVICE}/Paced"


def paced_request(messages: int, pace_s: float, *, send: bool) -> bytes:
    """The Paced request: ``messages`` waits of ``pace_s``, each followed by a message
    when ``send`` (without: the same waits and one message at the end, the control)."""
    return f"{messages},{pace_s},{int(send)}".encode()


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _paced(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    count, pace, send = request.decode().split(",")
    message = b"x" * 200  # about an OrchestrationEvent's size
    for _ in range(int(count)):
        await asyncio.sleep(float(pace))
        if send == "1":
            yield message
    yield message


async def main() -> None:
    """Serve on 127.0.0.1:0 until stdin reaches EOF."""
    server = grpc.aio.server()
    handlers = {  # no (de)serializers: raw bytes
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Paced": grpc.unary_stream_rpc_method_handler(_paced),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # EOF when the parent goes away
    await server.stop(0)


if __name__ == "__main__":
    from cuga.shared.loop import run

    run(main())  # on the services' loop, as B0's client
