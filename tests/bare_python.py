"""A Python that sees only torch, numpy and torch's own dependencies: what a bare GPU machine has."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _requirements(dist_name: str, seen: set[str]) -> None:
    """The distribution and, recursively, what it requires unconditionally (no extras, no markers that fail)."""
    from packaging.requirements import Requirement

    key = dist_name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for text in importlib.metadata.requires(dist_name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            try:
                _requirements(requirement.name, seen)
            except importlib.metadata.PackageNotFoundError:
                continue


def bare_site(folder: Path, dists=("torch", "numpy")) -> Path:
    """``folder`` holding symlinks to the top-level packages of ``dists`` and their requirements only."""
    names: set[str] = set()
    for dist in dists:
        _requirements(dist, names)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith(("..", "/"))}
        for top in tops:
            if re.search(r"\.(dist|egg)-info$", top) or top == "__pycache__":
                continue
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def bare_command(folder: Path, *args: str) -> tuple[list[str], dict]:
    """argv and environment running this interpreter without site-packages, on ``folder`` and the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    return [sys.executable, "-S", *args], env
