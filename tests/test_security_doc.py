"""The Security page's table names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_security_table_names_exists() -> None:
    section = (ROOT / "docs" / "security.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)?)`|`::(\w+)`", section)
    assert len(named) >= 15
    current = ""
    for path, test, bare in named:
        if path:
            current = path
            assert (ROOT / path).is_file(), path
        name = (test or "").removeprefix("::") or bare
        if name:
            assert f"def {name}(" in (ROOT / current).read_text(), f"{current}::{name}"
