"""The README and the docs site: the commands work as written in a fresh clone after
``make run`` or ``make test``, the site builds strictly, its generated tables say what the
declarations say, and the README stays a landing page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from devtools import docs
from pipeline.config import declared
from pipeline.settings import OUTSIDE, declared_settings
from tests.helpers import REGISTRY
from tests.processes import ROOT

README = (ROOT / "README.md").read_text()
PAGES = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
#: Everything a reader runs commands from.
TEXTS = [README, *PAGES.values()]
#: A command that needs the project's dependencies: a module of ours, or a tool the dev
#: install brings.
NEEDS_VENV = re.compile(
    r"^(?:python3? -m (?:consumers|loadtest|pipeline|service)\b|locust\b|hypercorn\b|honcho\b)"
)


def _shell_blocks() -> list[str]:
    return [block for text in TEXTS for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


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
    assert ". .venv/bin/activate" in PAGES["getting-started.md"]


def test_the_venv_commands_exist_in_the_dev_install() -> None:
    """What the examples run from `.venv/bin/` is there (the dev install has locust)."""
    for block in _shell_blocks():
        for line in block.splitlines():
            found = re.match(r"\.venv/bin/(\S+)", line.strip())
            if found:
                assert (ROOT / ".venv" / "bin" / found.group(1)).exists(), line


def test_dist_from_the_production_steps_is_ignored_by_git() -> None:
    """`pip wheel --no-deps -w dist .` (Running in production) leaves nothing to commit."""
    assert "pip wheel --no-deps -w dist ." in PAGES["production.md"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "dist/signup_pipeline-0.1.0-py3-none-any.whl"], cwd=ROOT
    )
    assert ignored.returncode == 0


def test_the_procfile_description_says_honcho_serves_on_5000() -> None:
    """honcho sets PORT itself (5000, then +100 per process type) unless given --port."""
    section = PAGES["production.md"].split("**Process managers.**", 1)[1].split("\n\n", 1)[0]
    assert ":5000" in section and "--port" in section


def test_the_uvicorn_command_is_the_one_the_tests_run() -> None:
    """ "Serving on uvicorn" gives UVICORN_OPTIONS, in order, as the tests and `make bench`
    run them."""
    from service.uvicorn_options import UVICORN_OPTIONS

    section = PAGES["operating.md"].split("## Serving on uvicorn", 1)[1].split("\n## ", 1)[0]
    (command,) = [line for line in section.splitlines() if line.startswith(".venv/bin/uvicorn ")]
    assert " ".join(UVICORN_OPTIONS) in command
    assert command.endswith(" service:app")


def test_the_readme_is_a_landing_page_linking_every_page() -> None:
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked == set(PAGES) - {"index.md"}


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    # mkdocs.yml says strict: a broken link, a missing page or snippet fails the build.
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    configuration = (tmp_path / "configuration" / "index.html").read_text()
    assert "<!-- generated" not in configuration and "<code>SMTP_URL</code>" in configuration
    home = (tmp_path / "index.html").read_text()
    assert "one atomic Lua script" in home  # the README's parts, included
    # Nothing loaded from another host (no web fonts, no CDN): links out are only links.
    for page in tmp_path.rglob("*.html"):
        loaded = re.findall(r'<(?:script|img)[^>]+src="(https?:[^"]+)"', page.read_text())
        loaded += re.findall(r'<link[^>]+href="(https?:[^"]+)"[^>]*>', page.read_text())
        assert loaded == [], (page, loaded)


def test_the_generated_tables_say_what_the_declarations_say() -> None:
    page = docs.render(PAGES["configuration.md"], REGISTRY)
    reactions = docs.render(PAGES["reactions.md"], REGISTRY)
    table = set(re.findall(r"^\| `([A-Z_]+)` \| ", page, flags=re.MULTILINE))
    own = {s.env for group in REGISTRY.settings for s in declared(group).values()}
    shared = {s.env for s in (*declared_settings().values(), *OUTSIDE)}
    assert len(shared) >= 25 and {"SMTP_URL", "EMAIL_FROM"} <= own
    assert table == shared | own
    for job_type in REGISTRY.job_types.values():
        assert f"| `{job_type.name}` | `{job_type.queue}` | {job_type.attempts} |" in reactions


def test_the_env_example_lists_every_shared_setting() -> None:
    # Written whole by `make docs` (CI fails when it is stale: python -m devtools.docs
    # --check); a reaction added here and not yet written into it fails nothing else.
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^# ([A-Z_]+)=", example, flags=re.MULTILINE))
    assert {s.env for s in (*declared_settings().values(), *OUTSIDE)} <= listed
    assert "# SMTP_URL=" in example  # the welcome email's own, as the shipped reactions go
