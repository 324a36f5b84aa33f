"""The README's commands work as written in a fresh clone after ``make run`` or ``make test``."""

from __future__ import annotations

import re
import subprocess

from tests.processes import ROOT

README = (ROOT / "README.md").read_text()
#: A command that needs the project's dependencies: a module of ours, or a tool the dev
#: install brings.
NEEDS_VENV = re.compile(
    r"^(?:python3? -m (?:consumers|loadtest|pipeline|service)\b|locust\b|hypercorn\b|honcho\b)"
)


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_every_command_that_needs_the_venv_says_how_to_get_it() -> None:
    """In a fresh clone, `python -m consumers stats` is a ModuleNotFoundError: the system
    Python has none of the dependencies. Each such command either runs through `.venv/bin/`
    (which `make run` and `make test` create) or stands in a block that activates a venv."""
    bare = [
        line
        for block in _shell_blocks()
        if "/bin/activate" not in block
        for line in block.splitlines()
        if NEEDS_VENV.match(line.strip())
    ]
    assert bare == []
    assert ". .venv/bin/activate" in README  # and the README says how to get a shell with it


def test_the_venv_commands_exist_in_the_dev_install() -> None:
    """What the examples run from `.venv/bin/` is there (the dev install has locust)."""
    for block in _shell_blocks():
        for line in block.splitlines():
            found = re.match(r"\.venv/bin/(\S+)", line.strip())
            if found:
                assert (ROOT / ".venv" / "bin" / found.group(1)).exists(), line


def test_dist_from_the_production_steps_is_ignored_by_git() -> None:
    """`pip wheel --no-deps -w dist .` (Running in production) leaves nothing to commit."""
    assert "pip wheel --no-deps -w dist ." in README
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "dist/signup_pipeline-0.1.0-py3-none-any.whl"], cwd=ROOT
    )
    assert ignored.returncode == 0


def test_the_procfile_description_says_honcho_serves_on_5000() -> None:
    """honcho sets PORT itself (5000, then +100 per process type) unless given --port."""
    section = README.split("**Process managers.**", 1)[1].split("\n\n", 1)[0]
    assert ":5000" in section and "--port" in section


def test_the_uvicorn_command_is_the_one_the_tests_run() -> None:
    """README "Serving on uvicorn" gives UVICORN_OPTIONS, in order, as the tests and
    `make bench` run them."""
    from service.uvicorn_options import UVICORN_OPTIONS

    section = README.split("### Serving on uvicorn", 1)[1].split("\n## ", 1)[0]
    (command,) = [line for line in section.splitlines() if line.startswith(".venv/bin/uvicorn ")]
    assert " ".join(UVICORN_OPTIONS) in command
    assert command.endswith(" service:app")
