"""Every way a policy file can be wrong stops the approval service at start, naming the
file, the line and the problem (issue 24; the common cases are in test_approval_policy.py)."""

from __future__ import annotations

import pytest

from cuga.services.approval.policy import REVIEWER_ROLE, parse_policy
from cuga.shared.config import ConfigError

RULE = "rules:\n  - name: a\n    action: require\n"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("rules:\n  - name: a\n    action: {x: 1}\n", "line 3", "expected a single value"),
        ("rules:\n  - name: !!binary 'x y'\n    action: allow\n", "line 2", "name"),
        ("rules:\n  - name: a\n    name: b\n    action: allow\n", "line 3", "duplicate key 'name'"),
        ("rules:\n  - name: '  '\n    action: allow\n", "line 2", "name must be a non-empty"),
        ("rules:\n  - name: 5\n    action: allow\n", "line 2", "name must be a non-empty"),
        ("lists:\n  1x: [a]\nrules: []\n", "line 2", "list name '1x' must be an identifier"),
        ("lists:\n  l: [2024-01-01]\nrules: []\n", "line 2", "lists.l: items must be strings or"),
        ("lists: [a]\nrules: []\n", "line 1", "lists must be a mapping"),
        ("lists: {}\n", "line 1", "the policy needs a 'rules:' list"),
        ("[a]\n", "line 1", "the policy must be a mapping"),
        ("rules:\n  - name: a\n", "line 2", "rule 'a': 'action' is required (require or allow)"),
        ("rules:\n  - name: a\n    action: deny\n", "line 3", "action must be 'require' or"),
        ("rules:\n  - [a]\n", "line 2", "rules[0] must be a mapping"),
        (RULE + "    approvers: 0\n", "line 4", "approvers must be an integer >= 1"),
        (RULE + "    approvers: true\n", "line 4", "approvers must be an integer >= 1"),
        (RULE + "    approvers: 17\n", "line 4", "approvers must be at most 16"),
        (RULE + "    timeout_s: 0\n", "line 4", "timeout_s must be a number > 0"),
        (RULE + "    timeout_s: .inf\n", "line 4", "timeout_s must be a number > 0"),
        (RULE + "    timeout_s: soon\n", "line 4", "timeout_s must be a number > 0"),
        (RULE + "    reviewer_group: ''\n", "line 4", "reviewer_group must be a non-empty"),
        (RULE + "    match: [tool]\n", "line 4", "rule 'a'.match must be a mapping"),
        (RULE + "    match: {when: 5}\n", "line 4", "match.when must be a string"),
        (RULE + "    match: {when: 'amount >'}\n", "line 4", "rule 'a': match.when: "),
        (RULE + "    match: {tool: ''}\n", "line 4", "match.tool must be a non-empty"),
    ],
)
def test_a_wrong_policy_is_refused_naming_the_line_and_problem(
    text: str, where: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, source="policy.yaml", key="approval.policy_file")
    assert info.value.key == "approval.policy_file"
    assert f"policy.yaml {where}: " in info.value.problem, info.value.problem
    assert problem in info.value.problem


def test_yaml_that_does_not_parse_is_refused_with_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy("rules:\n  - name: a\n\tbad: tab\n", source="p.yaml")
    assert info.value.problem.startswith("p.yaml line 3: not valid YAML: ")
    # two documents: refused where the second begins
    with pytest.raises(ConfigError, match=r"^.*p\.yaml line 2: not valid YAML: "):
        parse_policy("rules: []\n---\nrules: []\n", source="p.yaml")
    # a character YAML refuses outright has no line: the file is named
    with pytest.raises(ConfigError) as info:
        parse_policy("rules: []\x00", source="p.yaml")
    assert info.value.problem.startswith("p.yaml: not valid YAML: unacceptable character")


def test_a_rule_names_who_may_decide_and_is_found_by_name() -> None:
    policy = parse_policy(
        "rules:\n"
        "  - {name: finance, action: require, reviewer_group: treasury}\n"
        "  - {name: anyone, action: require}\n"
        "  - {name: free, action: allow}\n"
    )
    finance, anyone = policy.rule("finance"), policy.rule("anyone")
    assert finance is not None and finance.deciding_role == "treasury"
    assert anyone is not None and anyone.deciding_role == REVIEWER_ROLE
    assert policy.rule("no-such-rule") is None
