"""Write constraints/serve.txt: the exact versions of the serve image's Python packages.

The lock is the runtime closure of pyproject.toml's `dependencies` as installed in the venv the
tests ran on (Python 3.11, Linux, the same as the image), one `name==version` a line. The serve
image installs with it (`pip install --constraint=constraints/serve.txt .`), so an image built
later gets the versions that were tested, not whatever the ranges in pyproject.toml resolve to
that day. Regenerate after changing dependencies:

    .venv/bin/python scripts/serve_constraints.py
"""

from __future__ import annotations

import importlib.metadata as metadata
import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "constraints" / "serve.txt"


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of the requirements and all they need (markers
    evaluated here, with the extras asked for)."""
    found: dict[str, str] = {}
    todo = [(r, "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in [""] + sorted(requirement.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            dist = metadata.distribution(requirement.name)
            # A local build tag (torch's +cpu) is not on the index the image installs from.
            found[name] = re.sub(r"\+.*$", "", dist.version)
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = closure([Requirement(r) for r in project["dependencies"]])
    header = (
        "# The serve image's packages, exact (scripts/serve_constraints.py writes this file from\n"
        "# the tested venv; Dockerfile.serve and Dockerfile.vllm install with it).\n"
    )
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"{OUTPUT.relative_to(ROOT)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
