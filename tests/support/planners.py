"""Planners for the tests of the ``cuga.planners`` entry-point group (an allowlisted
namespace of the test suite)."""

from __future__ import annotations

from cuga.services.planning.planners import PlanningRequest, Proposal


class ForecastThenEcho:
    """Plans ``weather.forecast`` then ``echo`` of its result, whatever the goal."""

    name = "forecast-then-echo"

    def plan(self, request: PlanningRequest) -> Proposal:
        return Proposal(
            [
                {"id": "f", "tool": "weather.forecast", "input": {"city": "Oslo"}},
                {
                    "id": "e",
                    "tool": "echo",
                    "input": {"text": "{{steps.f.output.summary}}"},
                    "depends_on": ["f"],
                },
            ],
            notes=[f"planned for {request.goal!r} with {len(request.tools)} tools"],
        )
