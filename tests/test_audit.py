"""The CI's audit (.ci/audit.py) fails on a known vulnerability and never counts a package it
could not audit as safe."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("dependencies", "strict", "code", "said"),
    [
        ([{"name": "quart", "version": "0.22.0", "vulns": []}], "", 0, "1 of 1 locked"),
        (
            [
                {
                    "name": "jinja2",
                    "version": "3.1.2",
                    "vulns": [{"id": "GHSA-x", "fix_versions": ["3.1.3"]}],
                }
            ],
            "",
            1,
            "jinja2==3.1.2: GHSA-x (fixed in: 3.1.3)",
        ),
        ([{"name": "redis", "skip_reason": "not found"}], "", 0, "NOT audited (1)"),
        ([{"name": "redis", "skip_reason": "not found"}], "1", 1, "NOT audited (1): "),
    ],
)
def test_audit_verdicts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dependencies: list[dict[str, Any]],
    strict: str,
    code: int,
    said: str,
) -> None:
    audit = load_audit()
    monkeypatch.setattr(audit, "audit", lambda lock: dependencies)
    monkeypatch.setattr(audit.sys, "argv", ["audit.py", "requirements.lock"])
    monkeypatch.setenv("AUDIT_STRICT", strict)
    assert audit.main() == code
    assert said in capsys.readouterr().out


def test_an_unreachable_vulnerability_service_is_not_audited_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    audit = load_audit()
    lock = tmp_path / "requirements.lock"
    lock.write_text("quart==0.22.0\n    # via signup-pipeline\nredis==8.1.0\n")

    class Failed:
        returncode, stdout = 1, ""
        stderr = "Traceback ...\nConnectionError: Failed to resolve 'api.osv.dev'\n"

    monkeypatch.setattr(audit.subprocess, "run", lambda *args, **kwargs: Failed())
    assert audit.audit(str(lock)) == [
        {"name": "quart", "skip_reason": "ConnectionError: Failed to resolve 'api.osv.dev'"},
        {"name": "redis", "skip_reason": "ConnectionError: Failed to resolve 'api.osv.dev'"},
    ]
    monkeypatch.setattr(audit.sys, "argv", ["audit.py", str(lock)])
    monkeypatch.setenv("AUDIT_STRICT", "")
    assert audit.main() == 0
    assert "NOT audited (2): " in capsys.readouterr().out
    monkeypatch.setenv("AUDIT_STRICT", "1")
    assert audit.main() == 1
