"""The dashboard in a real browser (Debian's chromium, driven by Playwright), served by a real
``python -m consumers dashboard``: its numbers and its chart move without a reload while a
real consumer works, markup from Redis is shown as text, nothing is fetched from another
host, and no password means a 401; a dead letter and a retry are acted on from the page, each
asked first, and another site's POST is refused."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as aioredis

from pipeline.dead import DeadLetter
from pipeline.jobs import new_job
from pipeline.keys import Keys
from pipeline.queue import Broker, DirectQueue
from tests.helpers import REGISTRY, RedisServer, SmtpSink, eventually
from tests.processes import child_env, consumer_argv, start_dashboard
from tests.test_docs_browser import CHROMIUM_ARGS, chromium, watch  # noqa: F401  (a fixture)

PASSWORD = "correct horse battery"
#: What a hostile payload looks like: were it markup, the page would run it.
MARKUP = '<img src="x" onerror="window.pwned = 1"><script>window.pwned = 2</script>'


@pytest.mark.timeout(120)
async def test_the_overview_moves_live_and_shows_markup_as_text(
    chromium: str,  # noqa: F811
    spawn: Any,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    env = child_env(redis_server, DASHBOARD_PASSWORD=PASSWORD)
    port, _ = await start_dashboard(spawn, env)
    # A consumer whose heartbeat says something hostile about itself.
    intruder = "intruder-1"
    about = {"host": MARKUP, "pid": 1, "queues": {"email": 1}, "mode": "at-least-once"}
    await redis.set(keys.lease(intruder), orjson.dumps(about), px=60_000)
    await redis.zadd(keys.consumers, {intruder: time.time()})
    origin = f"http://127.0.0.1:{port}"
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # Without the password: a 401, and nothing of the pipeline. (Navigating there,
            # headless chromium gives up on the prompt: ERR_INVALID_AUTH_CREDENTIALS.)
            anonymous = await browser.new_context()
            refused = await anonymous.request.get(origin)
            assert refused.status == 401 and "queues" not in await refused.text()
            await anonymous.close()
            context = await browser.new_context(
                http_credentials={"username": "admin", "password": PASSWORD}
            )
            page = await context.new_page()
            requested, problems = watch(page)
            await page.goto(origin)
            email = page.locator("#queues tbody tr", has_text="email").locator("td").nth(1)
            await email.wait_for(timeout=10_000)
            assert await email.text_content() == "0"
            loaded = len([u for u in requested if u.endswith("/api/overview")])
            # Jobs arrive: the page shows them at its next refresh, without a reload.
            queue = DirectQueue(redis, keys, REGISTRY)
            for n in range(7):
                payload = {"user_id": "0" * 32, "username": f"user{n}", "email": f"{n}@x.org"}
                await queue.push("welcome_email", payload)
            await (
                page.locator("#queues tbody tr", has_text="email")
                .locator("td", has_text="7")
                .first.wait_for(timeout=10_000)
            )
            assert len([u for u in requested if u.endswith("/api/overview")]) > loaded
            assert sum(1 for u in requested if urlsplit(u).path == "/") == 1  # never reloaded
            # A consumer starts: the jobs are done, and the chart's line rises from its floor
            # (the history the consumer writes every second).
            spawn(consumer_argv(), env)
            await (
                page.locator("#queues tbody tr", has_text="email")
                .locator("td", has_text="0")
                .first.wait_for(timeout=20_000)
            )
            line = page.locator("#done-line")

            async def risen() -> bool:
                points = (await line.get_attribute("points") or "").split()
                return any(float(point.split(",")[1]) < 190 for point in points)

            # (Polled from here: the page's policy refuses the eval a wait_for_function needs.)
            await eventually(risen, timeout=20, what="the chart's done line to rise")
            # The hostile host is shown as its text, and ran nothing.
            host = page.locator("#consumers tbody tr", has_text=intruder).locator("td").nth(1)
            assert await host.text_content() == MARKUP
            assert await page.evaluate("window.pwned === undefined")
            assert await page.locator("#consumers img").count() == 0
            await page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            if os.environ.get("DASHBOARD_SCREENSHOTS"):
                await page.screenshot(
                    path=str(Path(os.environ["DASHBOARD_SCREENSHOTS"]) / "dashboard-overview.png"),
                    full_page=True,
                )
        finally:
            await browser.close()
    hosts = {urlsplit(url).netloc for url in requested if not url.startswith("data:")}
    assert hosts == {f"127.0.0.1:{port}"}, requested
    assert not problems, problems  # no script error, nothing the page's policy blocked


@pytest.mark.timeout(120)
async def test_dead_letters_and_retries_are_acted_on_from_the_page(
    chromium: str,  # noqa: F811
    spawn: Any,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    keys: Keys,
    smtp_server: SmtpSink,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    env = child_env(redis_server, DASHBOARD_PASSWORD=PASSWORD, SMTP_URL=smtp_server.url)
    port, _ = await start_dashboard(spawn, env)
    broker = Broker(redis, keys, queues=REGISTRY.queues, mode="at-most-once")
    # Two dead letters: one whose job and error are hostile markup, one to purge.
    hostile = new_job("welcome_email", {"user_id": "u1", "username": MARKUP, "email": "a@x.org"})
    other = new_job("welcome_email", {"user_id": "u2", "username": "bob", "email": "b@x.org"})
    for job, error in ((other, "SMTPRecipientsRefused"), (hostile, MARKUP)):
        failed = dataclasses.replace(job, attempt=2)
        entry = DeadLetter.for_job("email", failed.encode(), "failed 3 attempts", job=failed,
                                   error=error)  # fmt: skip
        assert await broker.dead_letter("email", failed.encode(), entry.encode(), job.id)
    # And a retry due in an hour.
    later = new_job("welcome_email", {"user_id": "u3", "username": "cy", "email": "c@x.org"})
    assert await broker.retry("email", later.encode(), dataclasses.replace(later, attempt=1), 3600)
    origin = f"http://127.0.0.1:{port}"
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                http_credentials={"username": "admin", "password": PASSWORD},
                viewport={"width": 1280, "height": 720},
            )
            page = await context.new_page()
            requested, problems = watch(page)
            await page.goto(f"{origin}/dead")
            rows = page.locator("#dead tbody tr")
            await rows.nth(1).wait_for(timeout=10_000)
            assert await rows.count() == 2
            # The hostile one (the newest, first) is shown as its text, and ran nothing.
            first = rows.first
            assert await first.locator("td.error").text_content() == MARKUP
            await first.locator("summary").click()
            shown = orjson.loads(await first.locator("pre").text_content() or "")
            assert shown["payload"]["username"] == MARKUP
            assert await page.locator("#dead img, #dead script").count() == 0
            assert await page.evaluate("window.pwned === undefined")
            await page.screenshot(path=str(tmp_path / "dead.png"), full_page=True)
            if os.environ.get("DASHBOARD_SCREENSHOTS"):
                await page.screenshot(
                    path=str(Path(os.environ["DASHBOARD_SCREENSHOTS"]) / "dashboard-dead.png"),
                    full_page=True,
                )

            # Requeue it from the page (asked first), and a consumer runs it.
            dialog = page.locator("#confirm")
            await first.get_by_role("button", name="Requeue").click()
            await dialog.wait_for(state="visible")
            assert "Requeue job" in (await dialog.text_content() or "")
            await page.locator("#confirm-ok").click()
            await page.locator("#notice", has_text=f"requeued job {hostile.id}").wait_for()
            await page.locator("#dead tbody tr").nth(1).wait_for(state="detached")
            spawn(consumer_argv(), env)
            await eventually(
                lambda: smtp_server.recipients() == ["a@x.org"], what="the requeued job's email"
            )

            # A purge asks first: cancelled, nothing goes; confirmed, all go.
            await page.locator("#purge").click()
            await dialog.wait_for(state="visible")
            assert "Delete all 1 dead letters" in (await dialog.text_content() or "")
            await page.locator("#confirm-cancel").click()
            await dialog.wait_for(state="hidden")
            assert await redis.llen(keys.dead) == 1
            await page.locator("#purge").click()
            await page.locator("#confirm-ok").click()
            await page.locator("#notice", has_text="purged 1 dead letters").wait_for()
            assert await redis.llen(keys.dead) == 0
            await page.locator("#dead-total", has_text="0").wait_for()

            # A retry due in an hour, run now from the Retries page.
            await page.goto(f"{origin}/retries")
            retry = page.locator("#retries tbody tr", has_text=later.id[:12])
            await retry.wait_for(timeout=10_000)
            due = await retry.locator("td").first.text_content() or ""
            assert re.search(r"\(in (59\.\d|60\.0) min\)$", due), due
            await retry.get_by_role("button", name="Run now").click()
            await page.locator("#confirm-ok").click()
            await page.locator("#notice", has_text=f"job {later.id} is next in line").wait_for()
            await eventually(
                lambda: "c@x.org" in smtp_server.recipients(), what="the retry's email now"
            )
            assert not problems, problems

            # Another site's page cannot act, even in a browser holding the password: its form
            # POST is refused, and the dead letter stays.
            entry = DeadLetter.for_job("email", other.encode(), "failed", job=other).encode()
            await redis.lpush(keys.dead, entry)
            evil = await context.new_page()
            await evil.route(
                "http://evil.test/",
                lambda route: route.fulfill(
                    content_type="text/html",
                    body=f'<form method="post" action="{origin}/api/dead/purge" '
                    'enctype="text/plain"><input name="x" value="y"></form>'
                    "<script>document.forms[0].submit()</script>",
                ),
            )
            async with evil.expect_response(f"{origin}/api/dead/purge") as refused:
                await evil.goto("http://evil.test/")
            assert (await refused.value).status == 403
            assert await redis.llen(keys.dead) == 1
        finally:
            await browser.close()
    hosts = {urlsplit(url).netloc for url in requested if not url.startswith("data:")}
    assert hosts == {f"127.0.0.1:{port}"}, requested
