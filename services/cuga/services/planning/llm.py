"""A planner that asks a language model, over any OpenAI-compatible Chat Completions API.

OpenAI, vLLM, Ollama and LiteLLM all serve ``POST {base_url}/chat/completions``; the
``openai`` package is the client. The request carries the tool catalogue as function
definitions (name, description, JSON schema) and asks for the plan as structured output
(``response_format`` ``json_schema`` with :data:`PLAN_SCHEMA`). The answer is checked
against that schema and then like a client's plan (tools, input schemas, the DAG, the
budget under BLOCK); when it fails, the model gets one repair round with the errors. Every
exchange, secrets redacted, is returned in the proposal, so it is kept in the plan and in
the audit record of the run's PLAN event; its tokens, at the configured prices, are the
planning cost the run's budget is charged.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2
from jsonschema import Draft202012Validator

from cuga.common.v1 import common_pb2
from cuga.services.planning.config import LLMConfig
from cuga.services.planning.dag import SchemaValidators, validate_steps
from cuga.services.planning.planners import PlanningRequest, Proposal, to_step
from cuga.shared.config import ConfigError, Limits
from cuga.shared.errors import (
    CugaError,
    DeadlineExceededError,
    FailedPreconditionError,
    UnavailableError,
)

#: The plan a model must answer: steps with ids, tools, inputs and dependencies, or a
#: refusal saying why no plan can serve the goal with these tools.
PLAN_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
                    "tool": {"type": "string"},
                    "input": {"type": "object"},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                    "reason": {"type": "string"},
                },
                "required": ["id", "tool", "input", "depends_on"],
                "additionalProperties": False,
            },
        },
        "refusal": {"type": "string"},
    },
    "required": ["steps"],
    "additionalProperties": False,
}
_PLAN_VALIDATOR = Draft202012Validator(PLAN_SCHEMA)

SYSTEM_PROMPT = """You plan the work of a tool-using agent. Answer with one JSON object
matching the given schema and nothing else.
- Use only the tools listed; each step's "input" must satisfy that tool's JSON schema.
- Give each step a short unique "id". A step that needs another step's result lists it in
  "depends_on" and refers to its output as "{{steps.<id>.output.<key>}}" inside a string.
