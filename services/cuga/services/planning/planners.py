"""Pluggable planners: what proposes the steps of a plan in the non-explicit modes.

A planner is anything with a ``plan(request)`` method (or a plain callable) that takes a
:class:`PlanningRequest` — the goal, the run's context, the tool catalogue with each
tool's JSON schema, the memory recalls and the budget — and returns the steps, plain or
``async``. The planning authority wraps it: the four planning modes keep their meaning
whichever planner is chosen (``explicit`` never asks it, ``budget_aware`` trims what it
proposes to the budget, ``memory_augmented`` reuses a remembered plan before asking it),
and every proposal is validated like a client's plan (DAG, tools, schemas, budget).

Planners are chosen by ``planning.planner``: the built-in ``keyword`` (the offline
ranker, the default) and ``llm`` (any OpenAI-compatible Chat Completions endpoint,
:mod:`cuga.services.planning.llm`), or the name of an entry point in the group
``cuga.planners`` whose module lies in ``planning.planner_allowlist`` (checked before the
module is imported, as the worker does for tools).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jsonschema import exceptions as jsonschema_exceptions

from cuga.common.v1 import common_pb2
from cuga.services.planning.dag import SchemaValidators, tool_cost
from cuga.services.planning.ranking import derive_input, rank_tools
from cuga.shared.config import ConfigError, Limits
from cuga.shared.messages import struct_to_dict, to_struct
from cuga.shared.validation import MAX_STEP_REASON_CHARS
from cuga.tools import in_namespaces

if TYPE_CHECKING:
    from cuga.services.planning.config import PlanningConfig

#: The entry-point group planner packages declare (``[project.entry-points."cuga.planners"]``).
PLANNER_ENTRY_POINT_GROUP = "cuga.planners"
#: The planners that ship with cuga (no entry point needed).
BUILTIN_PLANNERS = ("keyword", "llm")


@dataclass(frozen=True)
class ToolInfo:
    """One tool of the catalogue, as a planner sees it.

    Attributes:
        name: the tool's name (what a step's ``tool`` says).
        description: what it does, in a sentence.
        parameters: the JSON schema of its input.
        capabilities: what a worker must offer to run it.
        cost: cost units per call.
        sensitive: whether a human may have to approve a call.
        keywords: words the keyword ranker matches.
        spec: the contract's ``ToolSpec``.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    capabilities: tuple[str, ...]
    cost: float
    sensitive: bool
    keywords: tuple[str, ...]
    spec: common_pb2.ToolSpec

    @classmethod
    def from_spec(cls, spec: common_pb2.ToolSpec) -> ToolInfo:
        """The planner's view of a contract ``ToolSpec``."""
        return cls(
            name=spec.name,
            description=spec.description,
            parameters=struct_to_dict(spec.parameters),
            capabilities=tuple(spec.capabilities),
            cost=tool_cost(spec),
            sensitive=spec.sensitive,
            keywords=tuple(spec.keywords),
            spec=spec,
        )

    def function_schema(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function definition (name, description, parameters)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters) or {"type": "object", "properties": {}},
            },
        }


@dataclass(frozen=True)
class Recall:
    """A completed goal of the same profile that memory found similar.

    Attributes:
        goal: the past goal.
        score: cosine similarity to the current goal (0..1).
        run_id: the run that completed it.
        steps: the plan that succeeded.
    """

    goal: str
    score: float
    run_id: str
    steps: tuple[common_pb2.PlanStep, ...]


@dataclass(frozen=True)
class PlanningRequest:
    """What a planner is asked.

    Attributes:
        goal: what the user wants, 1 to ``limits.max_goal_chars`` characters.
        context: the run's context (profile, user, trace).
        tools: the catalogue, by name, with schemas.
        recalls: similar past goals of the profile (memory-augmented mode; else empty).
        budget: the run's budget (``ceiling`` 0: unlimited).
        mode: ``default``, ``budget_aware`` or ``memory_augmented``.
        deadline_s: seconds the planner may take (``None``: no limit from the caller).
    """

    goal: str
    context: common_pb2.ExecutionContext
    tools: Mapping[str, ToolInfo]
    recalls: tuple[Recall, ...] = ()
    budget: common_pb2.ToolBudget = field(default_factory=common_pb2.ToolBudget)
    mode: str = "default"
    deadline_s: float | None = None


