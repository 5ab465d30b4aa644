"""DAG checks as properties: any acyclic plan validates; a back-edge is always refused."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2 as c
from cuga.services.planning.catalog import StaticToolCatalog
from cuga.services.planning.dag import (
    SchemaValidators,
    find_cycle,
    topological_order,
    validate_steps,
)
from cuga.shared.config import Limits
from cuga.shared.errors import InvalidArgumentError
from tests.unit.test_planning_support import TOOLS, step

TOOLS_BY_NAME = {t.name: t for t in TOOLS}


@st.composite
def dags(draw: st.DrawFn) -> list[c.PlanStep]:
    """A DAG: step i may only depend on steps before it; then shuffled."""
    n = draw(st.integers(min_value=1, max_value=25))
    steps = []
    for i in range(n):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=4)) if i else set()
        steps.append(step(f"s{i}", deps=tuple(f"s{d}" for d in sorted(deps))))
    return draw(st.permutations(steps))


@settings(max_examples=150, deadline=None)
@given(dags())
def test_any_acyclic_plan_validates_in_dependency_order(steps: list[c.PlanStep]) -> None:
    out = validate_steps(steps, TOOLS_BY_NAME, Limits())
    position = {s.step_id: i for i, s in enumerate(out)}
    assert sorted(position) == sorted(s.step_id for s in steps)
    for s in out:
        for dep in s.depends_on:
            assert position[dep] < position[s.step_id]


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_a_back_edge_is_refused_naming_the_cycle(
    steps: list[c.PlanStep], data: st.DataObject
) -> None:
    order = [steps[i].step_id for i in topological_order(steps)]
    # Pick a path u ->* v in the DAG (v depends transitively on u) and add u -> v.
    by_id = {s.step_id: s for s in steps}
    v = data.draw(st.sampled_from(order))
    ancestors: set[str] = set()
    stack = list(by_id[v].depends_on)
    while stack:
        a = stack.pop()
        if a not in ancestors:
            ancestors.add(a)
            stack.extend(by_id[a].depends_on)
    u = data.draw(st.sampled_from(sorted(ancestors | {v})))
    if u == v:
        by_id[u].depends_on.append(v)  # self-loop: the smallest back-edge
        field = f"steps[{steps.index(by_id[u])}].depends_on"
    else:
        by_id[u].depends_on.append(v)
        field = "steps"
    try:
        validate_steps(steps, TOOLS_BY_NAME, Limits())
    except InvalidArgumentError as exc:
        assert exc.field.startswith(field)
        if u != v:
            cycle = find_cycle(steps)
            assert cycle is not None and cycle[0] == cycle[-1]
            assert " -> ".join(cycle) in exc.message
    else:
        raise AssertionError("a plan with a back-edge validated")


def test_find_cycle_names_every_step_on_it() -> None:
    steps = [step("a", deps=("b",)), step("b", deps=("c",)), step("c", deps=("a",)), step("d")]
    assert find_cycle(steps) == ["a", "b", "c", "a"]
    assert find_cycle([step("a"), step("b", deps=("a",))]) is None


def test_long_chain_does_not_hit_recursion_limit() -> None:
    steps = [step("s0")] + [step(f"s{i}", deps=(f"s{i - 1}",)) for i in range(1, 3000)]
    assert topological_order(list(reversed(steps)))[:2] == [2999, 2998]


async def test_static_catalog_returns_copies() -> None:
    catalog = StaticToolCatalog(TOOLS)
    tools = await catalog.tools()
    tools["echo"].cost = 99  # type: ignore[index]
    assert (await catalog.tools())["echo"].cost == 0.5


def _spec(schema: dict[str, object]) -> c.ToolSpec:
    spec = c.ToolSpec(name="t")
    spec.parameters.update(schema)
    return spec


def test_schema_validators_check_each_schema_once_and_never_cache_a_bad_one() -> None:
    validators = SchemaValidators(limit=2)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    first = validators.get(_spec(schema))
    assert first is not None and validators.get(_spec(schema)) is first
    assert validators.get(_spec({})) is None
    bad = _spec({"type": "object", "properties": {"n": {"type": "no-such-type"}}})
    for _ in range(2):  # raised every time: a refused schema is not remembered
        with pytest.raises(jsonschema.SchemaError):
            validators.get(bad)
    # Full (two schemas held): the next new schema starts the cache over.
    validators.get(_spec({"type": "object", "required": ["n"]}))
    assert validators.get(_spec(schema)) is not first
