"""The public Python API of the cuga orchestrator.

One engine, two ways to run it: :func:`create_coordinator` builds a
:class:`CoordinatorAgent` with the services' local implementations (embedded, no network)
or with remote ones for the authorities named in ``addresses``::

    from cuga.orchestrator import create_coordinator, ExecutionContext

    agent = await create_coordinator(data_dir="./.cuga")
    async for event in agent.orchestrate("add two numbers", plan=steps):
        print(event.stage, event.seq)

The CUGA roadmap's shapes work as written — ``create_coordinator(planner, workers,
memory, ...)``, ``ToolBudget(ceiling=100, policy="warn")``, ``ApprovalPolicy(callable)``,
``agent.audit_trail.get_decisions(trace_id)``, ``RetryPolicy.execute(fn)``;
docs/migrating-from-cuga.md maps each name and says what differs.
"""

from typing import TYPE_CHECKING, Any

from cuga.common.v1.common_pb2 import (
    ExecutionContext,
    OrchestrationEvent,
    PartialResult,
    Plan,
    PlanStep,
    RoutingDecision,
)
from cuga.orchestrator._engine import (
    ApprovalDeniedError,
    ApprovalTimeoutError,
    CoordinatorAgent,
    EngineOptions,
    ErrorAction,
    OrchestrationError,
)
from cuga.orchestrator._factory import create_coordinator
from cuga.orchestrator._policy import ExponentialBackoffPolicy, RetryPolicy
from cuga.orchestrator._protocol import ErrorPropagation, LifecycleStage, OrchestratorProtocol
from cuga.orchestrator._runstore import PostgresRunStore, RunStore, SQLiteRunStore, open_run_store
from cuga.orchestrator._seed import (
    ApprovalCheck,
    ApprovalPolicy,
    ApprovalStatus,
    AuditTrailView,
    EmbeddedCoordinator,
    EmbeddedWorker,
    ToolBudget,
    VectorMemory,
    budget_policy,
    error_strategy,
)
from cuga.services.planning.planners import (
    KeywordPlanner,
    Planner,
    PlanningRequest,
    Proposal,
    Recall,
    ToolInfo,
)
from cuga.shared.auth import Identity
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.errors import CugaError, FailureMode, ToolExecutionError, classify_failure
from cuga.tools import ToolRegistry, ToolSpec

if TYPE_CHECKING:
    from cuga.services.planning.config import LLMConfig
    from cuga.services.planning.llm import LLMPlanner
    from cuga.services.planning.memory import Embedder, HashingEmbedder, MemoryHit

#: Imported when first asked for: the memory's embedder brings numpy (~60 ms), which a
#: coordinator service (its planning is remote) never uses; the LLM planner the openai
#: client.
_LAZY = {
    "Embedder": "cuga.services.planning.memory",
    "HashingEmbedder": "cuga.services.planning.memory",
    "MemoryHit": "cuga.services.planning.memory",
    "LLMConfig": "cuga.services.planning.config",
    "LLMPlanner": "cuga.services.planning.llm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cuga.orchestrator' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ApprovalCheck",
    "ApprovalDeniedError",
    "ApprovalManager",
    "ApprovalPolicy",
    "ApprovalStatus",
    "ApprovalTimeoutError",
    "AuditTrail",
    "AuditTrailView",
    "CoordinatorAgent",
    "CugaError",
    "EmbeddedCoordinator",
    "EmbeddedWorker",
    "Embedder",
    "EngineOptions",
    "ErrorAction",
    "ErrorPropagation",
    "ExecutionContext",
    "ExponentialBackoffPolicy",
    "FailureMode",
    "HashingEmbedder",
    "Identity",
    "KeywordPlanner",
    "LLMConfig",
    "LLMPlanner",
    "LifecycleStage",
    "MemoryHit",
    "OrchestrationError",
    "OrchestrationEvent",
    "OrchestratorProtocol",
    "PartialResult",
    "Plan",
    "PlanStep",
    "Planner",
    "PlanningAuthority",
    "PlanningRequest",
    "PostgresRunStore",
    "Proposal",
    "Recall",
    "RetryPolicy",
    "RoutingAuthority",
    "RoutingDecision",
    "RunStore",
    "SQLiteRunStore",
    "ToolBudget",
    "ToolExecutionError",
    "ToolInfo",
    "ToolRegistry",
    "ToolSpec",
    "VectorMemory",
    "WorkerPool",
    "budget_policy",
    "classify_failure",
    "create_coordinator",
    "error_strategy",
    "open_run_store",
]
