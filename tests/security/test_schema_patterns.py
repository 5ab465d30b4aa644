"""Attack: input that a tool's schema pattern should refuse, but Python's ``re`` lets through
(issue 20, item 8).

JSON Schema patterns are ECMA-262 regular expressions. Validated with Python's
``re.search``, ``"DE44ZZZZ9999\\n"`` matched ``^DE[0-9]{2}[A-Z0-9]{8}$`` (Python's ``$`` also
matches before a final newline) and a payment tool settled it; ``\\d`` took any Unicode
digit; and a pattern such as ``^(a+)+$`` backtracked for ever. Must hold: ECMA-262
semantics, in linear time, on every path that validates a tool input (the worker before the
handler, planning for explicit plans).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cuga.client import WorkerClient
from cuga.common.v1 import common_pb2
from cuga.services.planning.dag import check_against_catalog
from cuga.services.worker.app import build_worker
from cuga.shared.config import Settings
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import to_struct
from cuga.tools import InputSchema, ToolContext, ToolDefinitionError, ToolSpec, to_proto
from cuga.worker.v1 import worker_pb2
from tests.support.servers import CoordinatorWorkerClient, running_service
from tests.support.timing import best_seconds

IBAN = "^DE[0-9]{2}[A-Z0-9]{8}$"
SMUGGLED = "DE44ZZZZ9999\n"


class Bank:
    """A payment tool that counts what it was asked to settle."""

    def __init__(self) -> None:
        self.settled: list[dict[str, Any]] = []

    def pay(self, inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        self.settled.append(inputs)
        return {"status": "settled"}

    def spec(self) -> ToolSpec:
        return ToolSpec(
            "pay",
            "Pays an amount to a German account",
            {
                "type": "object",
                "properties": {
                    "iban": {"type": "string", "pattern": IBAN},
                    "amount": {"type": "number", "exclusiveMinimum": 0},
                },
                "required": ["iban", "amount"],
                "additionalProperties": False,
            },
            self.pay,
            sensitive=True,
        )


@pytest.fixture
def bank() -> Bank:
    return Bank()


@pytest.fixture
async def worker(settings: Settings, bank: Bank) -> AsyncIterator[WorkerClient]:
    section = {
        "register_with_routing": False,
        "tool_allowlist": ["cuga_example_tools", __name__.split(".")[0]],
    }
    settings = dataclasses.replace(settings, sections={**settings.sections, "worker": section})
    builder = functools.partial(build_worker, tools=[bank.spec()])
    async with (
        running_service("worker", builder, settings) as server,
        CoordinatorWorkerClient(server.address) as client,
    ):
        yield client


def _request(tool: str, key: str, **inputs: Any) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool=tool, input=to_struct(inputs)),
        context=common_pb2.ExecutionContext(run_id="run-1"),
        idempotency_key=key,
        attempt=1,
    )


async def test_a_trailing_newline_does_not_pass_an_anchored_pattern_over_grpc(
    worker: WorkerClient, bank: Bank
) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        await worker.execute_step(_request("pay", "run-1/s1", iban=SMUGGLED, amount=5))
    assert refused.value.field == "step.input.iban"
    assert "does not match" in refused.value.message
    assert bank.settled == []
    # The same account without the newline is paid: the pattern itself is not at fault.
    await worker.execute_step(_request("pay", "run-1/s2", iban=SMUGGLED.strip(), amount=5))
    assert [s["iban"] for s in bank.settled] == ["DE44ZZZZ9999"]


async def test_the_example_payment_tool_refuses_a_smuggled_newline_over_grpc(
    worker: WorkerClient,
) -> None:
    request = _request(
        "transfer_funds",
        "run-1/t1",
        from_account="DE44500105175407324931\n",
        to_account="FR7630006000011234567890189",
        amount=10,
        currency="EUR",
    )
    with pytest.raises(InvalidArgumentError) as refused:
        await worker.execute_step(request)
    assert refused.value.field == "step.input.from_account"


def test_planning_holds_an_explicit_plan_to_the_same_pattern(bank: Bank) -> None:
    step = common_pb2.PlanStep(
        step_id="p", tool="pay", input=to_struct({"iban": SMUGGLED, "amount": 5})
    )
    with pytest.raises(InvalidArgumentError, match=r"\$\.iban: 'DE44ZZZZ9999\\n' does not"):
        check_against_catalog([step], {"pay": to_proto(bank.spec())})


def _string(pattern: str) -> InputSchema:
    return InputSchema(
        {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
    )


@pytest.mark.parametrize(
    ("pattern", "value", "valid"),
    [
        (r"^\d{4}$", "1234", True),
        (r"^\d{4}$", "\u0663\u0663\u0663\u0663", False),  # Arabic-Indic digits
        (r"^\d+$", "\uff11", False),  # a full-width 1
        (r"^\w+$", "caf\u00e9", False),  # \w is [A-Za-z0-9_]
        (r"^[^\W]+$", "\u00e9", False),
        (r"^.$", "\n", False),
        (r"^.$", "\r", False),
        (r"^.$", "\u2028", False),
        (r"^a$", "a\n", False),
        (r"^a$", "a", True),
        (r"^\s$", "\u00a0", True),  # ECMA-262 white space includes NBSP and BOM
        (r"^\s$", "\ufeff", True),
        (r"^[0-9]{2}$", "12", True),
        (r"^\u0041$", "A", True),
    ],
)
def test_patterns_have_ecma_262_semantics(pattern: str, value: str, valid: bool) -> None:
    assert _string(pattern).is_valid({"s": value}) is valid


def test_property_names_are_matched_like_values() -> None:
    schema = InputSchema(
        {
            "type": "object",
            "patternProperties": {"^[a-z]+$": {"type": "integer"}},
            "additionalProperties": False,
        }
    )
    assert schema.is_valid({"abc": 1})
    problem = schema.best_problem({"abc\n": 1})
    assert problem is not None and problem.rule == "additionalProperties"


@pytest.mark.timeout(20)  # Python's re never finishes this one
def test_a_catastrophic_pattern_is_matched_in_linear_time() -> None:
    schema = _string("^(a+)+$")
    for size in (5_000, 50_000):
        assert not schema.is_valid({"s": "a" * size + "!"})
        assert schema.is_valid({"s": "a" * size})
    best = {}
    for size in (5_000, 500_000):
        text = {"s": "a" * size + "!"}
        best[size] = best_seconds(functools.partial(schema.is_valid, text), 5)
    # 100 times the input: linear time takes about 100 times as long, with a floor for noise.
    assert best[500_000] <= 250 * max(best[5_000], 1e-4)


@pytest.mark.parametrize("pattern", [r"^(?=a)a$", r"^(a)\1$", r"^(?<!b)a$"])
def test_a_pattern_that_needs_backtracking_is_refused_when_the_tool_is_defined(
    pattern: str,
) -> None:
    with pytest.raises(ToolDefinitionError, match="ECMA-262 regular expressions matched in linear"):
        ToolSpec(
            "t",
            "t",
            {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}},
            lambda inputs, ctx: None,
        )
