"""Policy files: rule matching and start-up errors with file, line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.services.approval.policy import (
    DEFAULT_RULE_NAME,
    ApprovalPolicy,
    load_policy,
    parse_policy,
)
from cuga.shared.config import ConfigError

POLICY = """\
lists:
  trusted: [alice@example.com, bob@example.com]
rules:
  - name: big-payments
    match:
      tool: "payments.*"
      when: input.amount > 1000 and recipient not in trusted
    action: require
    approvers: 2
    timeout_s: 600
    reviewer_group: finance
  - name: prod-only
    match:
      profile: "prod-*"
      sensitive: true
    action: require
  - name: payments-free
    match: {tool: "payments.*"}
    action: allow
  - name: sensitive
    match: {sensitive: true}
    action: require
"""


def decide(
    policy: ApprovalPolicy,
    tool: str,
    profile: str = "default",
    sensitive: bool = False,
    **input: object,
):  # type: ignore[no-untyped-def]
    return policy.decide(tool=tool, profile=profile, sensitive=sensitive, input=input, context={})


def test_first_matching_rule_wins() -> None:
    policy = parse_policy(POLICY, default_timeout_s=100)
    big = decide(policy, "payments.send", amount=5000, recipient="mallory@example.com")
    assert big.required and big.rule is not None
    assert (big.rule.name, big.rule.approvers, big.rule.timeout_s) == ("big-payments", 2, 600)
    assert big.rule.reviewer_group == "finance"
    trusted = decide(policy, "payments.send", amount=5000, recipient="alice@example.com")
    assert not trusted.required and trusted.rule is not None
    assert trusted.rule.name == "payments-free"
    prod = decide(policy, "db.drop", profile="prod-eu", sensitive=True)
    assert prod.required and prod.rule is not None and prod.rule.name == "prod-only"
    assert prod.rule.timeout_s == 100  # the configured default
    other = decide(policy, "db.drop", sensitive=True)
    assert other.rule is not None and other.rule.name == "sensitive"
    nothing = decide(policy, "search")
    assert not nothing.required and nothing.rule is None
    assert policy.deciding_roles == {"reviewer", "finance"}


def test_default_policy_gates_sensitive_tools_only() -> None:
    policy = ApprovalPolicy.default(3600)
    gated = decide(policy, "anything", sensitive=True)
    assert gated.required and gated.rule is not None
    assert (gated.rule.name, gated.rule.approvers, gated.rule.timeout_s) == (
        DEFAULT_RULE_NAME,
        1,
        3600,
    )
    assert not decide(policy, "anything").required


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "rules:\n  - name: a\n    match: {when: 'amount >'}\n    action: require\n",
            3,
            "expected a value",
        ),
        ("rules:\n  - name: a\n    action: maybe\n", 3, "action must be"),
        ("rules:\n  - name: a\n    action: require\n    approvers: 0\n", 4, "approvers"),
        ("rules:\n  - name: a\n    action: require\n    timeout_s: -5\n", 4, "timeout_s"),
        ("rules:\n  - name: a\n    action: allow\n    approvers: 2\n", 4, "only applies"),
        ("rules:\n  - name: a\n    action: require\n    colour: red\n", 4, "unknown key"),
        (
            "rules:\n  - name: a\n    match: {tool: x, shape: y}\n    action: allow\n",
            3,
            "unknown key 'shape'",
        ),
        ("rules:\n  - action: allow\n", 2, "'name' is required"),
        (
            "rules:\n  - name: a\n    action: allow\n  - name: a\n    action: allow\n",
            4,
            "duplicate rule name",
        ),
        (
            "rules:\n  - name: a\n    match: {when: 'x in nolist'}\n    action: allow\n",
            3,
            "unknown list 'nolist'",
        ),
        ("rules:\n  - name: a\n    match: {sensitive: maybe}\n    action: allow\n", 3, "sensitive"),
        ("lists:\n  l: 5\nrules: []\n", 2, "must be a list"),
        ("rules: {a: 1}\n", 1, "rules must be a list"),
        ("rules:\n  - name: a\n    action: [allow\n", 4, "not valid YAML"),
        ("other: 1\n", 1, "unknown key 'other'"),
    ],
)
def test_invalid_policy_names_file_line_and_reason(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert info.value.key == "approval.policy_file"
    assert f"{path} line {line}:" in message
    assert fragment in message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_policy(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")
