"""OpenTelemetry tracing: one trace per signup, across the web and the consumers.

Off unless an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and the ``tracing`` extra is installed; everything
else (service name, sampler, headers, batching) follows the standard ``OTEL_*`` variables,
read by the SDK itself. :func:`configure` is called once per process, at start-up.

Off, :data:`tracer` is None and every call site checks that first: no span, no context, no
header parsed, and the SDK is never imported. On, the web opens a server span per request
(honouring the client's W3C ``traceparent``), a span for the signup's commit and an event
per job queued; each job's envelope carries its signup's ``traceparent``, and the consumer
runs the job in a consumer span under it, the retry of a failed job linked to its first
attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

logger = logging.getLogger(__name__)


class TracedJob(Protocol):
    """What a job span reads of a job (``pipeline.jobs.Job``, which imports this module)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def first_attempt(self) -> str | None: ...


#: The tracer, when tracing is on; None when it is off (the default).
tracer: Tracer | None = None
_provider: TracerProvider | None = None

#: A W3C ``traceparent`` of version 00: what an envelope's ``traceparent`` and
#: ``first_attempt`` hold (anything else there is ignored).
TRACEPARENT_RE: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_NO_SPAN: Final = contextlib.nullcontext()


def configure(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for this process if an OTLP endpoint is set, exporting over
    OTLP/HTTP in the background; ``service_name`` unless ``OTEL_SERVICE_NAME`` (or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) names it. True when on."""
    global tracer, _provider
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not any(environ.get(name) for name in _ENDPOINTS):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning(
            "an OTLP endpoint is set but the tracing extra is not installed (%s): tracing "
            "is off; pip install 'signup-pipeline[tracing]'",
            exc,
        )
        return False
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    # The sampler (OTEL_TRACES_SAMPLER), the exporter's endpoint, headers and timeout
    # (OTEL_EXPORTER_OTLP_*) and the batching (OTEL_BSP_*) are the SDK's to read.
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    tracer = _provider.get_tracer("signup-pipeline")
    return True


def shutdown() -> None:
    """Export the spans still batched and stop the exporter (on the way out)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer, _provider = None, None


# --- the trace context, as text -------------------------------------------------------------


def _current() -> SpanContext | None:
    """The current span's context, if tracing is on and there is one (sampled or not)."""
    if tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent`` (for a job's envelope); None when tracing is
    off or there is no span."""
    context = _current()
    if context is None:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def context_of(traceparent: str | None) -> Context | None:
    """The context whose parent is the span ``traceparent`` (a version-00 traceparent, as
    the envelope's decoding checked) names; None for none. Read here rather than by the
    propagator, which costs four times as much for the same answer."""
    if traceparent is None:
        return None
    from opentelemetry import trace

    remote = trace.SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)),
    )
    if not remote.is_valid:  # an all-zero id
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def log_ids() -> tuple[str, str] | None:
    """The current trace and span ids (hex), for a log line; None outside a span."""
    context = _current()
    if context is None:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# --- spans and events -----------------------------------------------------------------------


def span(name: str, attributes: Mapping[str, Any]) -> Any:
    """A context manager: a CLIENT span, a child of the current one, around a call that makes
    no spans of its own (a Redis round trip, an SMTP send); nothing when tracing is off or
    the current span is not sampled."""
    if tracer is None:
        return _NO_SPAN
    return _Child(name, attributes)


class _Child:
    """What :func:`span` returns with tracing on. The span is not made current: nothing runs
    under it, and attaching a context costs as much again as the span."""

    __slots__ = ("_attributes", "_name", "_span")

    def __init__(self, name: str, attributes: Mapping[str, Any]) -> None:
        self._name, self._attributes = name, attributes
        self._span: Span | None = None

    def __enter__(self) -> None:
        from opentelemetry.trace import SpanKind, get_current_span

        assert tracer is not None
        if get_current_span().is_recording():
            self._span = tracer.start_span(
                self._name, kind=SpanKind.CLIENT, attributes=self._attributes
            )

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        from opentelemetry.trace import Status, StatusCode

        child = self._span
        if child is None:
            return
        if isinstance(error, Exception):
            child.record_exception(error)
            child.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        child.end()


def event(name: str, attributes: Mapping[str, Any]) -> None:
    """An event on the current span (a job queued); nothing when tracing is off."""
    if tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes)


def server_span(name: str, headers: list[tuple[bytes, bytes]], attributes: dict[str, Any]) -> Any:
    """Start the server span of one HTTP request, as the current span, under the client's
    trace context (``traceparent``; the propagators ``OTEL_PROPAGATORS`` names). Returns the
    token :func:`end_server_span` takes; tracing must be on."""
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind

    assert tracer is not None
    carrier: dict[str, str] = {}
    for key, value in headers:
        if key in (b"traceparent", b"tracestate", b"baggage"):
            carrier[key.decode("latin-1")] = value.decode("latin-1")
    parent = propagate.extract(carrier) if carrier else None
    started = tracer.start_span(name, parent, kind=SpanKind.SERVER, attributes=attributes)
    return started, context.attach(trace.set_span_in_context(started, parent))


def end_server_span(token: Any, status: int, error: BaseException | None = None) -> None:
    """End a span :func:`server_span` started: its status code, an ERROR status for a 5xx
    (a 4xx is the client's, not the server's), and the exception that escaped, if any."""
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    started, attached = token
    started.set_attribute("http.response.status_code", status)
    if error is not None and isinstance(error, Exception):
        started.record_exception(error)
    if status >= 500:
        started.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
    context.detach(attached)
    started.end()


@contextlib.contextmanager
def job_span(queue: str, job: TracedJob) -> Iterator[Span]:
    """Run one attempt of ``job`` in a CONSUMER span: a child of the signup's span (the
    envelope's ``traceparent``), linked to the job's first attempt if this is a retry.
    Tracing must be on. A cancelled job (a stop) is marked so."""
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode, get_current_span

    assert tracer is not None
    links = []
    if job.first_attempt is not None:
        first = get_current_span(context_of(job.first_attempt)).get_span_context()
        if first.is_valid:
            links.append(Link(first, {"job.attempt": 1}))
    attributes: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": job.id,
        "job.type": job.type,
        "job.attempt": job.attempt + 1,
    }
    if job.request_id is not None:
        attributes["job.request_id"] = job.request_id
    with tracer.start_as_current_span(
        f"process {job.type}",
        context_of(job.traceparent),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    ) as current:
        try:
            yield current
        except asyncio.CancelledError:
            current.set_attribute("job.outcome", "cancelled")
            current.set_status(Status(StatusCode.ERROR, "cancelled (the consumer is stopping)"))
            raise


def job_outcome(current: Span, outcome: str, error: BaseException | None, why: str | None) -> None:
    """Note a job span's outcome (succeeded, retried, dead_lettered, returned), and its
    failure: the exception recorded, and an ERROR status saying ``why``."""
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute("job.outcome", outcome)
    if error is not None and isinstance(error, Exception):
        current.record_exception(error)
    if why is not None:
        current.set_status(Status(StatusCode.ERROR, why))
