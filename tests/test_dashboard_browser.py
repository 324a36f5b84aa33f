"""The dashboard in a real browser (Debian's chromium, driven by Playwright), served by a real
``python -m consumers dashboard``: its numbers and its chart move without a reload while a
real consumer works, markup from Redis is shown as text, nothing is fetched from another
host, and no password means a 401."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as aioredis

from pipeline.keys import Keys
from pipeline.queue import DirectQueue
from tests.helpers import REGISTRY, RedisServer, eventually
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
