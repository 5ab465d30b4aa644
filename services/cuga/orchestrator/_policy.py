"""Step-level retry policy, budget accounting and step-input templates."""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from google.protobuf import struct_pb2

from cuga.common.v1 import common_pb2
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.errors import InvalidArgumentError, classify_failure
from cuga.shared.messages import struct_to_dict, to_struct
from cuga.shared.templates import Reference, references

T = TypeVar("T")


@dataclass(frozen=True)
class ExponentialBackoffPolicy:
    """Exponential backoff with full jitter (the delay is uniform in [0, cap]).

    The cap for the delay after attempt ``n`` (1-based) is
    ``min(max_delay, base_delay * multiplier ** (n - 1))``.
    """

    base_delay: float = 1.0
    """Cap of the first delay, seconds (> 0)."""
    multiplier: float = 2.0
    """Growth of the cap per attempt (>= 1)."""
    max_delay: float = 30.0
    """Largest delay, seconds (>= base_delay)."""
    max_attempts: int = 3
    """Attempts in all, including the first (1 to 20)."""

    def __post_init__(self) -> None:
        if self.base_delay <= 0:
            raise ValueError("base_delay must be > 0")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay must be >= base_delay")
        if not 1 <= self.max_attempts <= 20:
            raise ValueError("max_attempts must be between 1 and 20")

    def cap(self, attempt: int) -> float:
        """Upper bound of the delay after ``attempt`` failed."""
        return float(min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1)))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The (jittered) delay before the attempt after ``attempt``."""
        return (rng or random).uniform(0.0, self.cap(attempt))

    @overload
    async def execute(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> T: ...

    @overload
    async def execute(
        self,
        fn: Callable[[], T],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> T: ...

    async def execute(
        self,
        fn: Callable[[], Any],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> Any:
        """Call ``fn`` (plain or ``async``, no arguments) until it returns, at most
        ``max_attempts`` times, waiting :meth:`delay` between attempts.

        The engine retries steps itself (``error_strategy="retry"``); this is the same
        policy for a caller's own code, as the CUGA roadmap's ``RetryPolicy.execute(fn)``.

        Args:
            fn: what to call; wrap arguments with ``functools.partial`` or a lambda.
            retry_if: whether a failure is retried (default: its failure mode is
                retryable: AGENT, SYSTEM, RESOURCE; never POLICY or USER).
            clock: where the delays are slept (tests inject a ``FakeClock``).
            rng: jitter source.

        Raises:
            BaseException: the last failure, or the first one that is not retried.
        """
        should_retry = retry_if or (lambda exc: classify_failure(exc).retryable)
        sleeper = clock or SystemClock()
        attempt = 1
        while True:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    return await result
                return result
            except Exception as exc:
                if attempt >= self.max_attempts or not should_retry(exc):
                    raise
            await sleeper.sleep(self.delay(attempt, rng))
            attempt += 1

    def with_overrides(self, msg: common_pb2.RetryPolicy | None) -> ExponentialBackoffPolicy:
        """This policy with the fields a request sets replaced (validated)."""
        if msg is None:
            return self
        try:
            return ExponentialBackoffPolicy(
                base_delay=msg.base_delay.ToNanoseconds() / 1e9
                if msg.HasField("base_delay")
                else self.base_delay,
                multiplier=msg.multiplier or self.multiplier,
                max_delay=msg.max_delay.ToNanoseconds() / 1e9
                if msg.HasField("max_delay")
                else self.max_delay,
                max_attempts=msg.max_attempts or self.max_attempts,
            )
        except ValueError as exc:
            raise InvalidArgumentError("retry_policy", str(exc)) from None


#: The public name of the policy type (DESIGN: ``RetryPolicy`` / ``ExponentialBackoffPolicy``).
RetryPolicy = ExponentialBackoffPolicy


def template_references(step: common_pb2.PlanStep) -> set[str]:
    """Step ids a step's input refers to with ``{{steps.<id>.output...}}``."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.update(ref.step_id for ref in references(value))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(struct_to_dict(step.input))
    return found


def _text(value: Any) -> str:
    """A value as it reads inside a string: 42 not 42.0, JSON for lists and objects."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list | bool) or value is None:
        return json.dumps(value)
    return str(value)


def resolve_input(step: common_pb2.PlanStep, outputs: dict[str, Any]) -> struct_pb2.Struct:
    """The step's input with ``{{steps.<id>.output[.key...]}}`` references filled in.

    A string that is exactly one reference takes the referenced value with its type; a
    reference inside a longer string is formatted into it. Not code: only dotted lookups.
    References are found by the scanner planning checks plans with
    (:mod:`cuga.shared.templates`), so both agree on which step a reference names; one
    planning accepts but no dotted lookup can resolve (``output[0]``) is refused here.
    """
    field = f"steps[{step.step_id}].input"

    def lookup(text: str, ref: Reference) -> Any:
        shown = text[ref.start : ref.end]
        if ref.step_id not in outputs:
            raise InvalidArgumentError(field, f"refers to {ref.step_id!r}, which has no output")
        keys = ref.keys()
        if keys is None:
            raise InvalidArgumentError(
                field, f"{shown} is not a dotted path (.key or .index after output)"
            )
        value = outputs[ref.step_id]
        for key in keys:
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise InvalidArgumentError(
                    field, f"{shown} has no key {key!r} in the output of {ref.step_id!r}"
                )
        return value

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            refs = list(references(value))
            if len(refs) == 1 and refs[0].is_whole(value):
                return lookup(value, refs[0])
            parts: list[str] = []
            done = 0
            for ref in refs:
                parts += (value[done : ref.start], _text(lookup(value, ref)))
                done = ref.end
            return "".join(parts) + value[done:]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return to_struct(fill(struct_to_dict(step.input)))


__all__ = [
    "ExponentialBackoffPolicy",
    "RetryPolicy",
    "resolve_input",
    "template_references",
]
