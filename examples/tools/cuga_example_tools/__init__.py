"""Example tools shipped as their own package (filled in by the tools issue)."""

TOOLS: list[object] = []
