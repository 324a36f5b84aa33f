"""``/docs`` in a real browser (Debian's chromium, driven by Playwright), served by a real
hypercorn: Swagger UI renders the signup operation with nothing fetched from another host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from tests.helpers import RedisServer
from tests.processes import child_env, web

#: Debian's chromium (`.ci/run` installs it); CHROMIUM names another.
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: As the machine's own probe starts it: headless, as root, and quiet on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def watch(page: Any) -> tuple[list[str], list[str]]:
    """What ``page`` requests, and its problems: script errors, console errors (a resource
    the page's policy blocked is one), dialogs."""
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    return requested, problems


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: missing there is a broken set-up
        pytest.skip(message)
    return CHROMIUM


@pytest.mark.timeout(120)
async def test_docs_render_the_signup_operation_offline_in_a_real_browser(
    chromium: str, spawn: Any, redis_server: RedisServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    async with web(spawn, child_env(redis_server)) as (port, _), async_playwright() as driver:
        origin = f"http://127.0.0.1:{port}"
        browser = await driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            requested, problems = watch(page)
            await page.goto(f"{origin}/docs")
            signup = page.locator(".opblock-post .opblock-summary-path", has_text="/signup")
            await signup.wait_for(timeout=30_000)
            # Expanded, the operation shows its documented answers.
            await signup.click()
            await page.locator(
                ".responses-table .response-col_status", has_text="201"
            ).first.wait_for(timeout=10_000)
            assert await page.locator(".opblock-summary-path", has_text="/users/").count() == 1
            await page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        finally:
            await browser.close()
    hosts = {urlsplit(url).netloc for url in requested if not url.startswith("data:")}
    assert hosts == {f"127.0.0.1:{port}"}, requested
    assert any(url.endswith("/openapi.json") for url in requested)
    assert not problems, problems  # no script error, no resource blocked by the page's policy
