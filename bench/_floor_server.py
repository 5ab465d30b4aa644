"""B0's server process: one bare grpc.aio unary method echoing raw bytes.

No interceptors, no protobuf, no health service: the cheapest unary call grpc.aio can
serve, which is what every other figure is divided by. Prints its port on stdout, then
serves until stdin closes (the parent's lifetime bounds it).
"""

from __future__ import annotations

import asyncio
import sys

import grpc

SERVICE = "bench.Floor"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def main() -> None:
    """Serve on 127.0.0.1:0 until stdin reaches EOF."""
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # EOF when the parent goes away
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
