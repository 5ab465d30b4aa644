"""The W3C trace context a streamed call carries: written and read directly on the common
path, and read exactly as OpenTelemetry's propagator reads it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cuga.shared.telemetry import _parent_context, setup_telemetry


def _parent(context: object) -> trace.SpanContext:
    return trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]


def test_the_sender_writes_what_the_receiver_reads_as_its_parent() -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry("t", span_processors=[SimpleSpanProcessor(spans)], env={})
    calls = telemetry.streamed_calls("/p.S/M", server=False)
    with telemetry.tracer.start_as_current_span("attempt"):
        span, carrier = calls.start_client()
    assert set(carrier) == {"traceparent"}
    parent, sent = _parent(_parent_context(carrier)), span.get_span_context()
    assert (parent.trace_id, parent.span_id, parent.trace_flags) == (
        sent.trace_id,
        sent.span_id,
        sent.trace_flags,
    )
    assert parent.is_remote
    assert parent == _parent(extract(carrier))  # as OpenTelemetry reads it


@given(
    trace_id=st.integers(0, 2**128 - 1),
    span_id=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 255),
    state=st.sampled_from(["", "a=1", "vendor=x,other=y"]),
)
def test_any_traceparent_reads_as_the_propagator_reads_it(
    trace_id: int, span_id: int, flags: int, state: str
) -> None:
    carrier = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"}
    if state:
        carrier["tracestate"] = state
    assert _parent(_parent_context(carrier)) == _parent(extract(carrier))


@pytest.mark.parametrize(
    "header",
    [
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",  # too short
        "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # wrong separator
        "",
    ],
)
def test_a_traceparent_the_propagator_refuses_names_no_parent(header: str) -> None:
    carrier = {"traceparent": header}
    assert _parent(_parent_context(carrier)) == _parent(extract(carrier))
    assert not _parent(_parent_context(carrier)).is_valid


def test_a_carrier_with_baggage_goes_through_the_propagator() -> None:
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "cuga.run_id=r1",
    }
    context = _parent_context(carrier)
    assert baggage.get_baggage("cuga.run_id", context) == "r1"
    assert _parent(context) == _parent(extract(carrier))
    assert _parent_context({}) is None
