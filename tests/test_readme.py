"""The README as a user follows it: every file it names exists, every command it documents parses with its script's
own argument parser, and the commands that are cheap (dry runs, the reference check, the Quick start's make
targets) run.  The commands are read from the README itself, so they cannot drift from it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .test_sweep import load_script

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
# What the README names that a run creates (outputs) rather than what a clone holds.
OUTPUTS = ("results/quickstart", "results/paper", "results/analysis", "results/gpu/", "runs/", "data/", "ray_results",
           "mlflow.db", "mlartifacts")
PATH_ROOTS = ("qam_ray/", "experiments/", "tests/", "docs/", "cluster/", "results/", ".ci/")


def readme_commands() -> list[str]:
    """Every ``.venv/bin/python ...`` command of the README's code blocks and inline code, continuation lines
    joined, trailing comments dropped."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines() if ".venv/bin/python" in line]
    commands += re.findall(r"`((?:[A-Z_]+=\S+ )*\.venv/bin/python [^`]+)`", README)
    return [c[c.index(".venv/bin/python"):] for c in commands]


COMMANDS = readme_commands()


def test_the_readme_documents_commands_for_every_entry_point():
    scripts = {Path(shlex.split(c)[1]).name for c in COMMANDS if shlex.split(c)[1].startswith("experiments/")}
    assert scripts == {p.name for p in (ROOT / "experiments").glob("*.py")}, scripts
    assert any("-m qam_ray.reference_check" in c for c in COMMANDS)


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}.py`` → ``a/b.py``, ``a/c.py`` (as the README abbreviates sibling files)."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [p for part in match[1].split(",") for p in expand_braces(path[:match.start()] + part + path[match.end():])]


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"`([^` ]+)`", README))
    paths = {p for n in named if n.startswith(PATH_ROOTS) and "<" not in n for p in expand_braces(n.rstrip(".,"))}
    missing = [p for p in sorted(paths) if not p.startswith(OUTPUTS) and not list(ROOT.glob(p))]
    assert paths and not missing, missing


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(shlex.split(c)[1:4]))
def test_each_documented_command_parses(command):
    argv = shlex.split(command)[1:]
    if argv[0] == "-m":
        assert argv[1] == "qam_ray.reference_check"
        return
    script = load_script(Path(argv[0]).stem)
    parsed = script.parse_args(argv[1:])
    if Path(argv[0]).stem == "finetune":  # finetune passes its other flags on to sweep.py
        _, args, passthrough = parsed
        load_script("sweep").parse_args(["--preset", "smoke", *passthrough])


PLACEHOLDERS = ("F.npz", "...", "RUN_ID")  # a command with one of these describes a form; it is parsed, not run


@pytest.mark.parametrize("command", [c for c in COMMANDS if ("--dry-run" in c or "reference_check" in c)
                                     and not set(shlex.split(c)) & set(PLACEHOLDERS)],
                         ids=lambda c: " ".join(shlex.split(c)[1:5]))
def test_cheap_documented_commands_run(command):
    argv = [sys.executable if word == ".venv/bin/python" else word for word in shlex.split(command)]
    argv = [str(path) for word in argv for path in (sorted(ROOT.glob(word)) if "*" in word else [word])]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_the_quick_start_is_two_make_targets_that_exist():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", quick, flags=re.S).group(1).split()
    assert block == ["make", "run", "make", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
