"""The OpenAPI document of this tree against another commit's, with and without tokens.

    .venv/bin/python bench/openapi_diff.py --before 13d3401

Checks out `--before` into a temporary git worktree, builds the app there and here (each in a
subprocess whose working directory is its tree, on a throwaway SQLite file), dumps
`app.openapi()` with sorted keys, and prints a unified diff per configuration (no tokens; read
and write tokens). Exit status 1 when a document differs, so a refactoring that claims "no
change to the API" can show it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "no tokens": {},
    "read and write tokens": {"read_token": "read-token-1234", "write_token": "write-token-5678"},
}
_DUMP = """
import json, sys, pathlib, service
from service.app import create_app
from service.settings import Settings
tree = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(service.__file__).resolve().parent.parent == tree, service.__file__
app = create_app(Settings(database_url="sqlite:///" + sys.argv[2], **json.loads(sys.argv[3])))
print(json.dumps(app.openapi(), indent=1, sort_keys=True))
"""


def document(tree: Path, settings: dict[str, str], scratch: Path) -> list[str]:
    db = scratch / f"{abs(hash((str(tree), json.dumps(settings))))}.db"
    argv = [sys.executable, "-c", _DUMP, str(tree), str(db), json.dumps(settings)]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, check=True)
    return done.stdout.splitlines(keepends=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare with")
    args = ap.parse_args()
    changed = False
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        before = scratch / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
            check=True,
            capture_output=True,
        )
        try:
            for name, settings in CONFIGS.items():
                old = document(before, settings, scratch)
                new = document(ROOT, settings, scratch)
                diff = list(difflib.unified_diff(old, new, f"{args.before}", "this tree"))
                changed |= bool(diff)
                print(f"# {name}: {'differs' if diff else 'identical'} ({len(new)} lines)")
                sys.stdout.writelines(diff)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                check=True,
                capture_output=True,
            )
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
