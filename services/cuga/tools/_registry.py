"""The tool registry: explicit registration and entry-point discovery under an allowlist."""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import duration_pb2

from cuga.common.v1 import common_pb2
from cuga.shared.errors import NotFoundError
from cuga.shared.messages import to_struct
from cuga.tools._spec import ToolDefinitionError, ToolSpec

#: The entry-point group tool packages declare (``[project.entry-points."cuga.tools"]``).
ENTRY_POINT_GROUP = "cuga.tools"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ToolLoadError(ToolDefinitionError):
    """A tool (or an entry point naming tools) was refused at load; the message says why."""


def in_namespaces(module: str, namespaces: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``namespaces`` or inside one (``a.b`` is inside ``a``)."""
    return any(module == ns or module.startswith(ns + ".") for ns in namespaces)


class ToolRegistry:
    """The tools one worker runs, by name.

    Args:
        allowlist: module namespaces handlers may live in. Every registered spec's handler
            module is checked against it; ``None`` disables the check (only for tools built
            in code you control, e.g. in tests of the SDK itself).
    """

    def __init__(self, allowlist: Sequence[str] | None = None) -> None:
        self._allowlist = tuple(allowlist) if allowlist is not None else None
        if self._allowlist is not None:
            for ns in self._allowlist:
                if not _DOTTED.fullmatch(ns):
                    raise ToolLoadError(f"allowlist entry {ns!r} is not a dotted module name")
        self._tools: dict[str, ToolSpec] = {}

    @property
    def allowlist(self) -> tuple[str, ...] | None:
        """The allowlisted handler namespaces (``None``: unchecked)."""
        return self._allowlist

    def register(self, spec: ToolSpec, *, source: str = "code") -> None:
        """Add a tool.

        Raises:
            ToolLoadError: not a ToolSpec, handler outside the allowlist, or a duplicate name.
        """
        if not isinstance(spec, ToolSpec):
            raise ToolLoadError(f"{source}: expected a cuga.tools.ToolSpec, got {type(spec)!r}")
        if not callable(spec.handler):
            raise ToolLoadError(f"{source}: tool {spec.name!r} handler is not callable")
        module = spec.handler_module
        if self._allowlist is not None and not in_namespaces(module, self._allowlist):
            raise ToolLoadError(
                f"{source}: tool {spec.name!r} handler lives in module {module!r}, outside the "
                f"allowlisted namespaces ({', '.join(self._allowlist) or 'none'})"
            )
        existing = self._tools.get(spec.name)
        if existing is not None and existing is not spec:
            raise ToolLoadError(f"{source}: tool {spec.name!r} is already registered")
        self._tools[spec.name] = spec

    def register_all(self, specs: Iterable[ToolSpec], *, source: str = "code") -> None:
        """Add several tools."""
        for spec in specs:
            self.register(spec, source=source)

    def get(self, name: str) -> ToolSpec:
        """The tool called ``name``.

        Raises:
            NotFoundError: no such tool.
        """
        spec = self._tools.get(name)
        if spec is None:
            raise NotFoundError(f"tool {name!r} is not registered on this worker")
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Tool names, sorted."""
        return sorted(self._tools)

    def specs(self) -> list[ToolSpec]:
        """Every tool, sorted by name."""
        return [self._tools[name] for name in sorted(self._tools)]

    def capabilities(self) -> list[str]:
        """The union of every tool's capabilities, sorted."""
        return sorted({cap for spec in self._tools.values() for cap in spec.capabilities})

    def load_entry_points(
        self,
        allowlist: Sequence[str] | None = None,
        *,
        group: str = ENTRY_POINT_GROUP,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    ) -> list[str]:
        """Register the tools every installed package declares in ``group``.

        An entry point names a ``ToolSpec`` or a list of them (``module:attribute``). The
        entry point's module is checked against the allowlist *before* it is imported, so
        code outside the allowlist never runs; each handler's module is checked again after.

        Args:
            allowlist: namespaces handlers may live in (default: the registry's).
            group: the entry-point group.
            entry_points: the entry points to load (default: the installed ones; tests pass
                their own).

        Returns:
            the names of the tools registered.

        Raises:
            ToolLoadError: a malformed entry point, a module outside the allowlist, a
                missing or non-ToolSpec attribute, or a bad spec.
        """
        allowed = tuple(allowlist) if allowlist is not None else self._allowlist
        if allowed is None:
            raise ToolLoadError("loading entry points needs an allowlist of module namespaces")
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=group)
        loaded: list[str] = []
        for ep in sorted(entry_points, key=lambda e: e.name):
            source = f"entry point {ep.name!r} = {ep.value!r} (group {group})"
            module, _, attr = ep.value.partition(":")
            module, attr = module.strip(), attr.strip()
            if not _DOTTED.fullmatch(module) or not attr or not _DOTTED.fullmatch(attr):
                raise ToolLoadError(f"{source}: malformed, expected 'package.module:attribute'")
            if not in_namespaces(module, allowed):
                raise ToolLoadError(
                    f"{source}{_package_of(ep)}: module {module!r} is outside the allowlisted"
                    f" namespaces ({', '.join(allowed) or 'none'}). {_allow_hint(module, allowed)}"
                )
            try:
                obj: Any = ep.load()
            except ToolDefinitionError as exc:
                raise ToolLoadError(f"{source}: {exc}") from None
            except Exception as exc:  # any import-time failure is a refusal, named
                raise ToolLoadError(f"{source}: cannot load: {type(exc).__name__}: {exc}") from None
            specs = obj if isinstance(obj, list | tuple) else [obj]
            for spec in specs:
                if not isinstance(spec, ToolSpec):
                    raise ToolLoadError(
                        f"{source}: expected a ToolSpec or a list of ToolSpecs, "
                        f"got {type(spec).__name__}"
                    )
                if not in_namespaces(spec.handler_module, allowed):
                    raise ToolLoadError(
                        f"{source}: tool {spec.name!r} handler lives in module "
                        f"{spec.handler_module!r}, outside the allowlisted namespaces "
                        f"({', '.join(allowed)})"
                    )
                self.register(spec, source=source)
                loaded.append(spec.name)
        return loaded


def _package_of(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f" of package {dist.name!r}" if dist is not None else ""


def _allow_hint(module: str, allowed: Sequence[str]) -> str:
    """The exact setting that lets a tool package's module load (the worker's allowlist)."""
    namespaces = [*allowed, module.split(".")[0]]
    return (
        f"To run its tools, add {module.split('.')[0]!r} to worker.tool_allowlist: in the"
        f" config file `worker: {{tool_allowlist: [{', '.join(namespaces)}]}}`, or"
        f" CUGA_WORKER__TOOL_ALLOWLIST={','.join(namespaces)}; to leave it out, uninstall"
        " the package (docs/tools/creating-tools.md)."
    )


def to_proto(spec: ToolSpec) -> common_pb2.ToolSpec:
    """The contract's ``cuga.common.v1.ToolSpec`` for a spec (its schema included)."""
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(int(spec.timeout * 1e9))
    return common_pb2.ToolSpec(
        name=spec.name,
        description=spec.description,
        parameters=to_struct(dict(spec.parameters)),
        capabilities=list(spec.capabilities),
        sensitive=spec.sensitive,
        cost=spec.cost,
        timeout=timeout,
        keywords=list(spec.keywords),
    )
