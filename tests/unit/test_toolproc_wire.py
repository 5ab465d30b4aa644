"""The tool process wire format, both ends in this process (issue 24).

A tool process answers a pickled ``(handler, inputs, context)`` with one tag byte and a
body; the worker decodes the answer without unpickling anything. Here the tool process's
own loop (:func:`serve`) runs in a thread on one end of a socket pair and the test speaks
the worker's side: every kind of answer comes back as the value or the exception the
worker acts on, and a malformed answer is a ToolProcessFailed, never a crash.
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from cuga.services.worker.runners import (
    ToolOutputNotJson,
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolRaised,
)
from cuga.services.worker.toolproc import HEADER, decode, serve
from cuga.shared.errors import CugaError, FailureMode, InvalidArgumentError

LIMIT = 1024


def echo(inputs: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"got": inputs, "context": context}


def refuse(inputs: dict[str, Any], context: Any) -> None:
    raise InvalidArgumentError("amount", "must be positive")


def slow(inputs: dict[str, Any], context: Any) -> None:
    raise TimeoutError("the bank did not answer")


def deny(inputs: dict[str, Any], context: Any) -> None:
    raise PermissionError("not your account")


def not_json(inputs: dict[str, Any], context: Any) -> object:
    return {"when": object()}


def big(inputs: dict[str, Any], context: Any) -> str:
    return "x" * (LIMIT + 1)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text either")


def unprintable(inputs: dict[str, Any], context: Any) -> None:
    raise Unprintable()


def huge(inputs: dict[str, Any], context: Any) -> None:
    # its status would be larger than an answer may be (the output limit plus an envelope)
    raise CugaError("x" * (LIMIT + 200_000))


def leaves(inputs: dict[str, Any], context: Any) -> None:
    raise SystemExit(3)  # not even this ends the tool process


@pytest.fixture
def tool_process() -> Iterator[socket.socket]:
    """The worker's end of a socket whose other end a tool process serves."""
    worker_end, tool_end = socket.socketpair()
    thread = threading.Thread(target=serve, args=(tool_end, LIMIT), daemon=True)
    thread.start()
    yield worker_end
    worker_end.close()  # the tool process's loop ends at the end of its socket
    thread.join(timeout=10)
    assert not thread.is_alive()


def call(channel: socket.socket, handler: object, inputs: object = None) -> Any:
    request = pickle.dumps((handler, inputs or {}, {"run_id": "run-1"}))
    channel.sendall(HEADER.pack(len(request)) + request)
    header = _read(channel, HEADER.size)
    (size,) = HEADER.unpack(header)
    return decode(_read(channel, size))


def _read(channel: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = channel.recv(n - len(data))
        assert chunk, "the tool process closed its socket"
        data += chunk
    return data


def test_each_kind_of_answer_comes_back_as_what_the_worker_acts_on(
    tool_process: socket.socket,
) -> None:
    value = call(tool_process, echo, {"a": [1, "b"]})
    assert isinstance(value, struct_pb2.Value)
    assert value.struct_value["got"]["a"][1] == "b"
    assert value.struct_value["context"]["run_id"] == "run-1"

    refused = call(tool_process, refuse)
    assert isinstance(refused, CugaError)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in str(refused) and "must be positive" in str(refused)

    timeout = call(tool_process, slow)
    assert isinstance(timeout, TimeoutError)
    assert str(timeout) == "the bank did not answer"

    denied = call(tool_process, deny)
    assert isinstance(denied, ToolRaised)
    assert (denied.type_name, denied.message) == ("PermissionError", "not your account")
    assert denied.failure_mode == FailureMode.POLICY

    odd = call(tool_process, not_json)
    assert isinstance(odd, ToolOutputNotJson) and odd.type_name == "TypeError"
    too_large = call(tool_process, big)
    assert isinstance(too_large, ToolOutputTooLarge)
    assert too_large.size > LIMIT

    mute = call(tool_process, unprintable)
    assert isinstance(mute, ToolRaised)
    assert (mute.type_name, mute.message) == ("Unprintable", "(no message)")

    gone = call(tool_process, leaves)
    assert isinstance(gone, ToolRaised) and gone.type_name == "SystemExit"
    # the same process still answers after all of that
    assert call(tool_process, echo, {"n": 1}).struct_value["got"]["n"] == 1


def test_an_error_too_large_to_report_is_reported_as_such(tool_process: socket.socket) -> None:
    error = call(tool_process, huge)
    assert isinstance(error, ToolRaised)
    assert (error.type_name, error.message) == ("ToolError", "the error was too large to report")
    assert error.failure_mode == FailureMode.AGENT


def test_a_request_cut_short_ends_the_tool_process_quietly() -> None:
    worker_end, tool_end = socket.socketpair()
    thread = threading.Thread(target=serve, args=(tool_end, LIMIT), daemon=True)
    thread.start()
    worker_end.sendall(HEADER.pack(100) + b"only part of it")
    worker_end.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"V\xff\xff", "malformed message (DecodeError)"),
        (b"S\x08", "malformed message (DecodeError)"),
        (b"E{not json", "malformed message (JSONDecodeError)"),
        (b"E" + json.dumps({"type": "X"}).encode(), "malformed message (KeyError)"),
        (
            b"E" + json.dumps({"type": "X", "message": "m", "mode": 99, "timeout": False}).encode(),
            "malformed message (ValueError)",
        ),
        (b"Lmany", "malformed message (ValueError)"),
        (b"N\xff", "malformed message (UnicodeDecodeError)"),
        (b"Q", "a message of unknown kind b'Q'"),
        (b"", "a message of unknown kind b''"),
    ],
)
def test_a_malformed_answer_is_a_failed_tool_process(frame: bytes, problem: str) -> None:
    with pytest.raises(ToolProcessFailed, match=problem.replace("(", r"\(").replace(")", r"\)")):
        decode(frame)
