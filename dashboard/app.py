"""The dashboard's app: ``create_dashboard(plan)``. Every request passes the guard (HTTP
Basic auth); every answer carries a strict Content-Security-Policy. The page is a shell that
its own script fills from ``GET /api/overview`` every 2 seconds, without reloading."""

from __future__ import annotations

import base64
import binascii
import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from quart import Quart, Response, request
from redis.exceptions import RedisError

from dashboard.guard import REALM, Guard
from pipeline.connections import REDIS_UNAVAILABLE, web_client
from pipeline.dead import DeadLetter, DeadLetters
from pipeline.keys import Keys
from pipeline.plan import Plan
from pipeline.queue import HISTORY_BUCKET
from pipeline.retries import DelayedRetries, DelayedRetry
from pipeline.stats import HistoryCache, PipelineStats, read_stats

logger = logging.getLogger(__name__)

#: Entries per page of dead letters and of retries, and the most one request may ask for.
PAGE_SIZE = 25
MAX_PAGE = 200
#: The largest body an action may send (one entry's ref).
MAX_BODY = 4 * 1024 * 1024
#: The header every action carries the page's token in.
TOKEN_HEADER = "X-CSRF-Token"
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
<title>{title} · Signup pipeline</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-view="{view}" data-refresh-ms="{refresh}" data-page-size="{page_size}">
<header>
<h1>Signup pipeline</h1>
<nav>{nav}</nav>
<p id="status" role="status">connecting…</p>
<p id="notice" role="status" aria-live="polite"></p>
{banner}
</header>
<main>
{main}
</main>
<dialog id="confirm">
<form method="dialog">
<p id="confirm-text"></p>
<menu><button value="cancel" id="confirm-cancel">Cancel</button>
<button value="ok" id="confirm-ok" class="danger">Confirm</button></menu>
</form>
</dialog>
</body>
</html>
"""
#: The pages: path, view name, title.
_VIEWS = (("/", "overview", "Overview"), ("/dead", "dead", "Dead letters"),
          ("/retries", "retries", "Retries"))  # fmt: skip
_CURRENT = ' aria-current="page"'
_OVERVIEW = """<section aria-labelledby="chart-title">
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
<thead><tr><th>queue</th><th>waiting</th><th>held</th><th>retrying</th><th>dead</th>
<th>oldest waiting</th><th>wait p50 / p99</th><th>run p50 / p99</th></tr></thead>
<tbody></tbody>
</table>
<p>Dead letters: <a href="/dead"><strong id="dead-letters">-</strong></a></p>
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
</section>"""


def _pager(newer: str, older: str, shown: str) -> str:
    """The pager under a paged table: its two buttons, and which entries are shown between."""
    return (
        f'<p class="pager"><button type="button" id="newer">{newer}</button>\n'
        f'<span id="{shown}">-</span>\n<button type="button" id="older">{older}</button></p>'
    )


_DEAD = """<section aria-labelledby="dead-title">
<h2 id="dead-title">Dead letters, newest first</h2>
<p class="actions"><span id="dead-total">-</span> in all ·
<button type="button" id="requeue-all">Requeue all</button>
<button type="button" id="purge" class="danger">Purge</button></p>
<table id="dead">
<thead><tr><th>failed</th><th>queue</th><th>type</th><th>job id</th><th>tries</th>
<th>reason</th><th>error</th><th>job</th><th></th></tr></thead>
<tbody></tbody>
</table>
{pager}
</section>"""
_RETRIES = """<section aria-labelledby="retries-title">
<h2 id="retries-title">Retries waiting, soonest first</h2>
<p class="actions"><label>queue <select id="retry-queue">{options}</select></label> ·
<span id="retries-total">-</span> waiting</p>
<table id="retries">
<thead><tr><th>due</th><th>type</th><th>job id</th><th>attempt</th><th>job</th><th></th></tr>
</thead>
<tbody></tbody>
</table>
{pager}
</section>"""

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
                "dead": stats.dead_by_queue.get(name, 0),
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
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    state: dict[str, _Backend] = {}
    history = HistoryCache()  # the closed buckets of the chart, read once
    keys = Keys(settings.key_prefix)

    def backend() -> _Backend:
        return state["backend"]

    @app.before_serving
    async def open_redis() -> None:
        redis = web_client(settings)
        state["backend"] = _Backend(
            redis, DeadLetters(redis, keys, registry), DelayedRetries(redis, keys)
        )

    @app.after_serving
    async def close_redis() -> None:
        if "backend" in state:
            await state.pop("backend").redis.aclose()

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

    @app.before_request
    async def same_origin_only() -> Response | None:
        if request.method in ("GET", "HEAD"):
            return None
        problem = _cross_site(guard)
        if problem is None:
            return None
        return _json({"error": problem.error, "message": problem.message}, problem.status)

    @app.after_request
    async def secure(response: Response) -> Response:
        response.headers.update(_HEADERS)
        return response

    def render(view: str, title: str, main: str) -> Response:
        nav = " ".join(
            f'<a href="{path}"{_CURRENT if name == view else ""}>{label}</a>'
            for path, name, label in _VIEWS
        )
        shown = _PAGE.format(
            token=html.escape(guard.token),
            title=title,
            view=view,
            refresh=REFRESH_MS,
            page_size=PAGE_SIZE,
            nav=nav,
            banner=_OPEN_BANNER if guard.open else "",
            main=main,
        )
        return Response(shown, content_type="text/html; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        return render("overview", "Overview", _OVERVIEW)

    @app.get("/dead")
    async def dead_page() -> Response:
        return render(
            "dead", "Dead letters", _DEAD.format(pager=_pager("Newer", "Older", "dead-range"))
        )

    @app.get("/retries")
    async def retries_page() -> Response:
        options = "".join(
            f'<option value="{html.escape(q)}">{html.escape(q)}</option>' for q in registry.queues
        )
        pager = _pager("Sooner", "Later", "retries-range")
        return render("retries", "Retries", _RETRIES.format(options=options, pager=pager))

    @app.get("/api/overview")
    async def api_overview() -> Response:
        stats = await read_stats(backend().redis, keys, registry, history=history)
        return _json(overview(stats, registry.queues), 200)

    @app.get("/api/dead")
    async def api_dead() -> Response:
        offset, limit = _paging()
        total, entries = await backend().dead.page(offset, limit)
        shown = [_dead_letter(entry, registry.routes) for entry in entries]
        return _json({"total": total, "offset": offset, "limit": limit, "entries": shown}, 200)

    @app.post("/api/dead/requeue")
    async def api_dead_requeue() -> Response:
        body = await _body()
        if body.get("all") is True:
            requeued, skipped = await backend().dead.requeue()
            return _json({"requeued": requeued, "skipped": skipped}, 200)
        outcome = await backend().dead.requeue_entry(DeadLetter.decode(_ref(body)))
        if outcome == "requeued":
            return _json({"requeued": 1, "skipped": 0}, 200)
        if outcome == "gone":
            raise _Refused(409, "gone", _GONE.format("dead letter"))
        why = (
            "its job cannot be decoded" if outcome == "undecodable" else "no queue serves its type"
        )
        raise _Refused(422, outcome, f"that dead letter cannot be requeued: {why}")

    @app.post("/api/dead/delete")
    async def api_dead_delete() -> Response:
        entry = DeadLetter.decode(_ref(await _body()))
        if not await backend().dead.delete_entry(entry):
            raise _Refused(409, "gone", _GONE.format("dead letter"))
        return _json({"deleted": 1}, 200)

    @app.post("/api/dead/purge")
    async def api_dead_purge() -> Response:
        await _body()
        return _json({"purged": await backend().dead.purge()}, 200)

    @app.get("/api/retries")
    async def api_retries() -> Response:
        queue = _queue(request.args.get("queue"))
        offset, limit = _paging()
        total, retries = await backend().retries.page(queue, offset, limit)
        shown = [_retry(retry) for retry in retries]
        body = {"queue": queue, "total": total, "offset": offset, "limit": limit, "entries": shown}
        return _json(body, 200)

    @app.post("/api/retries/run")
    async def api_retries_run() -> Response:
        body = await _body()
        if not await backend().retries.run_now(_queue(body.get("queue")), _ref(body)):
            raise _Refused(409, "gone", _GONE.format("retry"))
        return _json({"run": 1}, 200)

    @app.post("/api/retries/delete")
    async def api_retries_delete() -> Response:
        body = await _body()
        if not await backend().retries.delete(_queue(body.get("queue")), _ref(body)):
            raise _Refused(409, "gone", _GONE.format("retry"))
        return _json({"deleted": 1}, 200)

    @app.errorhandler(_Refused)
    async def refused(error: _Refused) -> Response:
        return _json({"error": error.error, "message": error.message}, error.status)

    @app.errorhandler(RedisError)
    async def redis_failed(error: RedisError) -> Response:
        if isinstance(error, REDIS_UNAVAILABLE):
            logger.warning("the dashboard cannot reach Redis: %s", error)
            return _json({"error": "unavailable", "message": "Redis cannot be reached"}, 503)
        logger.error("Redis refused the dashboard's command", exc_info=error)
        message = "Redis refused the command (the dashboard's log says why)"
        return _json({"error": "redis_error", "message": message}, 500)

    def _queue(name: object) -> str:
        if not isinstance(name, str) or name not in registry.queues:
            known = ", ".join(registry.queues)
            raise _Refused(400, "invalid_queue", f"queue must be one of: {known}")
        return name

    return app


_GONE = "that {} is no longer there: it was acted on meanwhile (reload to see)"


class _Refused(Exception):
    """A request the dashboard answers with a 4xx: its status, error code and message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass(frozen=True, slots=True)
