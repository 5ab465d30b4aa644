"""The step-reference scanner accepts exactly the language of the regex planning used, and
the coordinator resolves what it finds."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2 as c
from cuga.orchestrator._policy import resolve_input, template_references
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import struct_to_dict, to_struct
from cuga.shared.templates import Reference, has_reference, references

#: The planning service's regex before the scanner (quadratic on some inputs): the oracle,
#: only ever run here on short texts.
OLD = re.compile(r"\{\{\s*steps\.([A-Za-z0-9_.\-]{1,64}?)\.output(?:[.\[][^}]*)?\s*\}\}")

FRAGMENTS = [
    "{{",
    "}}",
    "{",
    "}",
    "steps.",
    "steps",
    ".output",
    "output",
    ".",
    "[",
    "]",
    "0",
    " ",
    "\t",
    "\n",
    "\u00a0",
    "\u2028",
    "a",
    "b",
    "-",
    "_",
    "x y",
    "a" * 31,
    "{{steps.a.output",
    "{{ steps.",
]

texts = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


@settings(max_examples=3000, deadline=None)
@given(texts)
def test_same_references_as_the_old_regex(text: str) -> None:
    found = [(r.start, r.end, r.step_id) for r in references(text)]
    assert found == [(m.start(), m.end(), m.group(1)) for m in OLD.finditer(text)]
    assert has_reference(text) == (OLD.search(text) is not None)
    refs = list(references(text))
    whole = refs[0] if len(refs) == 1 and refs[0].is_whole(text) else None
    old_whole = OLD.fullmatch(text.strip())
    assert (whole is None) == (old_whole is None)
    if whole is not None and old_whole is not None:
        assert whole.step_id == old_whole.group(1)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="{}[]. stepoutput\n-_a0", max_size=80))
def test_same_references_on_a_template_alphabet(text: str) -> None:
    found = [(r.start, r.end, r.step_id) for r in references(text)]
    assert found == [(m.start(), m.end(), m.group(1)) for m in OLD.finditer(text)]


def test_paths_and_their_keys() -> None:
    text = "{{steps.a.output}} {{ steps.b-1.output.total.0 }} {{steps.c.output[0]}}"
    refs = list(references(text))
    assert [(r.step_id, r.path, r.keys()) for r in refs] == [
        ("a", "", []),
        ("b-1", ".total.0", ["total", "0"]),
        ("c", "[0]", None),
    ]
    assert Reference(0, 1, "a", ".x y").keys() is None
    assert Reference(0, 1, "a", ".x..y").keys() is None


def test_the_shortest_id_wins_and_ids_stop_at_64_characters() -> None:
    assert [r.step_id for r in references("{{steps.a.output.output}}")] == ["a"]
    assert [r.step_id for r in references("{{steps.a.outputx.output}}")] == ["a.outputx"]
    assert [r.step_id for r in references("{{steps." + "a" * 64 + ".output}}")] == ["a" * 64]
    assert list(references("{{steps." + "a" * 65 + ".output}}")) == []


def test_the_coordinator_resolves_the_ids_planning_checked_and_refuses_what_it_cannot() -> None:
    # Planning reads "a" here (the shortest id), so the coordinator must too.
    step = c.PlanStep(step_id="s", tool="echo", input=to_struct({"n": "{{steps.a.output..b}}"}))
    assert template_references(step) == {"a"}
    with pytest.raises(InvalidArgumentError, match="not a dotted path"):
        resolve_input(step, {"a": {"b": 1}})
    bracket = c.PlanStep(step_id="s", tool="echo", input=to_struct({"n": "{{steps.a.output[0]}}"}))
    with pytest.raises(InvalidArgumentError, match=r"steps\[s\]"):
        resolve_input(bracket, {"a": [1]})
    inline = c.PlanStep(
        step_id="s",
        tool="echo",
        input=to_struct({"n": " {{steps.a.output.0}} ", "m": "x{{ steps.a.output }}y"}),
    )
    assert struct_to_dict(resolve_input(inline, {"a": [7]})) == {"n": 7, "m": "x[7]y"}
