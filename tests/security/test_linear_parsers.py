"""Attack: text that makes a parser of user input backtrack (issue 20, item 6).

The regex planning matched ``{{steps.<id>.output...}}`` with took ~3.8 s on one 60 KB
string (``"{{steps." + "a" * 64 + ".output[" + " " * 60000``), and the coordinator's took
seconds on ``"{{steps.a" + ".output.a" * n``: one request held the planning server's event
loop for tens of seconds. Must hold: every parser of user text is linear-time.

Time bounds are the one thing this file asserts that the house rules otherwise forbid,
because the promise is about time. They are made hard to flake: the parsing thread's CPU
time with the coverage tracer off (tests/support/timing.py), the best of a few runs, a
bound (10 ms per 64 KB) several times what the worst shape takes here, and a growth check
(64 KB against 640 KB: linear parsers grow 9-22 times, the bound is 40, a quadratic one
grows 100 times) that holds whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cuga.client import PlanningClient
from cuga.common.v1 import common_pb2 as c
from cuga.orchestrator._policy import resolve_input, template_references
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.approval.predicate import MAX_PREDICATE_CHARS, PredicateError, parse_predicate
from cuga.services.planning.app import build
from cuga.services.planning.catalog import tool_specs_to_json
from cuga.services.planning.dag import check_against_catalog
from cuga.services.planning.memory import HashingEmbedder
from cuga.services.planning.ranking import words
from cuga.shared.errors import InvalidArgumentError, NotFoundError
from cuga.shared.messages import to_struct
from cuga.shared.templates import has_reference, references
from tests.support.servers import as_identity, make_settings, running_service
from tests.support.timing import best_seconds

KB = 1024
#: Longest a parse of 64 KB may take (the worst shape takes under 4 ms here).
BOUND_PER_64KB_S = 0.010
#: How much longer 640 KB may take than 64 KB: 10 is linear, 100 quadratic. Linear parsers
#: measured 9-22 times here (past 64 KB the text and its pieces leave the CPU caches, and
#: from 640 KB to 6.4 MB they grow 10 times again), so the bound sits between the two.
MAX_GROWTH = 40.0
#: Below this a small run is noise: growth is measured from at least this much.
GROWTH_FLOOR_S = 0.0005

#: The item's own attack, and the coordinator's old regex's worst case.
BOMB = ("{{steps." + "a" * 64 + ".output[", " ", "")
DOTTED = ("{{steps.a", ".output.a", "")

FRAGMENTS = [
    "{{",
    "}}",
    "{",
    "}",
    "[",
    "]",
    ".",
    " ",
    "\n",
    "steps.",
    "steps",
    ".output",
    "output",
    "a",
    "a" * 64,
    "-",
    "0",
    "{{steps.",
    "{{steps.a.output",
]
fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)
#: (head, body, tail): the text is the head, the body repeated to the size, the tail.
shapes = st.tuples(fragments, fragments.filter(bool), fragments)


def _text(shape: tuple[str, str, str], size: int) -> str:
    head, body, tail = shape
    return head + body * max(1, (size - len(head) - len(tail)) // len(body)) + tail


#: How many linear Python passes over the text a template parser may cost under load.
SCAN_MULTIPLE = 20


def _linear_scan(text: str) -> int:
    """One pass of Python over every character: linear work that load slows alike."""
    return sum(1 for ch in text if ch == "{")


def _best_of(parse: Callable[[str], object], text: str, runs: int) -> float:
    return best_seconds(lambda: parse(text), runs)


def _step(text: str, *depends_on: str) -> c.PlanStep:
    return c.PlanStep(step_id="s", tool="echo", depends_on=depends_on, input=to_struct({"t": text}))


#: Steps the attacker's step may refer to, so that planning reads all of its references.
ANCESTORS = [c.PlanStep(step_id=sid, tool="echo") for sid in ("a", "a" * 64)]


def _planning(text: str) -> None:
    """Planning's check of an explicit step's input (references, then the schema)."""
    steps = [*ANCESTORS, _step(text, *(a.step_id for a in ANCESTORS))]
    # A reference to a step that is not an ancestor is refused, as it should be.
    with contextlib.suppress(InvalidArgumentError):
        check_against_catalog(steps, {"echo": c.ToolSpec(name="echo")})


def _coordinator_references(text: str) -> None:
    template_references(_step(text))


def _coordinator_resolve(text: str) -> None:
    # A reference with nothing to resolve to is refused.
    with contextlib.suppress(InvalidArgumentError):
        resolve_input(_step(text), {"a": {"b": [1, 2]}, "a" * 64: 1})


def _predicate(text: str) -> None:
    with contextlib.suppress(PredicateError):
        parse_predicate(text, {"vips": ["a"]})


TEMPLATE_PARSERS: dict[str, Callable[[str], object]] = {
    "references": lambda text: sum(1 for _ in references(text)),
    "has_reference": has_reference,
    "planning": _planning,
    "coordinator.template_references": _coordinator_references,
}
#: Linear too, but doing more than parse per character, so only their growth is bounded:
#: the coordinator's filling in of references writes a value per reference (thousands in
#: 64 KB), and word splitting of goals, tool descriptions and memory texts, which are
#: never 64 KB in one piece (goals are limited to a few KB).
OTHER_PARSERS: dict[str, Callable[[str], object]] = {
    "coordinator.resolve_input": _coordinator_resolve,
    "planning.ranking.words": words,
    "planning.memory.features": HashingEmbedder.features,
}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(shapes)
@example(BOMB)
@example(DOTTED)
@example(("", "{{steps.a.output.b}}", ""))
def test_each_template_parser_reads_64kb_of_adversarial_text_within_the_bound(
    shape: tuple[str, str, str],
) -> None:
    text = _text(shape, 64 * KB)
    # A loaded machine (make test's parallel workers) slows every parser alike: the bound
    # is the larger of the fixed one and a multiple of one linear pass over the same text,
    # measured beside it. A quadratic parser takes seconds here, far above either.
    scan = _best_of(_linear_scan, text, runs=3)
    bound = max(BOUND_PER_64KB_S * len(text) / (64 * KB), SCAN_MULTIPLE * scan)
    for name, parse in TEMPLATE_PARSERS.items():
        took = _best_of(parse, text, runs=3)
        assert took <= bound, (name, shape, took, bound)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(shapes)
@example(BOMB)
@example(DOTTED)
@example(("", "{{steps.a.output.b}}", ""))
@example(("", "aA", ""))
def test_each_parser_grows_linearly_from_64kb_to_640kb(shape: tuple[str, str, str]) -> None:
    small, large = _text(shape, 64 * KB), _text(shape, 640 * KB)
    for name, parse in {**TEMPLATE_PARSERS, **OTHER_PARSERS}.items():
        small_s = max(_best_of(parse, small, runs=3), GROWTH_FLOOR_S)
        large_s = _best_of(parse, large, runs=2)
        ratio = len(large) / len(small)
        assert large_s <= MAX_GROWTH / 10 * ratio * small_s, (name, shape, small_s, large_s)


PREDICATE_FRAGMENTS = ["(", ")", "not ", " and ", " or ", "amount", ".", "==", ">", "'", '"']
PREDICATE_FRAGMENTS += ["\\", "1", "-", "[", "]", ",", " in ", "vips", "x", " ", "1.5"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(
    st.tuples(
        *(st.lists(st.sampled_from(PREDICATE_FRAGMENTS), max_size=6).map("".join) for _ in "hb")
    ).filter(lambda t: bool(t[1]))
)
def test_the_approval_predicate_parser_grows_linearly(shape: tuple[str, str]) -> None:
    # Predicates are limited to 4096 characters: 400 against 4000.
    head, body = shape
    small = _text((head, body, ""), 400)[: MAX_PREDICATE_CHARS // 10]
    large = _text((head, body, ""), 4000)[:MAX_PREDICATE_CHARS]
    small_s = max(_best_of(_predicate, small, runs=3), GROWTH_FLOOR_S)
    large_s = _best_of(_predicate, large, runs=3)
    assert large_s <= MAX_GROWTH / 10 * (len(large) / len(small)) * small_s, (shape, large_s)


# ----------------------------------------------------------------------- over gRPC

#: How long the planning server may take to answer a GetPlan while the attack is in: a
#: deadline hundreds of times what it needs, far below the seconds the old regex held the
#: loop for.
PROBE_DEADLINE_S = 2.0


@pytest.fixture
async def planning(tmp_path: Path) -> AsyncIterator[PlanningClient]:
    tools = tmp_path / "tools.json"
    tools.write_text(tool_specs_to_json([c.ToolSpec(name="echo", description="Echo", cost=1)]))
    settings = make_settings(
        tmp_path / "data", env={"CUGA_PLANNING__STATIC_TOOLS_FILE": str(tools)}
    )
    async with running_service("planning", build, settings) as server:
        client = PlanningClient(server.address, metadata=as_identity("coordinator"))
        yield client
        await client.close()


async def test_a_template_bomb_in_a_plan_does_not_stall_the_planning_server(
    planning: PlanningClient,
) -> None:
    bomb = "{{steps." + "a" * 64 + ".output[" + " " * 60_000  # under the 64 KB input limit
    attack = p.CreatePlanRequest(
        goal="echo twice",
        steps=[
            c.PlanStep(step_id="a", tool="echo", input=to_struct({"text": bomb})),
            c.PlanStep(step_id="b", tool="echo", depends_on=["a"], input=to_struct({"t": bomb})),
        ],
    )
    # The attack goes out first; GetPlans follow it one after another until it is
    # answered. Each must be answered (NOT_FOUND) within its deadline: a server whose
    # loop the attack holds answers none until the attack is done.
    sent = asyncio.create_task(planning.create_plan(attack, timeout=120))
    answered = 0
    while not sent.done():
        with pytest.raises(NotFoundError):
            await planning.get_plan(p.GetPlanRequest(plan_id="plan-none"), timeout=PROBE_DEADLINE_S)
        answered += 1
    plan = (await sent).plan
    assert answered >= 1
    assert [s.step_id for s in plan.steps] == ["a", "b"]
    assert struct_text(plan.steps[0]) == bomb  # not a reference: kept as given


def struct_text(step: c.PlanStep) -> str:
    return step.input.fields["text"].string_value
