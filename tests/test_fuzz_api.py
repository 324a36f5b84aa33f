"""schemathesis against /openapi.json of a real hypercorn: generated requests, valid and not,
to every documented operation, each answer checked against the document (no 5xx, a
documented status, content type, headers and body schema), and stateful sequences that
follow the document's links (a signup, then its user)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from devtools.embedded_redis import free_port
from tests.helpers import RedisServer
from tests.processes import ROOT, child_env

#: Generated cases per operation, and stateful sequences: `make test` runs these; set
#: FUZZ_CASES for a longer hunt (`FUZZ_CASES=5000 make test`).
CASES = int(os.environ.get("FUZZ_CASES", "150"))
STATEFUL_RUNS = max(1, CASES // 4)


@pytest.fixture(scope="module")
def base_url(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """hypercorn serving the app with its deployed config, for the module's tests."""
    port = free_port()
    log = (tmp_path_factory.mktemp("fuzz") / "hypercorn.log").open("wb")
    argv = [sys.executable, "-m", "hypercorn", "--config", "hypercorn.toml"]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "service:app"]
    env = child_env(redis_server, LOG_LEVEL="WARNING")
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "hypercorn exited"
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "hypercorn did not answer within 20 s"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(20)
        log.close()


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


OPERATIONS = ["POST /signup", "GET /users/{user_id}", "GET /stats", "GET /healthz", "GET /readyz"]
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, GenerationMode.POSITIVE) for label in OPERATIONS]
    # Only a signup has anything to get wrong: the others take a string (a path parameter,
    # an optional header) for which any value is valid.
    + [("POST /signup", GenerationMode.NEGATIVE)],
    ids=lambda value: value.value if isinstance(value, GenerationMode) else value,
)
def test_every_operation_answers_as_documented(
    api_schema: schemathesis.schemas.BaseSchema, label: str, mode: GenerationMode
) -> None:
    # Positive cases follow the document; negative ones break it (wrong types, missing or
    # unknown fields, bad content types). Either way: no 5xx and an answer as documented.
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    session = requests.Session()
    # A signup's schema gives the fields and their types; which strings make a valid
    # username or email (Unicode letter classes after NFKC, email-validator's syntax) is
    # beyond JSON Schema, so a schema-valid signup may well be a 422.
    excluded = [positive_data_acceptance] if label == "POST /signup" else []

    calls = 0

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(session=session, excluded_checks=excluded)

    run()
    print(f"{label} ({mode.value}): {calls} requests")  # shown by pytest -s / -rP


def test_stateful_sequences_answer_as_documented(
    api_schema: schemathesis.schemas.BaseSchema,
) -> None:
    base = api_schema.as_state_machine()

    class Signups(base):  # type: ignore[misc,valid-type]
        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            exclude = [positive_data_acceptance] if case.operation.label == "POST /signup" else []
            case.validate_response(response, excluded_checks=exclude)

    Signups.run(
        settings=settings(
            max_examples=STATEFUL_RUNS,
            deadline=None,
            stateful_step_count=6,
            suppress_health_check=list(HealthCheck),
        )
    )


def test_the_document_is_the_one_fuzzed(base_url: str) -> None:
    document = requests.get(f"{base_url}/openapi.json", timeout=5).json()
    links = document["paths"]["/signup"]["post"]["responses"]["201"]["links"]
    assert links["GetUser"]["operationId"] == "get_user"
    assert Path(ROOT, "hypercorn.toml").exists()
