"""One line: is the installed transformers one that pyproject.toml allows? Exit 0 if so, 1 if not.

Why: a GPU image often brings its own transformers, and pip keeps an installed version that satisfies
the requirement's floor while the project may need a newer one (or refuse one it was never made to work
with). The device benchmark must not silently measure the project against a version it does not
support, so it asks here first, with the requirement read from pyproject.toml (no version is written
twice)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def requirement() -> str:
    text = PYPROJECT.read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ImportError:  # Python < 3.11: the dependency line itself
        deps = re.findall(r'"([^"]+)"', text)
    return next(d for d in deps if re.match(r"transformers\b", d))


def main() -> int:
    req = requirement()
    try:
        have = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        print(f"gpu-check: transformers is not installed (pyproject.toml: {req})")
        return 1
    from packaging.requirements import Requirement  # comes with transformers (and pip)

    ok = Requirement(req).specifier.contains(have, prereleases=True)
    print(f"gpu-check: transformers {have} {'satisfies' if ok else 'is NOT allowed by'} pyproject.toml's {req!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
