"""ApprovalPolicy: ordered rules deciding which steps need a human sign-off.

A policy file (YAML)::

    lists:
      trusted_recipients: [alice@example.com, bob@example.com]
    rules:
      - name: big-payments
        match:
          tool: "payments.*"          # fnmatch glob on the tool name
          profile: "prod-*"           # fnmatch glob on the profile ("default" when empty)
          when: input.amount > 1000 and recipient not in trusted_recipients
        action: require
        approvers: 2                  # distinct approvals needed, >= 1
        timeout_s: 1800               # default: approval.default_timeout_s
        reviewer_group: finance       # only holders of this role may decide
      - name: reads-are-free
        match: {tool: "read_*"}
        action: allow
      - name: sensitive-tools
        match: {sensitive: true}
        action: require

Rules are tried in order and the first whose every ``match`` key holds wins; no match
means no approval is needed. Without a file the policy is one rule, ``sensitive-tools``:
every tool declared sensitive needs one approval within ``default_timeout_s``. Any problem
in the file raises :class:`ConfigError` naming the file, the line and the reason.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cuga.services.approval.predicate import Predicate, PredicateError, parse_predicate
from cuga.shared.config import ConfigError

DEFAULT_RULE_NAME = "sensitive-tools"
#: The role that may decide requests whose rule names no reviewer group.
REVIEWER_ROLE = "reviewer"
_RULE_KEYS = frozenset({"name", "match", "action", "approvers", "timeout_s", "reviewer_group"})
_MATCH_KEYS = frozenset({"tool", "profile", "sensitive", "when"})
_TOP_KEYS = frozenset({"rules", "lists"})


@dataclass(frozen=True)
class Rule:
    """One rule of the policy.

    Attributes:
        name: unique name, reported with every request it matched.
        tool: glob on the tool name (``None``: any tool).
        profile: glob on the profile (``None``: any profile).
        sensitive: required value of the tool's ``sensitive`` flag (``None``: either).
        when: predicate over the step input and context (``None``: always).
        require: whether a matching step needs approval (``allow`` otherwise).
        approvers: distinct approvals needed.
        timeout_s: seconds a request stays pending before it expires.
        reviewer_group: role required to decide; empty: the ``reviewer`` role.
    """

    name: str
    tool: str | None = None
    profile: str | None = None
    sensitive: bool | None = None
    when: Predicate | None = None
    require: bool = True
    approvers: int = 1
    timeout_s: float = 3600.0
    reviewer_group: str = ""

    def matches(self, tool: str, profile: str, sensitive: bool, env: Mapping[str, Any]) -> bool:
        """Whether every match key of the rule holds for the step."""
        if self.tool is not None and not fnmatch.fnmatchcase(tool, self.tool):
            return False
        if self.profile is not None and not fnmatch.fnmatchcase(profile, self.profile):
            return False
        if self.sensitive is not None and sensitive != self.sensitive:
            return False
        return self.when is None or self.when.evaluate(env)

    @property
    def deciding_role(self) -> str:
        """The role a reviewer needs to decide requests of this rule."""
        return self.reviewer_group or REVIEWER_ROLE


@dataclass(frozen=True)
class PolicyDecision:
    """What the policy says about one step: the rule that matched (if any) and its action."""

    required: bool
    rule: Rule | None = None


@dataclass(frozen=True)
class ApprovalPolicy:
    """Ordered rules; the first match wins; no match means no approval needed."""

    rules: tuple[Rule, ...]
    lists: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    source: str = "<default>"

    @classmethod
    def default(cls, timeout_s: float = 3600.0) -> ApprovalPolicy:
        """Every sensitive tool needs one approval within ``timeout_s``."""
        return cls((Rule(DEFAULT_RULE_NAME, sensitive=True, timeout_s=timeout_s),))

    def decide(
        self,
        *,
        tool: str,
        profile: str,
        sensitive: bool,
        input: Mapping[str, Any],
        context: Mapping[str, Any],
    ) -> PolicyDecision:
        """The first matching rule's verdict for a step."""
        env = {"input": input, "context": context, "tool": tool, "profile": profile}
        for rule in self.rules:
            if rule.matches(tool, profile, sensitive, env):
                return PolicyDecision(rule.require, rule)
        return PolicyDecision(False, None)

    @property
    def deciding_roles(self) -> frozenset[str]:
        """Every role that may decide some request (``reviewer`` plus rules' groups)."""
        return frozenset({REVIEWER_ROLE} | {r.reviewer_group for r in self.rules} - {""})

    def rule(self, name: str) -> Rule | None:
        """The rule called ``name``."""
        return next((r for r in self.rules if r.name == name), None)


# ----------------------------------------------------------------------------- loading


