"""The worker's end of a tool process's socket, against a peer that breaks the protocol
(issue 24).

The pool trusts nothing a tool process sends: the test plays a tool process gone wrong on
the other end of a real socket pair, and each misbehaviour fails the pending call with the
error the pool acts on (kill and replace the process), never a hang or a buffer of
whatever size the peer announced.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from cuga.services.worker import toolproc
from cuga.services.worker.processes import _Channel, _exit_text
from cuga.services.worker.runners import ToolOutputTooLarge, ToolProcessFailed

MAX_FRAME = 100
BOUND_S = 10.0


@pytest.fixture
async def pair() -> AsyncIterator[tuple[_Channel, socket.socket]]:
    """A channel on the worker's end and the raw socket of the 'tool process'."""
    worker_end, tool_end = socket.socketpair()
    channel = _Channel(MAX_FRAME)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, worker_end)
    yield channel, tool_end
    tool_end.close()
    assert channel.transport is not None
    channel.transport.close()


def frame(body: bytes) -> bytes:
    return toolproc.HEADER.pack(len(body)) + body


async def test_a_reply_that_arrives_in_pieces_is_assembled(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, tool = pair
    reply = channel.send(b"request")
    assert toolproc.HEADER.unpack(tool.recv(4))[0] == len(b"request")
    assert tool.recv(100) == b"request"
    whole = frame(b"V" + b"x" * 50)
    # as the loop would hand them over: part of the header, the rest of it, the body in
    # two parts
    for piece in (whole[:2], whole[2:6], whole[6:30], whole[30:]):
        assert not reply.done()
        channel.data_received(piece)
    async with asyncio.timeout(BOUND_S):
        assert await reply == b"V" + b"x" * 50
    assert channel.open
    # and the next call on the same process works the same
    second = channel.send(b"again")
    tool.sendall(frame(b"V2"))
    async with asyncio.timeout(BOUND_S):
        assert await second == b"V2"


async def test_a_frame_over_the_limit_fails_the_call_unbuffered(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, tool = pair
    reply = channel.send(b"request")
    tool.sendall(toolproc.HEADER.pack(MAX_FRAME + 1) + b"V")  # announces more than allowed
    with pytest.raises(ToolOutputTooLarge) as large:
        async with asyncio.timeout(BOUND_S):
            await reply
    assert large.value.size == MAX_FRAME  # the body less its tag byte
    assert not channel.open


async def test_a_message_nobody_asked_for_breaks_the_channel(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, _ = pair
    channel.data_received(frame(b"Vunasked"))  # no call is waiting for it
    assert not channel.open


async def test_two_answers_to_one_request_fail_the_call_at_once(
    pair: tuple[_Channel, socket.socket],
) -> None:
    # (before, the call was left waiting until its deadline, the error never delivered)
    channel, tool = pair
    reply = channel.send(b"request")
    tool.sendall(frame(b"Vone") + frame(b"Vtwo"))
    with pytest.raises(ToolProcessFailed, match="it sent a message nobody asked for"):
        async with asyncio.timeout(BOUND_S):
            await reply
    assert not channel.open


async def test_a_process_that_ends_during_its_call_fails_it_and_is_reported_lost(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, tool = pair
    lost = asyncio.Event()
    channel.on_lost = lost.set
    reply = channel.send(b"request")
    tool.sendall(toolproc.HEADER.pack(10) + b"V12")  # dies halfway through its answer
    tool.close()
    with pytest.raises(ToolProcessFailed, match="its process ended during the call"):
        async with asyncio.timeout(BOUND_S):
            await reply
    async with asyncio.timeout(BOUND_S):
        await lost.wait()
    assert not channel.open


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (None, "exit status unknown"),
        (0, "exit code 0"),
        (3, "exit code 3"),
        (-9, "killed by SIGKILL"),
        (-11, "killed by SIGSEGV"),
        (-200, "killed by signal 200"),
    ],
)
def test_an_exit_status_is_told_the_way_an_operator_reads_it(code: int | None, text: str) -> None:
    assert _exit_text(code) == text