class _Backend:
    """The dashboard's Redis client and what it reads and acts on with it."""

    redis: aioredis.Redis
    dead: DeadLetters
    retries: DelayedRetries


def _cross_site(guard: Guard) -> _Refused | None:
    """Why this action must be refused, or None. A browser names where a request comes from
    (Sec-Fetch-Site, Origin): anything but this origin is refused. The token, which only this
    origin's page can read, is needed whatever the client."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return _Refused(
            403, "cross_site", f"an action must come from the dashboard's own page, not {site}"
        )
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("Host"):
        return _Refused(403, "cross_site", "an action must come from the dashboard's own origin")
    if not guard.token_matches(request.headers.get(TOKEN_HEADER)):
        return _Refused(
            403, "bad_token", f"the {TOKEN_HEADER} header is missing or wrong: reload the page"
        )
    if request.mimetype != "application/json":
        return _Refused(415, "unsupported_media_type", "an action's body must be application/json")
    return None


async def _body() -> dict[str, Any]:
    body = await request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_json", "the body must be a JSON object")
    return body


def _ref(body: dict[str, Any]) -> bytes:
    """The entry ``body["ref"]`` names: its bytes as stored, base64url-encoded."""
    ref = body.get("ref")
    if not isinstance(ref, str) or not ref:
        raise _Refused(400, "invalid_ref", "ref must name an entry, as the listing gave it")
    try:
        return base64.b64decode(ref + "=" * (-len(ref) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise _Refused(400, "invalid_ref", "ref is not base64url") from None


def _as_ref(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _paging() -> tuple[int, int]:
    """The ``offset`` and ``limit`` query parameters: whole numbers, limit up to MAX_PAGE."""
    found = []
    for name, default, low, high in (("offset", 0, 0, None), ("limit", PAGE_SIZE, 1, MAX_PAGE)):
        text = request.args.get(name, str(default))
        value = int(text) if text.isdigit() and len(text) < 10 else -1
        if value < low or (high is not None and value > high):
            top = f" up to {high}" if high else ""
            raise _Refused(400, f"invalid_{name}", f"{name} must be a whole number from {low}{top}")
        found.append(value)
    return found[0], found[1]


def _dead_letter(entry: DeadLetter, routes: Mapping[str, str]) -> dict[str, Any]:
    job = entry.job
    return {
        "ref": _as_ref(entry.raw),
        "queue": entry.queue,
        "reason": entry.reason,
        "failed_at": entry.failed_at,
        "id": entry.job_id,
        "type": job.type if job else entry.type,
        "attempts": entry.attempts,
        "deliveries": entry.deliveries,
        "error": entry.error,
        "job": entry.job_text,
        "requeueable": job is not None and job.type in routes,
    }


def _retry(retry: DelayedRetry) -> dict[str, Any]:
    job = retry.job
    return {
        "ref": _as_ref(retry.raw),
        "due_at": retry.due_at,
        "type": job.type if job else None,
        "id": job.id if job else None,
        "attempt": job.attempt + 1 if job else None,  # the one it waits for, counting from 1
        "job": retry.text,
    }


def _json(body: Any, status: int) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")