class _Problem(Exception):
    def __init__(self, node: yaml.Node | None, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


def load_policy(
    path: Path, *, default_timeout_s: float = 3600.0, key: str = "approval.policy_file"
) -> ApprovalPolicy:
    """Read and validate a policy file.

    Raises:
        ConfigError: naming ``key`` with ``<file> line <n>: <reason>``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_policy(text, source=str(path), default_timeout_s=default_timeout_s, key=key)


def parse_policy(
    text: str,
    *,
    source: str = "<policy>",
    default_timeout_s: float = 3600.0,
    key: str = "approval.policy_file",
) -> ApprovalPolicy:
    """Parse policy YAML text (see the module docstring); errors name ``source`` and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(key, f"{source} line {line}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{source}: not valid YAML: {exc}") from None
    try:
        return _build(root, source, default_timeout_s)
    except _Problem as problem:
        where = f" line {problem.node.start_mark.line + 1}" if problem.node is not None else ""
        raise ConfigError(key, f"{source}{where}: {problem.reason}") from None


def _scalar(node: yaml.Node) -> Any:
    """The Python value of a scalar node, resolved as the safe loader would."""
    if not isinstance(node, yaml.ScalarNode):
        raise _Problem(node, "expected a single value")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise _Problem(node, f"bad value: {exc}") from None
    finally:
        loader.dispose()


def _mapping(node: yaml.Node, what: str, allowed: frozenset[str]) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise _Problem(node, f"{what} must be a mapping")
    out: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        name = _scalar(key_node)
        if not isinstance(name, str) or name not in allowed:
            raise _Problem(
                key_node, f"{what}: unknown key {name!r} (valid: {', '.join(sorted(allowed))})"
            )
        if name in out:
            raise _Problem(key_node, f"{what}: duplicate key {name!r}")
        out[name] = value_node
    return out


def _string(node: yaml.Node, what: str) -> str:
    value = _scalar(node)
    if not isinstance(value, str) or not value.strip():
        raise _Problem(node, f"{what} must be a non-empty string")
    return value


def _build(root: yaml.Node | None, source: str, default_timeout_s: float) -> ApprovalPolicy:
    if root is None:
        raise _Problem(None, "the policy file is empty (it needs a 'rules:' list)")
    top = _mapping(root, "the policy", _TOP_KEYS)
    lists: dict[str, tuple[Any, ...]] = {}
    if "lists" in top:
        for name_node, list_node in _mapping_items(top["lists"], "lists"):
            name = _scalar(name_node)
            if not isinstance(name, str) or not name.isidentifier():
                raise _Problem(name_node, f"list name {name!r} must be an identifier")
            if not isinstance(list_node, yaml.SequenceNode):
                raise _Problem(list_node, f"lists.{name} must be a list")
            items = tuple(_scalar(item) for item in list_node.value)
            for item, item_node in zip(items, list_node.value, strict=True):
                if not isinstance(item, str | int | float | bool):
                    raise _Problem(item_node, f"lists.{name}: items must be strings or numbers")
            lists[name] = items
    if "rules" not in top:
        raise _Problem(root, "the policy needs a 'rules:' list")
    rules_node = top["rules"]
    if not isinstance(rules_node, yaml.SequenceNode):
        raise _Problem(rules_node, "rules must be a list")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, rule_node in enumerate(rules_node.value):
        rule = _rule(rule_node, index, lists, default_timeout_s)
        if rule.name in seen:
            raise _Problem(rule_node, f"rules[{index}]: duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    return ApprovalPolicy(tuple(rules), lists, source)


def _mapping_items(node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _Problem(node, f"{what} must be a mapping")
    return list(node.value)


def _rule(
    node: yaml.Node, index: int, lists: Mapping[str, tuple[Any, ...]], default_timeout_s: float
) -> Rule:
    where = f"rules[{index}]"
    fields = _mapping(node, where, _RULE_KEYS)
    if "name" not in fields:
        raise _Problem(node, f"{where}: 'name' is required")
    name = _string(fields["name"], f"{where}.name")
    where = f"rule {name!r}"
    if "action" not in fields:
        raise _Problem(node, f"{where}: 'action' is required (require or allow)")
    action = _scalar(fields["action"])
    if action not in ("require", "allow"):
        raise _Problem(fields["action"], f"{where}: action must be 'require' or 'allow'")
    require = action == "require"
    if not require:
        for extra in ("approvers", "timeout_s", "reviewer_group"):
            if extra in fields:
                raise _Problem(fields[extra], f"{where}: {extra!r} only applies to 'require'")
    approvers = 1
    if "approvers" in fields:
        approvers = _scalar(fields["approvers"])
        if isinstance(approvers, bool) or not isinstance(approvers, int) or approvers < 1:
            raise _Problem(fields["approvers"], f"{where}: approvers must be an integer >= 1")
        if approvers > 16:
            raise _Problem(fields["approvers"], f"{where}: approvers must be at most 16")
    timeout_s = default_timeout_s
    if "timeout_s" in fields:
        value = _scalar(fields["timeout_s"])
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise _Problem(fields["timeout_s"], f"{where}: timeout_s must be a number > 0")
        timeout_s = float(value)
    group = ""
    if "reviewer_group" in fields:
        group = _string(fields["reviewer_group"], f"{where}.reviewer_group")
    tool = profile = None
    sensitive = None
    when = None
    if "match" in fields:
        match = _mapping(fields["match"], f"{where}.match", _MATCH_KEYS)
        if "tool" in match:
            tool = _string(match["tool"], f"{where}.match.tool")
        if "profile" in match:
            profile = _string(match["profile"], f"{where}.match.profile")
        if "sensitive" in match:
            sensitive = _scalar(match["sensitive"])
            if not isinstance(sensitive, bool):
                raise _Problem(match["sensitive"], f"{where}: match.sensitive must be true/false")
        if "when" in match:
            text = _scalar(match["when"])
            if not isinstance(text, str):
                raise _Problem(match["when"], f"{where}: match.when must be a string")
            try:
                when = parse_predicate(text, lists)
            except PredicateError as exc:
                raise _Problem(match["when"], f"{where}: match.when: {exc}") from None
    return Rule(name, tool, profile, sensitive, when, require, approvers, timeout_s, group)


__all__ = [
    "DEFAULT_RULE_NAME",
    "REVIEWER_ROLE",
    "ApprovalPolicy",
    "PolicyDecision",
    "Rule",
    "load_policy",
    "parse_policy",
]
