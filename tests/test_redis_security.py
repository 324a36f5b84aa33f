"""Redis security: an ACL user with a password, TLS (rediss://) against a real TLS-enabled
redis-server with a generated certificate, and the password never shown."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trustme

from devtools.embedded_redis import free_port, wait_until_ready
from pipeline.plan import resolve
from pipeline.settings import Settings
from service.app import create_app
from tests.helpers import debian_redis, eventually
from tests.processes import child_env, request, web

PASSWORD = "s3cret-Pa55"
#: The least the app needs: its own keys, no dangerous commands (FLUSHALL, CONFIG, KEYS...).
ACL = ["on", f">{PASSWORD}", "~signup:*", "resetchannels", "+@all", "-@dangerous"]
JSON = {"Content-Type": "application/json"}


@dataclass
class TlsRedis:
    plain_port: int
    tls_port: int
    ca_file: Path

    def url(self, user: str = "app", password: str = PASSWORD) -> str:
        return f"rediss://{user}:{password}@127.0.0.1:{self.tls_port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.plain_port)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A redis-server built with TLS (``make test`` fetches Debian's), serving TLS with a
    certificate from a private CA, and an ACL user ``app``. Its plain port, on loopback, is
    for the test's own set-up and checks."""
    binary = debian_redis()
    directory = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(directory / "cert.pem")
    cert.private_key_pem.write_to_path(directory / "key.pem")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    plain, tls = free_port(), free_port()
    argv = [binary, "--port", str(plain), "--tls-port", str(tls), "--bind", "127.0.0.1"]
    argv += ["--tls-cert-file", str(directory / "cert.pem")]
    argv += ["--tls-key-file", str(directory / "key.pem")]
    argv += ["--tls-ca-cert-file", str(directory / "ca.pem"), "--tls-auth-clients", "no"]
    argv += ["--dir", str(directory), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_until_ready(plain, time.monotonic() + 15, process)
        server = TlsRedis(plain, tls, directory / "ca.pem")
        with server.admin() as admin:
            admin.acl_setuser("app", reset=True)
            admin.execute_command("ACL", "SETUSER", "app", *ACL)
        yield server
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def clean_tls_redis(tls_redis: TlsRedis) -> TlsRedis:
    with tls_redis.admin() as admin:
        admin.flushall()
    return tls_redis


def settings_for(server: TlsRedis, **env: str) -> Settings:
    return Settings.from_env({"REDIS_CA_FILE": str(server.ca_file), "RATE_LIMIT": "1000/1", **env})


async def test_signup_over_tls_as_an_acl_user(clean_tls_redis: TlsRedis) -> None:
    settings = settings_for(clean_tls_redis, REDIS_URL=clean_tls_redis.url())
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        assert (await client.get("/readyz")).status_code == 200
        body = orjson.dumps({"username": "alice", "email": "alice@example.com"})
        response = await client.post("/signup", data=body, headers=JSON)
        assert response.status_code == 201
        user_id = (await response.get_json())["user_id"]
        assert (await client.get(f"/users/{user_id}")).status_code == 200
        assert (await client.get("/stats")).status_code == 200
    with clean_tls_redis.admin() as admin:
        # Every key the signup wrote is under the prefix the ACL allows, and the connections
        # came in over TLS as "app".
        assert admin.hget("signup:stats", "users") == b"1"
        assert all(key.startswith(b"signup:") for key in admin.keys("*"))


async def test_both_processes_work_over_tls_as_an_acl_user(
    clean_tls_redis: TlsRedis, spawn: Any, tmp_path: Path
) -> None:
    env = child_env(clean_tls_redis.url(), REDIS_CA_FILE=str(clean_tls_redis.ca_file))
    consumer = spawn([sys.executable, "-m", "consumers"], env)
    async with web(spawn, env) as (port, server):
        status, _, body = await request(
            port, "POST", "/signup", {"username": "bob", "email": "bob@example.com"}
        )
        assert status == 201

        async def profiled() -> bool:
            found = (await request(port, "GET", f"/users/{body['user_id']}"))[2]
            return bool(found["profile"])

        await eventually(profiled, timeout=15, what="the profile, generated over TLS")
        output = server.output() + consumer.output()
    assert PASSWORD not in output


@pytest.mark.parametrize(
    ("case", "env"),
    [
        ("wrong password", {"password": "not-the-password"}),
        ("unknown user", {"user": "mallory"}),
        ("certificate from another CA", {"ca": "system"}),
    ],
)
async def test_refused_connections_are_503_and_never_show_the_password(
    clean_tls_redis: TlsRedis, caplog: pytest.LogCaptureFixture, case: str, env: dict[str, str]
) -> None:
    url = clean_tls_redis.url(env.get("user", "app"), env.get("password", PASSWORD))
    settings = settings_for(clean_tls_redis, REDIS_URL=url)
    if env.get("ca") == "system":
        settings = Settings.from_env({"REDIS_URL": url})
    caplog.set_level(logging.DEBUG)
    async with create_app(resolve(settings)).test_app() as test_app:
        client = test_app.test_client()
        body = orjson.dumps({"username": "carol", "email": "carol@example.com"})
        signup = await client.post("/signup", data=body, headers=JSON)
        ready = await client.get("/readyz")
        answers = [await signup.get_data(as_text=True), await ready.get_data(as_text=True)]
    assert (signup.status_code, ready.status_code) == (503, 503)
    shown = "".join(answers) + caplog.text + repr(settings)
    assert PASSWORD not in shown
    assert env.get("password", PASSWORD) not in shown
    with clean_tls_redis.admin() as admin:
        assert admin.dbsize() == 0


def test_a_consumer_refused_by_redis_says_so_in_one_line_without_the_password(
    tls_redis: TlsRedis,
) -> None:
    env = child_env(
        tls_redis.url(password="wrong-" + PASSWORD), REDIS_CA_FILE=str(tls_redis.ca_file)
    )
    done = subprocess.run(
        [sys.executable, "-m", "consumers", "check"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode != 0
    err = done.stderr.decode()
    assert PASSWORD not in err
    assert len(err.strip().splitlines()) == 1, err
