"""The plan as a picture: steps placed in layers by their dependencies, drawn as SVG.

Pure functions, no web framework: :func:`layout` places the steps of a DAG (longest path
from a root gives the layer, the order inside a layer follows the plan), :func:`render_svg`
draws boxes and arrows. Every string that reaches the SVG goes through
:func:`markupsafe.escape`, so a step id or tool name cannot become markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

#: Box size and gaps, pixels.
BOX_W = 168
BOX_H = 46
GAP_X = 56
GAP_Y = 22
PAD = 12


@dataclass(frozen=True)
class Node:
    """One step as drawn: id, tool, dependencies and its position."""

    step_id: str
    tool: str
    depends_on: tuple[str, ...]
    layer: int
    row: int

    @property
    def x(self) -> int:
        return PAD + self.layer * (BOX_W + GAP_X)

    @property
    def y(self) -> int:
        return PAD + self.row * (BOX_H + GAP_Y)


def layout(steps: Sequence[tuple[str, str, Sequence[str]]]) -> list[Node]:
    """Place ``(step_id, tool, depends_on)`` steps: layer = longest path from a root.

    Dependencies on unknown steps are ignored (planning refuses such plans; the picture
    must not fail on one). A cycle (refused by planning too) puts its steps in layer 0.
    """
    known = {step_id for step_id, _, _ in steps}
    deps = {sid: tuple(d for d in dep if d in known) for sid, _, dep in steps}
    layer: dict[str, int] = {}

    def depth(sid: str, seen: frozenset[str]) -> int:
        if sid in layer:
            return layer[sid]
        if sid in seen:
            return 0
        value = max((depth(d, seen | {sid}) + 1 for d in deps[sid]), default=0)
        layer[sid] = value
        return value

    rows: dict[int, int] = {}
    nodes = []
    for sid, tool, _ in steps:
        level = depth(sid, frozenset())
        row = rows.get(level, 0)
        rows[level] = row + 1
        nodes.append(Node(sid, tool, deps[sid], level, row))
    return nodes


def _label(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render_svg(nodes: Sequence[Node], states: Mapping[str, str]) -> Markup:
    """The DAG as an inline ``<svg>``; each box carries ``data-step`` and a ``state-*`` class
    (``pending``, ``routed``, ``approval``, ``running``, ``retrying``, ``done``, ``failed``,
    ``skipped``, ``denied``, ``cancelled``) that the page's script changes live."""
    if not nodes:
        return Markup("<p class='muted'>no plan yet</p>")
    width = PAD * 2 + (max(n.layer for n in nodes) + 1) * (BOX_W + GAP_X) - GAP_X
    height = PAD * 2 + (max(n.row for n in nodes) + 1) * (BOX_H + GAP_Y) - GAP_Y
    by_id = {n.step_id: n for n in nodes}
    parts = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="plan as a graph of steps">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/>'
        "</marker></defs>",
    ]
    for node in nodes:
        for dep in node.depends_on:
            src = by_id[dep]
            x1, y1 = src.x + BOX_W, src.y + BOX_H // 2
            x2, y2 = node.x, node.y + BOX_H // 2
            mid = (x1 + x2) // 2
            parts.append(
                f'<path class="edge" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}" '
                'marker-end="url(#arrow)"/>'
            )
    for node in nodes:
        state = states.get(node.step_id, "pending")
        parts.append(
            f'<g class="step state-{escape(state)}" data-step="{escape(node.step_id)}" '
            f'transform="translate({node.x},{node.y})">'
            f"<title>{escape(node.step_id)} ({escape(node.tool)})</title>"
            f'<rect width="{BOX_W}" height="{BOX_H}" rx="7"/>'
            f'<text x="10" y="19" class="step-id">{escape(_label(node.step_id))}</text>'
            f'<text x="10" y="36" class="step-tool">{escape(_label(node.tool))} · '
            f'<tspan class="state-name">{escape(state)}</tspan></text>'
            "</g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


__all__ = ["Node", "layout", "render_svg"]
