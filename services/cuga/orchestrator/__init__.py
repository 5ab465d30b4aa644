"""The public Python API of the cuga orchestrator.

One engine, two ways to run it: :func:`create_coordinator` builds a
:class:`CoordinatorAgent` with the services' local implementations (embedded, no network)
or with remote ones for the authorities named in ``addresses``::

    from cuga.orchestrator import create_coordinator, ExecutionContext

    agent = await create_coordinator(data_dir="./.cuga")
    async for event in agent.orchestrate("add two numbers", plan=steps):
        print(event.stage, event.seq)
"""

from cuga.common.v1.common_pb2 import (
    ExecutionContext,
    OrchestrationEvent,
    PartialResult,
    Plan,
    PlanStep,
    RoutingDecision,
    ToolBudget,
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
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.errors import CugaError, FailureMode, ToolExecutionError, classify_failure

__all__ = [
    "ApprovalDeniedError",
    "ApprovalManager",
    "ApprovalTimeoutError",
    "AuditTrail",
    "CoordinatorAgent",
    "CugaError",
    "EngineOptions",
    "ErrorAction",
    "ErrorPropagation",
    "ExecutionContext",
    "ExponentialBackoffPolicy",
    "FailureMode",
    "LifecycleStage",
    "OrchestrationError",
    "OrchestrationEvent",
    "OrchestratorProtocol",
    "PartialResult",
    "Plan",
    "PlanStep",
    "PlanningAuthority",
    "PostgresRunStore",
    "RetryPolicy",
    "RoutingAuthority",
    "RoutingDecision",
    "RunStore",
    "SQLiteRunStore",
    "ToolBudget",
    "ToolExecutionError",
    "WorkerPool",
    "classify_failure",
    "create_coordinator",
    "open_run_store",
]