@dataclass
class Proposal:
    """What a planner answers.

    Attributes:
        steps: the proposed steps (``PlanStep`` messages, or mappings with ``step_id``
            or ``id``, ``tool``, ``input``, ``depends_on``, ``reason``).
        notes: sentences for ``plan.notes`` (what was skipped and why).
        cost: what planning itself cost, in budget units (charged to the run).
        exchanges: the model requests and answers, redacted (kept in the plan and audit).
    """

    steps: list[common_pb2.PlanStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: float = 0.0
    exchanges: list[common_pb2.PlannerExchange] = field(default_factory=list)


StepLike = common_pb2.PlanStep | Mapping[str, Any]
PlannerResult = Proposal | Sequence[StepLike]


@runtime_checkable
class Planner(Protocol):
    """Proposes the steps for a goal (sync or async ``plan``)."""

    def plan(self, request: PlanningRequest) -> PlannerResult | Awaitable[PlannerResult]:
        """The steps for ``request.goal``, or a :class:`Proposal`."""
        ...


PlannerLike = Planner | Callable[[PlanningRequest], Any]


def planner_name(planner: object) -> str:
    """A planner's ``name`` attribute, else its class or function name."""
    name = getattr(planner, "name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.isfunction(planner) or inspect.ismethod(planner):
        return planner.__name__
    return type(planner).__name__


def to_step(item: StepLike, index: int) -> common_pb2.PlanStep:
    """A ``PlanStep`` from a message or a mapping (``id`` is accepted for ``step_id``).

    Raises:
        ValueError: the mapping has unknown keys or wrong types.
    """
    if isinstance(item, common_pb2.PlanStep):
        copy = common_pb2.PlanStep()
        copy.CopyFrom(item)
        return copy
    if not isinstance(item, Mapping):
        raise ValueError(f"step {index} is a {type(item).__name__}, not a PlanStep or mapping")
    data = dict(item)
    if "id" in data and "step_id" not in data:
        data["step_id"] = data.pop("id")
    unknown = set(data) - {f.name for f in common_pb2.PlanStep.DESCRIPTOR.fields}
    if unknown:
        raise ValueError(f"step {index} has unknown keys: {', '.join(sorted(unknown))}")
    inputs = data.pop("input", None) or {}
    if not isinstance(inputs, Mapping):
        raise ValueError(f"step {index}: input must be a mapping")
    try:
        step = common_pb2.PlanStep(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"step {index}: {exc}") from None
    step.input.CopyFrom(to_struct(dict(inputs)))
    return step


async def propose(planner: PlannerLike, request: PlanningRequest) -> Proposal:
    """Ask ``planner`` and normalise its answer to a :class:`Proposal`.

    Raises:
        ValueError: the answer is neither a Proposal nor a sequence of steps.
    """
    method = planner.plan if isinstance(planner, Planner) else planner
    result = method(request)
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, Proposal):
        result.steps = [to_step(s, i) for i, s in enumerate(result.steps)]
        return result
    if isinstance(result, str | bytes) or not isinstance(result, Sequence | Iterable):
        raise ValueError(
            f"planner {planner_name(planner)!r} returned {type(result).__name__}, expected a"
            " list of steps or a Proposal"
        )
    return Proposal([to_step(s, i) for i, s in enumerate(result)])


class KeywordPlanner:
    """The offline default: ranks the tools against the goal's words (``ranking.py``).

    Steps are independent (no ``depends_on``), ids ``s<n>-<tool>``, each with a reason
    naming the words that matched; the best is required, the others optional. A tool
    whose input cannot be derived from the goal text is skipped with a note.

    Args:
        rank_threshold: smallest score a tool needs.
        max_steps: most steps proposed.
    """

    name = "keyword"
    """The name ``planning.planner`` chooses it by, and that its plans record."""

    def __init__(self, *, rank_threshold: float = 2.0, max_steps: int = 8) -> None:
        self._threshold = rank_threshold
        self._max_steps = max_steps
        self._validators = SchemaValidators()

    def plan(self, request: PlanningRequest) -> Proposal:
        """Steps for the tools that match the goal, best first."""
        notes: list[str] = []
        steps: list[common_pb2.PlanStep] = []
        goal = request.goal
        for scored in rank_tools(goal, (t.spec for t in request.tools.values())):
            name = scored.tool.name
            if scored.score < self._threshold:
                break
            if not (scored.keyword_hits or scored.name_hits):
                # Words of a description alone ("returns", "two", "number") say little
                # about what a tool is for: such a plan would be an unrelated tool.
                notes.append(
                    f"skipped tool {name!r}: only its description matches the goal"
                    f" ({', '.join(repr(w) for w in scored.description_hits)})"
                )
                continue
            if len(steps) >= self._max_steps:
                notes.append(
                    f"more tools matched; kept the best {self._max_steps}"
                    " (planning.max_ranked_steps)"
                )
                break
            derived = derive_input(goal, scored.tool)
            if derived.value is None:
                notes.append(f"skipped tool {name!r}: it {derived.problem}")
                continue
            try:
                problems = self._validators.errors(scored.tool, derived.value)
            except jsonschema_exceptions.SchemaError:
                notes.append(f"skipped tool {name!r}: its input schema is invalid")
                continue
            if problems:
                notes.append(
                    f"skipped tool {name!r}: the goal does not fit its input ({problems[0]})"
                )
                continue
            reason = scored.reason
            if derived.filled:
                reason += f"; input {', '.join(derived.filled)} = the goal"
            steps.append(
                common_pb2.PlanStep(
                    step_id=f"s{len(steps) + 1}-{name}"[:64],
                    tool=name,
                    input=to_struct(derived.value),
                    estimated_cost=tool_cost(scored.tool),
                    reason=reason[:MAX_STEP_REASON_CHARS],
                    # The best match is the core of the plan; the others may be dropped.
                    optional=bool(steps),
                )
            )
        return Proposal(steps, notes)


def load_planner(
    name: str,
    config: PlanningConfig,
    *,
    limits: Limits | None = None,
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> PlannerLike:
    """The planner ``planning.planner`` names.

    ``keyword`` and ``llm`` are built in. Any other name is looked up in the entry-point
    group ``cuga.planners``; its module must lie in ``planning.planner_allowlist``, which
    is checked before the module is imported. The entry point names a planner object, a
    class (instantiated without arguments) or a plain callable.

    Raises:
        ConfigError: an unknown name, a module outside the allowlist, or an entry point
            that cannot be loaded, naming the setting.
    """
    if name == "keyword":
        return KeywordPlanner(
            rank_threshold=config.rank_threshold, max_steps=config.max_ranked_steps
        )
    if name == "llm":
        from cuga.services.planning.llm import LLMPlanner

        return LLMPlanner(config.llm, limits=limits)
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=PLANNER_ENTRY_POINT_GROUP)
    found = [ep for ep in entry_points if ep.name == name]
    if not found:
        known = sorted({*BUILTIN_PLANNERS, *(ep.name for ep in entry_points)})
        raise ConfigError(
            "planning.planner",
            f"no planner named {name!r} (known: {', '.join(known)}; others install through"
            f" the entry-point group {PLANNER_ENTRY_POINT_GROUP})",
        )
    ep = found[0]
    module = ep.value.partition(":")[0].strip()
    if not in_namespaces(module, config.planner_allowlist):
        raise ConfigError(
            "planning.planner_allowlist",
            f"planner {name!r} = {ep.value!r} lives in module {module!r}, outside the"
            f" allowlisted namespaces ({', '.join(config.planner_allowlist) or 'none'});"
            f" add {module.split('.')[0]!r} to planning.planner_allowlist to use it",
        )
    try:
        obj: Any = ep.load()
    except Exception as exc:  # any import-time failure is a refusal, named
        raise ConfigError(
            "planning.planner", f"cannot load planner {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    if inspect.isclass(obj):
        obj = obj()
    if not (isinstance(obj, Planner) or callable(obj)):
        raise ConfigError(
            "planning.planner", f"planner {name!r} is a {type(obj).__name__}, not a planner"
        )
    planner: PlannerLike = obj
    return planner


__all__ = [
    "BUILTIN_PLANNERS",
    "PLANNER_ENTRY_POINT_GROUP",
    "KeywordPlanner",
    "Planner",
    "PlannerLike",
    "PlannerResult",
    "PlanningRequest",
    "Proposal",
    "Recall",
    "ToolInfo",
    "load_planner",
    "planner_name",
    "propose",
    "to_step",
]