- Steps without a dependency between them run in parallel. Keep the plan minimal.
- If the budget has a ceiling, the steps' total cost must not exceed it.
- If no plan with these tools can serve the goal, answer {"steps": [], "refusal": "<why>"}.
"""

MAX_REQUEST_CHARS = 256 * 1024
MAX_ANSWER_CHARS = 64 * 1024
_SECRET_PATTERNS = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(
        r"(?i)(\"?(?:api[_-]?key|authorization|password|secret|token)\"?\s*[:=]\s*\"?)[^\s\",}]{4,}"
    ),
)
REDACTED = "[REDACTED]"


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with every known secret and anything shaped like a key or token replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + " …[truncated]"


class LLMPlanner:
    """Plans with a language model behind an OpenAI-compatible Chat Completions API.

    Args:
        config: the ``planning.llm`` section.
        limits: step limits the answer is validated against.
        environ: where ``api_key_env`` is read (default ``os.environ``; tests pass theirs).
    """

    name = "llm"
    """The name ``planning.planner`` chooses it by, and that its plans record."""

    def __init__(
        self,
        config: LLMConfig,
        *,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not config.model:
            raise ConfigError("planning.llm.model", "is required when planning.planner is llm")
        self._config = config
        self._limits = limits or Limits()
        self._environ = os.environ if environ is None else environ
        self._validators = SchemaValidators()

    def _api_key(self) -> str:
        config = self._config
        if config.api_key_file:
            try:
                return Path(config.api_key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise FailedPreconditionError(
                    f"cannot read planning.llm.api_key_file: {exc.strerror}",
                    reason="PLANNER_MISCONFIGURED",
                ) from None
        return self._environ.get(config.api_key_env, "") if config.api_key_env else ""

    def _body(self, request: PlanningRequest) -> dict[str, Any]:
        budget = request.budget
        task: dict[str, Any] = {
            "goal": request.goal,
            "budget": {
                "ceiling": budget.ceiling,
                "max_calls": budget.max_calls,
                "policy": common_pb2.BudgetPolicy.Name(budget.policy).removeprefix(
                    "BUDGET_POLICY_"
                ),
            },
            "tool_costs": {name: tool.cost for name, tool in request.tools.items()},
        }
        if request.recalls:
            task["similar_past_plans"] = [
                {
                    "goal": r.goal,
                    "similarity": round(r.score, 3),
                    "steps": [
                        {"id": s.step_id, "tool": s.tool, "depends_on": list(s.depends_on)}
                        for s in r.steps
                    ],
                }
                for r in request.recalls
            ]
        return {
            "model": self._config.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": json.dumps(task, ensure_ascii=False)},
            ],
            # The catalogue as function definitions; the answer is the plan, not a call.
            "tools": [tool.function_schema() for tool in request.tools.values()],
            "tool_choice": "none",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "plan", "schema": PLAN_SCHEMA},
            },
            "temperature": self._config.temperature,
            "max_tokens": self._config.max_tokens,
        }

    def _check(
        self, content: str, request: PlanningRequest
    ) -> tuple[list[common_pb2.PlanStep] | None, str, list[str]]:
        """(steps, refusal, problems) of an answer; steps None when it is not valid."""
        try:
            data = json.loads(content)
        except json.JSONDecodeError as exc:
            return None, "", [f"the answer is not JSON: {exc.msg} at position {exc.pos}"]
        problems = [
            f"{'$' + ''.join(f'[{p!r}]' for p in e.absolute_path)}: {e.message}"
            for e in _PLAN_VALIDATOR.iter_errors(data)
        ][:10]
        if problems:
            return None, "", problems
        if not data["steps"]:
            return [], str(data.get("refusal") or "the model proposed no step"), []
        try:
            steps = [to_step(item, i) for i, item in enumerate(data["steps"])]
        except ValueError as exc:
            return None, "", [str(exc)]
        tools = {name: info.spec for name, info in request.tools.items()}
        try:
            checked = validate_steps(steps, tools, self._limits, self._validators)
        except CugaError as exc:
            return None, "", [exc.message]
        budget = request.budget
        total = math.fsum(s.estimated_cost for s in checked)
        if (
            budget.policy == common_pb2.BUDGET_POLICY_BLOCK
            and budget.ceiling > 0
            and total > budget.ceiling
        ):
            return None, "", [f"the steps cost {total:g}; the budget allows {budget.ceiling:g}"]
        return checked, "", []

    async def plan(self, request: PlanningRequest) -> Proposal:
        """Ask the model for a plan; one repair round if its answer is not valid.

        Raises:
            FailedPreconditionError: the model refused (``PLANNER_REFUSED``), its answers
                stayed invalid (``PLANNER_INVALID_PLAN``), or the budget cannot pay a
                repair round under BLOCK (``BUDGET_EXCEEDED``).
            DeadlineExceededError: no answer within ``timeout_s`` or the caller's deadline.
            UnavailableError: the endpoint could not be reached or answered an error.
        """
        # Imported here, not at the top: the package takes ~0.5 s to import, and every
        # process that reads the planning settings (each service, each CLI command)
        # would pay it whether or not it plans with a model.
        import openai

        config = self._config
        key = self._api_key()
        secrets = [key] if key else []
        limit = config.timeout_s
        if request.deadline_s is not None:
            limit = max(0.0, min(limit, request.deadline_s))
        started = time.monotonic()
        body = self._body(request)
        proposal = Proposal()
        async with openai.AsyncOpenAI(
            api_key=key or "not-set",
            base_url=config.base_url,
            timeout=limit,
            max_retries=0,  # a retry is the coordinator's decision, not the client's
        ) as client:
            for round_ in range(1, config.repair_rounds + 2):
                left = limit - (time.monotonic() - started)
                if left <= 0:
                    raise self._timeout(limit)
                exchange = common_pb2.PlannerExchange(
                    round=round_,
                    model=config.model,
                    request_json=_clip(
                        redact(json.dumps(body, ensure_ascii=False), secrets), MAX_REQUEST_CHARS
                    ),
                )
                proposal.exchanges.append(exchange)
                t0 = time.monotonic()
                try:
                    response = await client.chat.completions.create(**body, timeout=left)
                except openai.APITimeoutError:
                    exchange.problem = "timed out"
                    raise self._timeout(limit) from None
                except openai.APIStatusError as exc:
                    exchange.problem = f"HTTP {exc.status_code}"
                    raise UnavailableError(
                        f"the planner's endpoint {config.base_url} answered HTTP"
                        f" {exc.status_code}: {redact(_clip(str(exc.message), 500), secrets)}",
                        reason="PLANNER_UNAVAILABLE",
                    ) from None
                except openai.APIError as exc:
                    exchange.problem = type(exc).__name__
                    raise UnavailableError(
                        f"cannot reach the planner's endpoint {config.base_url}:"
                        f" {redact(_clip(str(exc), 500), secrets)}",
                        reason="PLANNER_UNAVAILABLE",
                    ) from None
                finally:
                    exchange.duration.CopyFrom(_duration(time.monotonic() - t0))
                self._charge(proposal, exchange, response)
                message = response.choices[0].message if response.choices else None
                content = (message.content or "") if message is not None else ""
                refusal = getattr(message, "refusal", None) or ""
                exchange.answer = _clip(redact(content or refusal, secrets), MAX_ANSWER_CHARS)
                if refusal and not content:
                    raise self._refused(refusal, secrets)
                steps, refused, problems = self._check(content, request)
                if steps is not None:
                    if not steps:
                        raise self._refused(refused, secrets)
                    proposal.steps = steps
                    proposal.notes.append(
                        f"planned by {config.model} at {config.base_url}"
                        + (" after a repair round" if round_ > 1 else "")
                        + f" ({len(proposal.exchanges)} request(s), cost {proposal.cost:g})"
                    )
                    return proposal
                exchange.problem = _clip("; ".join(problems), 4096)
                if round_ > config.repair_rounds:
                    break
                budget = request.budget
                if (
                    budget.policy == common_pb2.BUDGET_POLICY_BLOCK
                    and budget.ceiling > 0
                    and proposal.cost >= budget.ceiling
                ):
                    raise FailedPreconditionError(
                        f"planning has cost {proposal.cost:g} of the budget's"
                        f" {budget.ceiling:g}; no repair round is affordable"
                        f" (the answer was not valid: {exchange.problem})",
                        reason="BUDGET_EXCEEDED",
                        metadata={
                            "required": f"{proposal.cost:g}",
                            "available": f"{budget.ceiling:g}",
                        },
                    )
                body["messages"] = [
                    *body["messages"],
                    {"role": "assistant", "content": content},
                    {
                        "role": "user",
                        "content": "That plan is not valid: "
                        + "; ".join(problems)
                        + ". Answer again with a corrected plan (the whole JSON object).",
                    },
                ]
        raise FailedPreconditionError(
            f"the planner's answers were not a valid plan after"
            f" {len(proposal.exchanges)} request(s): {proposal.exchanges[-1].problem}",
            reason="PLANNER_INVALID_PLAN",
        )

    def _charge(
        self, proposal: Proposal, exchange: common_pb2.PlannerExchange, response: Any
    ) -> None:
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        exchange.prompt_tokens = prompt
        exchange.completion_tokens = completion
        exchange.cost = (
            prompt * self._config.prompt_token_price
            + completion * self._config.completion_token_price
        ) / 1000
        proposal.cost += exchange.cost

    @staticmethod
    def _timeout(limit: float) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"the planner's model did not answer within {limit:g}s (planning.llm.timeout_s"
            " or the call's deadline)",
            reason="PLANNER_TIMEOUT",
        )

    @staticmethod
    def _refused(why: str, secrets: Sequence[str]) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"the planner found no plan for the goal: {redact(_clip(why, 1000), secrets)}",
            reason="PLANNER_REFUSED",
        )


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


__all__ = ["PLAN_SCHEMA", "SYSTEM_PROMPT", "LLMPlanner", "redact"]
