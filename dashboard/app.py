"""The dashboard's app: ``create_dashboard(plan)``. Every request passes the guard (HTTP
Basic auth); every answer carries a strict Content-Security-Policy. The page is a shell that
its own script fills from ``GET /api/overview`` every 2 seconds, without reloading."""

from __future__ import annotations

import html
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from quart import Quart, Response, request
from redis.exceptions import RedisError

from dashboard.guard import REALM, Guard
from pipeline.connections import web_client
from pipeline.keys import Keys
from pipeline.plan import Plan
from pipeline.queue import HISTORY_BUCKET
from pipeline.stats import PipelineStats, read_stats

logger = logging.getLogger(__name__)

#: How often the page refreshes itself, in milliseconds (the page reads it from its markup).
REFRESH_MS = 2000
#: Everything from this origin only; no inline script or style, no framing, no plugins.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{token}">
<title>Signup pipeline</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-refresh-ms="{refresh}">
<header>
<h1>Signup pipeline</h1>
<p id="status" role="status">connecting…</p>
{banner}
</header>
<main>
<section aria-labelledby="chart-title">
<h2 id="chart-title">Jobs per second, last 15 minutes</h2>
<svg id="chart" viewBox="0 0 900 200" role="img" aria-label="jobs done and failed per second">
<polyline id="done-line" class="done" points=""></polyline>
<polyline id="failed-line" class="failed" points=""></polyline>
</svg>
<p class="legend"><span class="done">done</span> <strong id="done-rate">-</strong>/s ·
<span class="failed">failed</span> <strong id="failed-rate">-</strong>/s ·
signups in the last minute: <strong id="signups-minute">-</strong> ·
peak <span id="chart-peak">-</span>/s</p>
</section>
<section aria-labelledby="queues-title">
<h2 id="queues-title">Queues</h2>
<table id="queues">
<thead><tr><th>queue</th><th>waiting</th><th>held</th><th>retrying</th>
<th>oldest waiting</th><th>wait p50 / p99</th><th>run p50 / p99</th></tr></thead>
<tbody></tbody>
</table>
<p>Dead letters: <strong id="dead-letters">-</strong></p>
</section>
<section aria-labelledby="counters-title">
<h2 id="counters-title">Counters</h2>
<dl id="counters"></dl>
</section>
<section aria-labelledby="consumers-title">
<h2 id="consumers-title">Live consumers</h2>
<table id="consumers">
<thead><tr><th>id</th><th>host</th><th>pid</th><th>queues</th><th>delivery</th>
<th>started</th><th>last heartbeat</th><th>in flight</th></tr></thead>
<tbody></tbody>
</table>
</section>
</main>
</body>
</html>
"""
_OPEN_BANNER = (
    '<p class="warning" role="alert">Open: no DASHBOARD_PASSWORD, so anyone who can reach '
    "this loopback address can use it.</p>"
)


def overview(stats: PipelineStats, queues: tuple[str, ...]) -> dict[str, Any]:
    """What the page shows, from one snapshot."""
    return {
        "queues": [
            {
                "name": name,
                "waiting": stats.queues[name],
                "held": stats.processing[name],
                "retrying": stats.delayed[name],
                "oldest_wait_s": stats.oldest_wait.get(name),
                "wait_ms": {
                    "p50": stats.latency[name].wait_ms.p50,
                    "p99": stats.latency[name].wait_ms.p99,
                },
                "run_ms": {
                    "p50": stats.latency[name].run_ms.p50,
                    "p99": stats.latency[name].run_ms.p99,
                },
            }
            for name in queues
        ],
        "dead_letter": stats.dead_letter,
        "counters": dict(stats.counters),
        "consumers": [consumer.to_json() for consumer in stats.consumers],
        "history": {
            "bucket_s": HISTORY_BUCKET,
            "buckets": [
                {
                    "start": bucket.start,
                    "done_per_s": bucket.done / HISTORY_BUCKET,
                    "failed_per_s": bucket.failed / HISTORY_BUCKET,
                    "signups": bucket.signups,
                }
                for bucket in stats.history
            ],
        },
    }


def create_dashboard(plan: Plan) -> Quart:
    """The dashboard of ``plan``'s pipeline: its queues and counters are the registry's."""
    settings, registry = plan.settings, plan.registry
    app = Quart(__name__, static_folder="static", static_url_path="/static")
    guard = app.extensions["dashboard_guard"] = Guard(
        settings.dashboard_user, settings.dashboard_password
    )
    state: dict[str, aioredis.Redis] = {}
    keys = Keys(settings.key_prefix)

    @app.before_serving
    async def open_redis() -> None:
        state["redis"] = web_client(settings)

    @app.after_serving
    async def close_redis() -> None:
        if "redis" in state:
            await state.pop("redis").aclose()

    @app.before_request
    async def authenticate() -> Response | None:
        peer = request.scope.get("client")
        verdict = guard.check(request.headers.get("Authorization"), peer[0] if peer else "-")
        if verdict is None:
            return None
        if verdict.status == 429:
            body = {"error": "rate_limited", "message": "too many failed attempts"}
            answer = _json(body, 429)
            answer.headers["Retry-After"] = str(verdict.retry_after)
            return answer
        answer = _json({"error": "unauthorized", "message": "user and password needed"}, 401)
        answer.headers["WWW-Authenticate"] = REALM
        return answer

    @app.after_request
    async def secure(response: Response) -> Response:
        response.headers.update(_HEADERS)
        return response

    @app.get("/")
    async def page() -> Response:
        shown = _PAGE.format(
            token=html.escape(guard.token),
            refresh=REFRESH_MS,
            banner=_OPEN_BANNER if guard.open else "",
        )
        return Response(shown, content_type="text/html; charset=utf-8")

    @app.get("/api/overview")
    async def api_overview() -> Response:
        try:
            stats = await read_stats(state["redis"], keys, registry, history=True)
        except RedisError as exc:
            logger.warning("the dashboard cannot read Redis: %s", exc)
            return _json({"error": "unavailable", "message": "Redis cannot be read"}, 503)
        return _json(overview(stats, registry.queues), 200)

    return app


def _json(body: Any, status: int) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")
