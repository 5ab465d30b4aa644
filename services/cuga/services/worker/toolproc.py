"""The tool processes' side: the zygote that forks them, their loop, the wire format.

A worker's :class:`~cuga.services.worker.processes.ToolProcessPool` starts one *zygote*,
``python -m cuga.services.worker.toolproc <control fd> <config>``: a fresh interpreter
(never a fork of the gRPC server process, whose threads make plain ``fork`` unsafe) that
imports the tools' modules once, then forks a tool process whenever the pool sends it a
socket (on the control socket, with SCM_RIGHTS), answers with the new pid, and reports
each child's exit status when it reaps it. The zygote ends when the pool closes the
control socket (or the worker dies); its children are killed with it (PR_SET_PDEATHSIG),
so no tool process outlives its worker.

A tool process serves one call at a time on its socket. A frame is a 4-byte big-endian
length and that many bytes. The request is a pickle of ``(handler, inputs, context)`` (the
handler travels by module and name); the answer is one tag byte and a body: ``V`` the
output as a ``google.protobuf.Value``, ``S`` the ``google.rpc.Status`` of a ``CugaError``
the handler raised, ``E`` JSON describing any other exception, ``N`` an output that is not
JSON, ``L`` an output over the size limit. The worker never unpickles what a tool process
sends.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Sequence

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from cuga.services.worker.runners import (
    ToolOutputNotJson,
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolRaised,
)
from cuga.shared.errors import (
    GRPC_DETAILS_METADATA_KEY,
    CugaError,
    FailureMode,
    classify_failure,
    from_rpc_error,
    status_code,
    to_status,
)
from cuga.shared.messages import to_value

#: A frame's length prefix.
HEADER = struct.Struct("!I")
#: A zygote's report: kind (``P`` forked, ``X`` exited), pid, exit code (-N: signal N).
REPORT = struct.Struct("!cii")
FORKED, EXITED = b"P", b"X"
_OUTPUT, _CUGA_ERROR, _RAISED, _NOT_JSON, _TOO_LARGE = b"V", b"S", b"E", b"N", b"L"
#: Room for an answer's envelope (tag, error details) on top of the output limit.
ENVELOPE_BYTES = 64 * 1024
#: Longest exception message a tool process reports (the agent caps the message again).
_MESSAGE_CHARS = 1000


def decode(frame: bytes) -> struct_pb2.Value | BaseException:
    """A tool process's answer: the output, or the exception it stands for.

    Raises:
        ToolProcessFailed: the answer is malformed.
    """
    tag, body = frame[:1], frame[1:]
    try:
        if tag == _OUTPUT:
            return struct_pb2.Value.FromString(body)
        if tag == _CUGA_ERROR:
            status = status_pb2.Status.FromString(body)
            return from_rpc_error(
                status_code(status.code), status.message, ((GRPC_DETAILS_METADATA_KEY, body),)
            )
        if tag == _RAISED:
            info = json.loads(body)
            if info["timeout"]:
                return TimeoutError(str(info["message"]))
            return ToolRaised(str(info["type"]), str(info["message"]), FailureMode(info["mode"]))
        if tag == _NOT_JSON:
            return ToolOutputNotJson(body.decode())
        if tag == _TOO_LARGE:
            return ToolOutputTooLarge(int(body))
    except (ValueError, KeyError, TypeError, DecodeError) as exc:
        raise ToolProcessFailed(f"it answered a malformed message ({type(exc).__name__})") from None
    raise ToolProcessFailed(f"it answered a message of unknown kind {tag!r}")


# -- a tool process ----------------------------------------------------------------------


def serve(channel: socket.socket, max_output_bytes: int) -> None:
    """A tool process: answer one handler call per request until the worker closes."""
    limit = max_output_bytes + ENVELOPE_BYTES
    with channel:
        while True:
            request = _receive(channel)
            if request is None:
                return
            answer = _answer(request, max_output_bytes)
            if len(answer) > limit:  # an exception's details, absurdly large
                answer = _raised(
                    "ToolError", "the error was too large to report", FailureMode.AGENT
                )
            channel.sendall(HEADER.pack(len(answer)) + answer)


def _receive(channel: socket.socket) -> bytes | None:
    header = _read_exactly(channel, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    return _read_exactly(channel, size)


def _read_exactly(channel: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = channel.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


def _answer(request: bytes, max_output_bytes: int) -> bytes:
    try:
        handler, inputs, context = pickle.loads(request)  # from the worker, never from a tool
        output = handler(inputs, context)
    except CugaError as exc:
        _, _, trailing = to_status(exc)
        return _CUGA_ERROR + trailing[0][1]
    except BaseException as exc:  # whatever a handler raises is answered, never fatal
        if isinstance(exc, TimeoutError):
            return _raised(type(exc).__name__, _text(exc), FailureMode.RESOURCE, timeout=True)
        return _raised(type(exc).__name__, _text(exc), classify_failure(exc))
    try:
        value = to_value(output)
    except Exception as exc:  # not JSON
        return _NOT_JSON + type(exc).__name__.encode()
    size = value.ByteSize()
    if size > max_output_bytes:
        return _TOO_LARGE + str(size).encode()
    return _OUTPUT + value.SerializeToString()


def _raised(type_name: str, message: str, mode: FailureMode, *, timeout: bool = False) -> bytes:
    body = {"type": type_name, "message": message, "mode": int(mode), "timeout": timeout}
    return _RAISED + json.dumps(body).encode()


def _text(exc: BaseException) -> str:
    try:
        return str(exc)[:_MESSAGE_CHARS]
    except Exception:
        return "(no message)"


# -- the zygote --------------------------------------------------------------------------


def zygote(control: socket.socket, preload: Sequence[str], max_output_bytes: int) -> None:
    """Fork a tool process for every socket received on ``control``; report exits.

    Returns when ``control`` reaches its end or breaks (the pool closed it, or the worker
    died).
    """
    with contextlib.suppress(ConnectionError):
        _zygote(control, preload, max_output_bytes)


def _zygote(control: socket.socket, preload: Sequence[str], max_output_bytes: int) -> None:
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the tool fails when called instead, with this error
            print(f"cuga tool processes: cannot preload {module}: {exc!r}", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when tools stop
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is control:
                message, fds, _, _ = socket.recv_fds(control, 1, 1)
                if not message:
                    return
                for fd in fds[1:]:
                    os.close(fd)
                if not fds:
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    control.close()
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    _run_child(fds[0], max_output_bytes)
                os.close(fds[0])
                control.sendall(REPORT.pack(FORKED, pid, 0))
            else:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _report_exits(control)


def _report_exits(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.sendall(REPORT.pack(EXITED, pid, os.waitstatus_to_exitcode(status)))


def _run_child(fd: int, max_output_bytes: int) -> None:
    """The forked child: become a tool process, never return into the zygote's loop."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _detach()
        serve(socket.socket(fileno=fd), max_output_bytes)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _detach() -> None:
    # Its own process group, so a kill reaches whatever the handler started too; and
    # killed with the zygote (which ends with the worker), so it cannot outlive either.
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        zygote_pid = os.getppid()
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != zygote_pid:  # it died before the request took effect
            os._exit(1)


def main(argv: Sequence[str]) -> None:
    """``toolproc <control fd> <config JSON: sys_path, preload, max_output_bytes>``."""
    config = json.loads(argv[2])
    sys.path[:] = config["sys_path"]  # the worker's, so the same handlers import
    with socket.socket(fileno=int(argv[1])) as control:
        zygote(control, config["preload"], int(config["max_output_bytes"]))


if __name__ == "__main__":
    main(sys.argv)
