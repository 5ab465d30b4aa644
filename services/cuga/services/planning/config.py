"""Configuration of the planning service (the ``planning:`` section)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from cuga.shared.config import ConfigError
from cuga.shared.sqldb import PoolConfig

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PLANNER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

PlanningModeName = Literal["explicit", "default", "budget_aware", "memory_augmented"]
BudgetPolicyName = Literal["warn", "block"]


@dataclass(frozen=True)
class LLMConfig:
    """The ``planning.llm`` section: which endpoint and model the ``llm`` planner asks."""

    base_url: str = "https://api.openai.com/v1"
    """Base URL of the OpenAI-compatible API (vLLM: ``http://host:8000/v1``, Ollama:
    ``http://localhost:11434/v1``)."""
    model: str = ""
    """Model name the endpoint knows (``gpt-4o-mini``, ``Qwen/Qwen2.5-7B-Instruct``,
    ``llama3.1``). Required when ``planning.planner`` is ``llm``."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; empty or unset with no file: no key is
    sent (local servers such as Ollama or vLLM need none)."""
    api_key_file: str = ""
    """File holding the API key (a mounted secret); wins over ``api_key_env``. Read for
    each plan, so a rotated key is picked up; never logged."""
    timeout_s: float = 30.0
    """Most seconds one planning call may take, repair round included, 0.05 to 600 (never
    more than the caller's deadline)."""
    max_tokens: int = 2048
    """Most tokens of one answer, 16 to 65536."""
    temperature: float = 0.0
    """Sampling temperature, 0 to 2 (0: the most repeatable plans)."""
    prompt_token_price: float = 0.0
    """Budget units charged per 1000 prompt tokens (>= 0)."""
    completion_token_price: float = 0.0
    """Budget units charged per 1000 completion tokens (>= 0)."""
    repair_rounds: int = 1
    """Repair requests after an invalid answer, 0 or 1."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"https?://[^\s]+", self.base_url):
            raise ConfigError("base_url", f"{self.base_url!r} is not an http(s) URL")
        if not 0.05 <= self.timeout_s <= 600:
            raise ConfigError("timeout_s", "must be between 0.05 and 600")
        if not 16 <= self.max_tokens <= 65536:
            raise ConfigError("max_tokens", "must be between 16 and 65536")
        if not 0 <= self.temperature <= 2:
            raise ConfigError("temperature", "must be between 0 and 2")
        for name in ("prompt_token_price", "completion_token_price"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(name, "must be a finite number >= 0")
        if self.repair_rounds not in (0, 1):
            raise ConfigError("repair_rounds", "must be 0 or 1")


@dataclass(frozen=True)
class PlanningConfig:
    """Settings of the planning authority; limits on goals and steps are in ``limits``."""

    default_mode: PlanningModeName = "default"
    """Mode used when a request says UNSPECIFIED and gives no steps."""
    planner: str = "keyword"
    """What proposes the steps in the default, budget-aware and memory-augmented modes:
    ``keyword`` (the offline ranker), ``llm`` (an OpenAI-compatible endpoint, see
    ``llm``), or the name of an entry point of the group ``cuga.planners``."""
    planner_allowlist: tuple[str, ...] = ("cuga.services.planning",)
    """Module namespaces a planner entry point may live in; one outside them is refused
    at start, before its module is imported."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The ``llm`` planner's endpoint, model, key, timeout and token prices."""
    default_budget_policy: BudgetPolicyName = "warn"
    """Policy applied at plan time when a budget says BUDGET_POLICY_UNSPECIFIED."""
    catalog_ttl_s: float = 5.0
    """How long the tool catalogue fetched from routing and workers is reused, seconds,
    0 to 3600 (0: fetched for every plan)."""
    static_tools_file: str = ""
    """A YAML or JSON file of ToolSpecs used instead of asking routing and workers (tests,
    single-node set-ups). Empty: the remote catalogue."""
    rank_threshold: float = 2.0
    """Smallest ranking score a tool needs to be planned in default mode, > 0. A keyword
    match scores 3, a name word 2, a description word 1; a tool matching on description
    words alone is never planned."""
    max_ranked_steps: int = 8
    """Most steps default/budget-aware planning builds, 1 to 256."""
    memory_similarity_threshold: float = 0.6
    """Cosine similarity (0 < s <= 1) a past goal needs to be reused in memory-augmented
    mode."""
    memory_max_records_per_profile: int = 5000
    """Most memory records kept per profile, 1 to 100000; the oldest are evicted. A search
    scans at most this many vectors (5000 x 512 float32 = 10 MiB)."""
    embedding_dims: int = 512
    """Dimensions of the default feature-hashing embedder, 16 to 8192."""
    request_retention_s: float = 7 * 24 * 3600.0
    """How long request ids are remembered for idempotency, seconds, >= 60."""
    store: Literal["sqlite", "postgres"] = "sqlite"
    """Where plans and memory live: ``sqlite`` (``planning.db`` under data_dir, one
    process) or ``postgres`` (by ``dsn``; required for several planning replicas)."""
    dsn: str = ""
    """PostgreSQL connection string (libpq DSN or URI). Required when store is postgres."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """With store postgres: the connection pool (``min_size``, ``max_size``,
    ``timeout_s``, ``connect_timeout_s``); queries run on it without blocking the service."""

    def __post_init__(self) -> None:
        if not _PLANNER_NAME.fullmatch(self.planner):
            raise ConfigError("planner", f"{self.planner!r} is not a planner name")
        for ns in self.planner_allowlist:
            if not _DOTTED.fullmatch(ns):
                raise ConfigError("planner_allowlist", f"{ns!r} is not a dotted module name")
        if self.planner == "llm" and not self.llm.model:
            raise ConfigError("llm.model", "is required when planner is llm")
        if self.store == "postgres" and not self.dsn.strip():
            raise ConfigError("dsn", "is required when store is postgres")
        if not 0 <= self.catalog_ttl_s <= 3600:
            raise ConfigError("catalog_ttl_s", "must be between 0 and 3600")
        if not (math.isfinite(self.rank_threshold) and self.rank_threshold > 0):
            raise ConfigError("rank_threshold", "must be > 0")
        if not 1 <= self.max_ranked_steps <= 256:
            raise ConfigError("max_ranked_steps", "must be between 1 and 256")
        if not 0 < self.memory_similarity_threshold <= 1:
            raise ConfigError("memory_similarity_threshold", "must be in (0, 1]")
        if not 1 <= self.memory_max_records_per_profile <= 100_000:
            raise ConfigError("memory_max_records_per_profile", "must be between 1 and 100000")
        if not 16 <= self.embedding_dims <= 8192:
            raise ConfigError("embedding_dims", "must be between 16 and 8192")
        if self.request_retention_s < 60:
            raise ConfigError("request_retention_s", "must be >= 60")
