"""What the docs say that follows from declarations: the settings table (from
:class:`pipeline.settings.Settings` and the default reactions' own settings), the tables of
reactions, job types and queues (from the default registry), and ``.env.example``.

The site's pages hold markers (``<!-- generated:settings -->``, ``<!-- generated:reactions -->``)
that :func:`on_page_markdown`, an mkdocs hook (``mkdocs.yml``), replaces with the tables
whenever the site is built: they are never stale. ``python -m devtools.docs`` writes
``.env.example`` (``make docs`` runs it, then builds the site); ``--check`` exits 1 when the
file differs from what the declarations say (CI runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Setting, declared
from pipeline.registry import Registry, load_registry
from pipeline.settings import DEFAULT_REACTIONS, OUTSIDE, declared_settings

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"

_ENV_HEADER = """\
# Every setting of the web service and the consumers, with its default. Copy to .env (or
# set these in your process manager); a bad value stops start-up with one line naming it.
# Generated from pipeline/settings.py and the reactions' settings by `make docs`; the
# docs' Configuration table says the same.
"""
#: Defaults shown as words, not values.
_WORDS = {"every queue", "as declared", "none"}


def _settings(registry: Registry) -> list[tuple[Setting, str | None]]:
    """Every setting, with the reaction declaring it (None: the pipeline's own)."""
    found: list[tuple[Setting, str | None]] = [
        (s, None) for s in (*declared_settings().values(), *OUTSIDE)
    ]
    for reaction in registry.reactions:
        if reaction.settings is not None:
            found += [(s, reaction.name) for s in declared(reaction.settings).values()]
    return found


def _meaning(setting: Setting, reaction: str | None) -> str:
    flag = f" (flag `{setting.flag}`)" if setting.flag else ""
    owner = f"reaction {reaction}: " if reaction else ""
    return f"{owner}{setting.doc}{flag}"


def settings_table(registry: Registry) -> str:
    """The table of every setting."""
    rows = [
        "| variable | read by | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting, reaction in _settings(registry):
        default = f"`{setting.default}`" if setting.default else "unset"
        if setting.default in _WORDS:
            default = setting.default
        rows.append(
            f"| `{setting.env}` | {setting.read_by} | {setting.kind} | {default} | "
            f"{_meaning(setting, reaction)} |"
        )
    return "\n".join(rows)


def env_example(registry: Registry) -> str:
    """``.env.example``: each setting commented out at its default, with what it means."""
    parts = [_ENV_HEADER]
    for setting, reaction in _settings(registry):
        meaning = _meaning(setting, reaction).replace("`", "")
        value = "" if setting.default in _WORDS else setting.default
        parts.append(
            f"\n# {meaning} ({setting.kind.replace('`', '')}; read by {setting.read_by})\n"
            f"# {setting.env}={value}\n"
        )
    return "".join(parts)


def reactions_table(registry: Registry) -> str:
    """The tables of reactions, job types and queues."""
    rows = [
        "| reaction | module | reacts to | pushes | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for reaction in registry.reactions:
        signals = ", ".join(f"`{s.name}`" for s in reaction.receivers) or "-"
        pushes = ", ".join(f"`{name}`" for name in reaction.pushes) or "-"
        module = _module_of(reaction)
        rows.append(
            f"| {reaction.name} | `{module}` | {signals} | {pushes} | {reaction.description} |"
        )
    rows += [
        "",
        "| job type | queue | attempts | timeout (s) | counter in `/stats` | handler | what |",
        "| --- | --- | ---: | ---: | --- | --- | --- |",
    ]
    for job_type in registry.job_types.values():
        handler = f"`{job_type.handler.__name__}`" if job_type.handler else "none here"
        counter = f"`{job_type.counter}`" if job_type.counter else "-"
        rows.append(
            f"| `{job_type.name}` | `{job_type.queue}` | {job_type.attempts} | "
            f"{job_type.timeout:g} | {counter} | {handler} | {job_type.description} |"
        )
    rows += ["", "| queue | Redis list | job types |", "| --- | --- | --- |"]
    for queue in registry.queues:
        types = ", ".join(f"`{t.name}`" for t in registry.types_on(queue))
        rows.append(f"| `{queue}` | `<prefix>:queue:{queue}` | {types} |")
    return "\n".join(rows)


def _module_of(reaction: object) -> str:
    for job_type in getattr(reaction, "job_types", ()):
        if job_type.handler is not None:
            return str(job_type.handler.__module__)
    for receivers in getattr(reaction, "receivers", {}).values():
        for receiver in receivers:
            return str(receiver.__module__)
    return "?"


def render(markdown: str, registry: Registry) -> str:
    """``markdown`` with each ``<!-- generated:NAME -->`` marker replaced by its table."""
    tables = {"settings": settings_table, "reactions": reactions_table}
    for name, table in tables.items():
        marker = f"<!-- generated:{name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, table(registry))
    return markdown


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs hook: each page's generated tables, from the default reactions."""
    return render(markdown, load_registry(DEFAULT_REACTIONS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if it is out of date")
    options = parser.parse_args(argv)
    wanted = env_example(load_registry(DEFAULT_REACTIONS))
    stale = ENV_EXAMPLE.read_text() != wanted
    if options.check:
        if stale:
            print(".env.example is out of date (run make docs)", file=sys.stderr)
            return 1
        return 0
    if stale:
        ENV_EXAMPLE.write_text(wanted)
    print(f"{ENV_EXAMPLE.name}: {'written' if stale else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
