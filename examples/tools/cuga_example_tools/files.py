"""Tools over the worker's sandbox directory: ``summarize_text`` and ``append_line``."""

from __future__ import annotations

import fcntl
import re
from collections import Counter
from pathlib import Path
from typing import Any

from cuga.tools import ToolContext, ToolSpec

MAX_FILE_BYTES = 1024 * 1024
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "so",
        "that",
        "the",
        "this",
        "to",
        "was",
        "were",
        "will",
        "with",
    ]
)


def sandboxed(context: ToolContext, relative: str) -> Path:
    """The absolute path of ``relative`` inside the sandbox.

    Raises:
        PermissionError: the path is absolute or escapes the sandbox (``..``, symlinks).
    """
    root = context.sandbox_dir.resolve()
    candidate = Path(relative)
    if candidate.is_absolute():
        raise PermissionError(f"path {relative!r} must be relative to the sandbox")
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise PermissionError(f"path {relative!r} escapes the sandbox")
    return resolved


def summarize(text: str, max_sentences: int = 3) -> list[str]:
    """The ``max_sentences`` most representative sentences, in their original order."""
    sentences = [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]
    if len(sentences) <= max_sentences:
        return sentences
    freq = Counter(w for w in _WORD.findall(text.lower()) if w not in _STOP)

    def score(sentence: str) -> float:
        words = [w for w in _WORD.findall(sentence.lower()) if w not in _STOP]
        return sum(freq[w] for w in words) / (len(words) or 1)

    ranked = sorted(range(len(sentences)), key=lambda i: (-score(sentences[i]), i))
    return [sentences[i] for i in sorted(ranked[:max_sentences])]


def _summarize_text(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    path = sandboxed(context, inputs["path"])
    if not path.is_file():
        raise ValueError(f"file {inputs['path']!r} does not exist in the sandbox")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"file {inputs['path']!r} is {size} bytes, the limit is {MAX_FILE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"file {inputs['path']!r} is not UTF-8 text") from None
    summary = summarize(text, int(inputs.get("max_sentences", 3)))
    return {
        "path": inputs["path"],
        "summary": " ".join(summary),
        "sentences": len(summary),
        "words": len(text.split()),
    }


def _append_line(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    path = sandboxed(context, inputs["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Appends from different steps run in parallel tool processes (or workers sharing the
    # sandbox): an exclusive lock on the file itself keeps the count exact.
    with path.open("a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(inputs["line"] + "\n")
        fh.flush()
        fh.seek(0)
        count = sum(1 for _ in fh)
    return {"path": inputs["path"], "lines": count}


_PATH_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[^\x00]+$"}

SUMMARIZE_TEXT = ToolSpec(
    name="summarize_text",
    description="Summarises a UTF-8 text file from the worker's sandbox directory.",
    parameters={
        "type": "object",
        "properties": {
            "path": {**_PATH_SCHEMA, "description": "file path relative to the sandbox"},
            "max_sentences": {"type": "integer", "minimum": 1, "maximum": 20, "default": 3},
        },
        "required": ["path"],
        "additionalProperties": False,
    },
    handler=_summarize_text,
    capabilities=("text", "files"),
    cost=1.0,
    timeout=10.0,
    keywords=("summarize", "summary", "file", "text", "document", "read"),
)

APPEND_LINE = ToolSpec(
    name="append_line",
    description="Appends a line to a file in the sandbox and returns the file's line count.",
    parameters={
        "type": "object",
        "properties": {
            "path": {**_PATH_SCHEMA, "description": "file path relative to the sandbox"},
            "line": {"type": "string", "maxLength": 4096, "pattern": r"^[^\n\r]*$"},
        },
        "required": ["path", "line"],
        "additionalProperties": False,
    },
    handler=_append_line,
    capabilities=("files",),
    cost=1.0,
    timeout=5.0,
    keywords=("append", "write", "log", "record", "file"),
)
