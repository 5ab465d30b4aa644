"""``web_search``: ranked lookup over a small bundled corpus (a stand-in for a search API)."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from cuga.tools import ToolContext, ToolSpec

#: The bundled corpus: (title, url, text). Small on purpose; enough to rank against.
CORPUS: tuple[tuple[str, str, str], ...] = (
    (
        "gRPC deadlines",
        "https://example.org/grpc/deadlines",
        "A gRPC deadline is the absolute time by which a call must finish. Clients should "
        "always set a deadline; servers read the remaining time and stop work when it passes.",
    ),
    (
        "Retry with exponential backoff",
        "https://example.org/patterns/backoff",
        "Exponential backoff with jitter spreads retries over time so that a recovering "
        "service is not overwhelmed. Retry only idempotent operations or use idempotency keys.",
    ),
    (
        "Idempotency keys",
        "https://example.org/patterns/idempotency",
        "An idempotency key lets a server recognise a repeated request and return the stored "
        "result instead of performing the side effect twice, so payments are not duplicated.",
    ),
    (
        "OpenTelemetry tracing",
        "https://example.org/otel/tracing",
        "OpenTelemetry propagates trace context between services so one request becomes one "
        "trace made of spans; exporters send spans to Jaeger over OTLP.",
    ),
    (
        "SQLite write-ahead logging",
        "https://example.org/sqlite/wal",
        "SQLite in WAL mode lets readers proceed while a writer appends to the log; a "
        "checkpoint moves pages back into the database file.",
    ),
    (
        "Human-in-the-loop approvals",
        "https://example.org/agents/approvals",
        "Sensitive agent actions such as transferring funds should wait for a human reviewer "
        "to approve or deny them; requests expire when nobody decides in time.",
    ),
    (
        "Exchange rates",
        "https://example.org/finance/fx",
        "Currency exchange rates between USD, EUR and GBP change every day; a transfer in a "
        "foreign currency is converted at the rate of the settlement day.",
    ),
    (
        "Python asyncio",
        "https://example.org/python/asyncio",
        "asyncio runs coroutines on an event loop; blocking functions belong in a thread pool "
        "so they do not stall other tasks, and wait_for bounds how long a task may take.",
    ),
    (
        "Kubernetes probes",
        "https://example.org/k8s/probes",
        "Kubernetes readiness and liveness probes can use the gRPC health checking protocol "
        "so a pod only receives traffic once it reports SERVING.",
    ),
    (
        "Weather in Zurich",
        "https://example.org/weather/zurich",
        "Zurich has a temperate climate: mild summers around 25 degrees and cold winters "
        "with occasional snow; the weather changes quickly near the lake.",
    ),
)

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "how",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "so",
        "the",
        "to",
        "what",
        "with",
    ]
)


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def search(query: str, max_results: int = 3) -> list[dict[str, Any]]:
    """Documents ranked by TF-IDF overlap with ``query``; documents with no overlap are left out.

    Raises:
        ValueError: the query has no searchable words.
    """
    terms = _terms(query)
    if not terms:
        raise ValueError("query has no searchable words")
    docs = [Counter(_terms(f"{title} {title} {text}")) for title, _, text in CORPUS]
    n = len(docs)
    scored: list[tuple[float, int]] = []
    for i, doc in enumerate(docs):
        score = 0.0
        for term in set(terms):
            if doc[term]:
                df = sum(1 for d in docs if d[term])
                score += (1 + math.log(doc[term])) * math.log(1 + n / df)
        if score > 0:
            scored.append((score, i))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [
        {
            "title": CORPUS[i][0],
            "url": CORPUS[i][1],
            "snippet": CORPUS[i][2][:160],
            "score": round(score, 4),
        }
        for score, i in scored[:max_results]
    ]


def _web_search(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    query = inputs["query"]
    results = search(query, int(inputs.get("max_results", 3)))
    return {"query": query, "results": results}


WEB_SEARCH = ToolSpec(
    name="web_search",
    description="Searches a small local corpus of articles and returns ranked results.",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 512},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    handler=_web_search,
    capabilities=("search",),
    cost=1.0,
    timeout=5.0,
    keywords=("search", "find", "lookup", "web", "research", "article"),
)
