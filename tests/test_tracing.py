"""Tracing across the real processes: ``hypercorn service:app`` and ``python -m consumers``
exporting over OTLP/HTTP to a real receiver here, which decodes what they send with
opentelemetry-proto. One signup is one trace: the web's server span (under the client's
``traceparent``), the commit, the jobs queued as events, each job's consumer span under the
signup, the SMTP send under the welcome email's; a retry links to its first attempt; log lines
carry the ids. And off, nothing of it.

``TRACE_PICTURE=docs/trace.svg pytest tests/test_tracing.py -k one_trace`` draws the trace
the docs show, from the test's data."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from pipeline import tracing
from pipeline.jobs import decode
from pipeline.keys import Keys
from tests.helpers import SmtpSink, eventually
from tests.otlp import Receiver, Span, otlp_receiver
from tests.processes import child_env, consumer_argv, request, web

KEYS = Keys("signup")
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
#: Spans go out a tenth of a second after they end (the SDK's OTEL_BSP_SCHEDULE_DELAY).
EXPORT_SOON = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as found:
        yield found


SERVER, CLIENT, CONSUMER = 2, 3, 5  # the protocol's SpanKind numbers
ERROR = 2  # its StatusCode.ERROR
JOB_TYPES = {"welcome_email", "marketing_signup", "generate_profile"}


async def test_one_signup_is_one_trace_across_both_processes(
    redis_server: Any, spawn: Any, smtp_server: SmtpSink, receiver: Receiver
) -> None:
    env = child_env(
        redis_server,
        SMTP_URL=smtp_server.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        LOG_LEVEL="DEBUG",
        **EXPORT_SOON,
    )
    async with web(spawn, env) as (port, web_process):
        consumer = spawn(consumer_argv(), env)
        # Already fetching when the signup comes (the picture shows a running consumer).
        await eventually(lambda: "consuming" in consumer.output(), what="the consumer")
        body = {"username": "traced", "email": "traced@example.com"}
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        status, _, created = await request(port, "POST", "/signup", body, headers)
        assert status == 201, created
        # A malformed traceparent from a client is ignored: a trace of its own, no error.
        other = {"username": "untraced", "email": "untraced@example.com"}
        status, _, _ = await request(port, "POST", "/signup", other, {"traceparent": "00-zz"})
        assert status == 201

        def complete() -> bool:
            jobs = receiver.named("process welcome_email", CLIENT_TRACE)
            return (
                len(receiver.named("smtp send", CLIENT_TRACE)) == 1
                and {s.attributes["job.type"] for s in receiver.trace(CLIENT_TRACE)
                     if s.kind == CONSUMER} == JOB_TYPES
                and len(jobs) == 1
            )  # fmt: skip

        await eventually(complete, timeout=20, what="the signup's whole trace")
        assert await consumer.stop() == 0
        spans = receiver.trace(CLIENT_TRACE)
        by_name = {s.name: s for s in spans}

        # The web's server span, under the client's span, with the jobs queued as events.
        server = by_name["POST /signup"]
        assert (server.service, server.kind, server.parent_id) == (
            "signup-web",
            SERVER,
            CLIENT_SPAN,
        )
        assert server.attributes["http.route"] == "/signup"
        assert server.attributes["http.response.status_code"] == 201
        queued = [attrs for name, attrs in server.events if name == "job queued"]
        assert {attrs["job.type"] for attrs in queued} == JOB_TYPES
        # The commit, a child of it.
        commit = by_name["signup commit"]
        assert (commit.kind, commit.parent_id, commit.service) == (
            CLIENT,
            server.span_id,
            "signup-web",
        )
        # The three jobs, each a consumer span under the signup, with its attempt, queue,
        # id and outcome.
        jobs = [s for s in spans if s.kind == CONSUMER]
        assert len(jobs) == 3
        signup_request_ids = re.findall(
            r"\[req=(\S+) trace=\S+ span=\S+\] \S+ \"POST /signup", web_process.output()
        )
        for job in jobs:
            assert job.service == "signup-consumers"
            assert job.parent_id == server.span_id, job.name
            assert job.attributes["job.attempt"] == 1
            assert job.attributes["job.outcome"] == "succeeded"
            assert job.attributes["job.request_id"] in signup_request_ids
            queued_as = next(
                a for a in queued if a["job.id"] == job.attributes["messaging.message.id"]
            )
            assert (
                job.attributes["messaging.destination.name"]
                == queued_as["messaging.destination.name"]
            )
            assert job.name == f"process {job.attributes['job.type']}"
        # The SMTP send, under the welcome email's span.
        email = by_name["process welcome_email"]
        smtp = by_name["smtp send"]
        assert (smtp.kind, smtp.parent_id, smtp.attributes["server.port"]) == (
            CLIENT, email.span_id, smtp_server.port,
        )  # fmt: skip
        # The malformed traceparent's signup: a trace of its own, with no parent.
        others = [s for s in receiver.named("POST /signup") if s.trace_id != CLIENT_TRACE]
        assert len(others) == 1 and others[0].parent_id == ""

        # Log lines written inside a span carry its trace and span ids, next to the request id.
        assert f"trace={CLIENT_TRACE} span={server.span_id}]" in web_process.output()
        assert re.search(
            rf"\[req=\S+ trace={CLIENT_TRACE} span={email.span_id}\] .*welcome", consumer.output()
        ), consumer.output()
        if os.environ.get("TRACE_PICTURE"):
            draw(spans, Path(os.environ["TRACE_PICTURE"]))


async def test_a_retry_is_a_new_span_linked_to_its_first_attempt(
    redis_server: Any, spawn: Any, smtp_server: SmtpSink, receiver: Receiver
) -> None:
    """The SMTP server refuses the first try: that attempt's span records the error, and the
    retry is a new span in the same trace, linked to it. JSON log lines carry the ids."""
    smtp_server.reject = "451 4.3.0 try again later"
    env = child_env(
        redis_server,
        SMTP_URL=smtp_server.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        RETRY_BASE_DELAY="0.5",
        LOG_FORMAT="json",
        **EXPORT_SOON,
    )
    async with web(spawn, env) as (port, _):
        consumer = spawn(consumer_argv("--queues", "email"), env)
        body = {"username": "retried", "email": "retried@example.com"}
        status, _, _ = await request(port, "POST", "/signup", body)
        assert status == 201

        await eventually(
            lambda: receiver.named("process welcome_email"), timeout=20, what="the first attempt"
        )
        smtp_server.reject = None
        await eventually(
            lambda: len(receiver.named("process welcome_email")) == 2,
            timeout=20,
            what="the retry",
        )
        assert await consumer.stop() == 0
    first, retry = sorted(receiver.named("process welcome_email"), key=lambda s: s.start)
    signup = receiver.named("POST /signup")[0]
    assert first.trace_id == retry.trace_id == signup.trace_id
    assert first.parent_id == retry.parent_id == signup.span_id
    assert (first.attributes["job.attempt"], retry.attributes["job.attempt"]) == (1, 2)
    assert (first.attributes["job.outcome"], retry.attributes["job.outcome"]) == (
        "retried", "succeeded",
    )  # fmt: skip
    # The failure: an ERROR status saying why, and the exception recorded on both the SMTP
    # span and the job's.
    assert first.status == ERROR and "451" in first.status_message
    assert any(name == "exception" for name, _ in first.events)
    smtp = [s for s in receiver.named("smtp send") if s.parent_id == first.span_id]
    assert smtp and smtp[0].status == ERROR
    assert retry.status != ERROR
    assert retry.links == [(first.trace_id, first.span_id)]
    # The JSON line of the failed attempt carries the ids of its span.
    lines = [orjson.loads(line) for line in consumer.output().splitlines() if line.startswith("{")]
    failed = [line for line in lines if "failed attempt 1" in line["message"]]
    assert failed and failed[0]["trace_id"] == first.trace_id
    assert failed[0]["span_id"] == first.span_id


async def test_a_job_without_trace_context_still_runs_in_a_span_of_its_own(
    redis_server: Any, spawn: Any, receiver: Receiver
) -> None:
    """Jobs queued before tracing was turned on (or by older code) carry no traceparent, or
    one that is not valid: they run, each a root span."""
    env = child_env(redis_server, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **EXPORT_SOON)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for n, extra in enumerate([{}, {"traceparent": "01-nonsense", "first_attempt": 7}]):
            job = {
                "v": 1, "id": f"{n:032x}", "type": "marketing_signup", "attempt": 0,
                "enqueued_at": 1.0, "payload": {"user_id": f"{n:032x}", "email": f"m{n}@x.org"},
                **extra,
            }  # fmt: skip
            await client.lpush(KEYS.queue("marketing"), orjson.dumps(job))
    finally:
        await client.aclose()
    ours = {f"{n:032x}" for n in range(2)}  # (other tests' jobs may wait on that queue too)

    def spans() -> list[Span]:
        found = receiver.named("process marketing_signup")
        return [s for s in found if s.attributes["messaging.message.id"] in ours]

    consumer = spawn(consumer_argv("--queues", "marketing"), env)
    await eventually(lambda: len(spans()) == 2, timeout=20, what="both jobs")
    assert await consumer.stop() == 0
    for span in spans():
        assert span.parent_id == "" and span.links == []
        assert span.attributes["job.outcome"] == "succeeded"


async def test_off_without_an_endpoint(redis_server: Any, spawn: Any) -> None:
    """No OTEL_EXPORTER_OTLP_ENDPOINT: nothing of tracing. No trace context in the envelopes
    (a client's traceparent is not even read), no ids in the log lines; and in-process, no
    tracer (OTEL_SDK_DISABLED turns it off even with an endpoint)."""
    env = child_env(redis_server)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    async with web(spawn, env) as (port, web_process):
        body = {"username": "dark", "email": "dark@example.com"}
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        status, _, _ = await request(port, "POST", "/signup", body, headers)
        assert status == 201
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        raw = await client.lrange(KEYS.queue("email"), 0, -1)
    finally:
        await client.aclose()
    envelopes = [orjson.loads(r) for r in raw]
    assert envelopes and all("traceparent" not in e for e in envelopes)
    assert any(decode(r).payload.get("username") == "dark" for r in raw)
    assert "trace=" not in web_process.output()
    assert tracing.tracer is None
    assert not tracing.configure("test", {})
    assert not tracing.configure(
        "test", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing.tracer is None and tracing.current_traceparent() is None


# --- the picture ----------------------------------------------------------------------------

_COLOURS = {"signup-web": "#3b6fb6", "signup-consumers": "#2e8b57"}


def draw(spans: list[Span], path: Path) -> None:
    """A waterfall of one trace as SVG: a row per span, indented under its parent, its bar
    placed on the trace's time axis."""
    by_id = {s.span_id: s for s in spans}

    def depth(span: Span) -> int:
        return 0 if span.parent_id not in by_id else 1 + depth(by_id[span.parent_id])

    ordered: list[Span] = []

    def visit(parent: str) -> None:
        for child in sorted((s for s in spans if s.parent_id == parent), key=lambda s: s.start):
            ordered.append(child)
            visit(child.span_id)

    for root in sorted((s for s in spans if s.parent_id not in by_id), key=lambda s: s.start):
        ordered.append(root)
        visit(root.span_id)
    start, end = min(s.start for s in spans), max(s.end for s in spans)
    width, label, row = 960, 330, 26
    scale = (width - label - 20) / max(1, end - start)
    height = 50 + row * len(ordered)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-weight="bold">One signup, one trace '
        f"({(end - start) / 1e6:.1f} ms): the web (blue) and the consumers (green)</text>",
    ]
    for n, span in enumerate(ordered):
        y = 36 + n * row
        x = label + (span.start - start) * scale
        bar = max(2.0, (span.end - span.start) * scale)
        colour = _COLOURS.get(span.service, "#888888")
        name = html.escape(span.name)
        out.append(f'<text x="{10 + 14 * depth(span)}" y="{y + 15}">{name}</text>')
        out.append(
            f'<rect x="{x:.1f}" y="{y + 3}" width="{bar:.1f}" height="16" fill="{colour}" rx="2"/>'
        )
        out.append(
            f'<text x="{min(x + bar + 4, width - 60):.1f}" y="{y + 15}" fill="#444">'
            f"{(span.end - span.start) / 1e6:.2f} ms</text>"
        )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
