"""A real HTTP server on 127.0.0.1:0 that speaks OpenAI's Chat Completions protocol.

It answers ``POST /v1/chat/completions`` with recorded answers, in order, and keeps every
request (headers and body) for the test to inspect; it never reaches the network. An
answer is one of:

- ``content(text, prompt_tokens, completion_tokens)``: a normal completion;
- ``refusal(text)``: a completion whose message refuses (``message.refusal``);
- ``status(code, message)``: an HTTP error with OpenAI's error body;
- ``HANG``: no answer until the server closes (a timeout test; nothing sleeps).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG: dict[str, Any] = {"hang": True}


def content(
    text: str | dict[str, Any], prompt_tokens: int = 100, completion_tokens: int = 50
) -> dict[str, Any]:
    """A completion whose message content is ``text`` (a dict is sent as JSON text)."""
    body = text if isinstance(text, str) else json.dumps(text)
    return {"content": body, "usage": (prompt_tokens, completion_tokens)}


def refusal(text: str) -> dict[str, Any]:
    """A completion whose message is a refusal."""
    return {"refusal": text, "usage": (20, 5)}


def status(code: int, message: str) -> dict[str, Any]:
    """An HTTP error answer."""
    return {"status": code, "message": message}


@dataclass
class ChatServer:
    """The running server: its base URL, the answers left and the requests seen."""

    base_url: str
    answers: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)


def _completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    prompt, completion = answer["usage"]
    message: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
    if "refusal" in answer:
        message = {"role": "assistant", "content": None, "refusal": answer["refusal"]}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


@contextmanager
def chat_server(answers: list[dict[str, Any]]) -> Iterator[ChatServer]:
    """Serve ``answers`` on 127.0.0.1 at a free port until the block ends."""
    state: ChatServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            state.requests.append(body)
            state.headers.append({k.lower(): v for k, v in self.headers.items()})
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if not state.answers:
                self._send(500, {"error": {"message": "no recorded answer left"}})
                return
            answer = state.answers.pop(0)
            if answer.get("hang"):
                state.released.wait()
                return
            if "status" in answer:
                self._send(answer["status"], {"error": {"message": answer["message"]}})
                return
            self._send(200, _completion(answer, str(body.get("model", ""))))

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    state = ChatServer(f"http://{host}:{port}/v1", list(answers))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()
        thread.join()
