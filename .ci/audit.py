"""pip-audit over the lock files: exit 1 on any known vulnerability, and say plainly which
packages could not be audited (the vulnerability service could not be reached, or has no
record of that version) instead of counting them as safe. AUDIT_STRICT=1 fails on those too.

Usage: python .ci/audit.py requirements.lock requirements-dev.lock
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def audit(lock: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--disable-pip", "--no-deps", "--requirement", lock,
         "--format", "json", "--progress-spinner", "off"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode in (0, 1) and done.stdout.strip():
        dependencies: list[dict[str, object]] = json.loads(done.stdout)["dependencies"]
        return dependencies
    # No report at all (the vulnerability service unreachable): nothing in the lock was
    # audited, which main() says, rather than failing as if a vulnerability were found.
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return [{"name": name, "skip_reason": reason} for name in _locked(lock)]


def _locked(lock: str) -> list[str]:
    """The package names pinned in a lock file."""
    with open(lock) as file:
        lines = (line.split("#", 1)[0].strip() for line in file)
        return [line.split("==", 1)[0] for line in lines if "==" in line]


def main() -> int:
    locks = sys.argv[1:] or ["requirements.lock", "requirements-dev.lock"]
    seen: dict[str, dict[str, object]] = {}
    for lock in locks:
        for dependency in audit(lock):
            version = dependency.get("version")
            seen[f"{dependency['name']}=={version}" if version else str(dependency["name"])] = (
                dependency
            )
    vulnerable = {name: d["vulns"] for name, d in seen.items() if d.get("vulns")}
    skipped = sorted(name for name, d in seen.items() if "skip_reason" in d)
    audited = len(seen) - len(skipped)
    for name, vulns in sorted(vulnerable.items()):
        for vuln in vulns:  # type: ignore[attr-defined]
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            print(f"audit: {name}: {vuln['id']} (fixed in: {fixes})")
    print(f"audit: {audited} of {len(seen)} locked packages audited, {len(vulnerable)} vulnerable")
    if skipped:
        print(
            f"audit: NOT audited ({len(skipped)}): the vulnerability service could not be "
            f"reached or knows nothing of these versions: {', '.join(skipped)}"
        )
    if vulnerable:
        return 1
    if skipped and os.environ.get("AUDIT_STRICT") == "1":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
