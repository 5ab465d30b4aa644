"""The standard OpenTelemetry sampler variables (issue 27): ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` choose which traces a service records; parent-based
always-on (every span) when unset; a bad value refuses to start, naming the variable."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cuga.shared.telemetry import TRACE_SAMPLERS, Telemetry, sampler_from_env, setup_telemetry

METHOD = "/cuga.worker.v1.WorkerService/ExecuteSteps"


def _service(env: Mapping[str, str]) -> tuple[Telemetry, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    return setup_telemetry("t", span_processors=[SimpleSpanProcessor(spans)], env=env), spans


def _remote_parent(sampled: bool) -> otel_context.Context:
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    parent = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def test_unset_records_every_root_and_follows_the_parent() -> None:
    telemetry, spans = _service({})
    telemetry.tracer.start_span("root").end()
    telemetry.tracer.start_span("under a sampled caller", context=_remote_parent(True)).end()
    telemetry.tracer.start_span("under an unsampled one", context=_remote_parent(False)).end()
    assert [s.name for s in spans.get_finished_spans()] == ["root", "under a sampled caller"]
    assert sampler_from_env({}).get_description().startswith("ParentBased{root:AlwaysOnSampler")


def test_the_given_environment_is_read_not_the_process_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    telemetry, spans = _service({})
    telemetry.tracer.start_span("root").end()
    assert len(spans.get_finished_spans()) == 1


def test_always_off_records_nothing_but_still_propagates_a_context() -> None:
    telemetry, spans = _service({"OTEL_TRACES_SAMPLER": "always_off"})
    calls = telemetry.streamed_calls(METHOD, server=False)
    with telemetry.tracer.start_as_current_span("attempt"):
        span, carrier = calls.start_client()
        span.end()
    assert spans.get_finished_spans() == ()
    # The unsampled decision travels, so a parent-based receiver drops its span too.
    assert not int(carrier["traceparent"][-2:], 16) & int(trace.TraceFlags.SAMPLED)
    receiver, received = _service({})
    server, token = receiver.streamed_calls(METHOD, server=True).start_server(carrier)
    otel_context.detach(token)
    server.end()
    assert received.get_finished_spans() == ()


def test_a_ratio_sampler_takes_its_argument() -> None:
    none, spans = _service(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    )
    for _ in range(20):
        none.tracer.start_span("root").end()
    none.tracer.start_span("under a sampled caller", context=_remote_parent(True)).end()
    assert [s.name for s in spans.get_finished_spans()] == ["under a sampled caller"]
    every, all_spans = _service(
        {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": " 1 "}
    )
    for _ in range(5):
        every.tracer.start_span("root").end()
    assert len(all_spans.get_finished_spans()) == 5
    # No argument: the specification's default ratio, 1.
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio"}).rate == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(TRACE_SAMPLERS))
def test_every_specified_sampler_is_accepted(name: str) -> None:
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.5"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: unknown sampler 'sometimes'"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "OTEL_TRACES_SAMPLER_ARG: traceidratio needs a ratio between 0 and 1, got 'half'",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_a_bad_setting_refuses_to_start_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named) as refused:
        setup_telemetry("t", env=env)
    if "unknown" in named:
        assert "parentbased_always_on" in str(refused.value)  # lists the valid ones
