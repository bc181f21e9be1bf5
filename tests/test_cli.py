"""The `moekit` command itself: fast help, every command listed, every shipped recipe valid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli import COMMANDS
from moekit.testing import help_in_fresh_process

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_help_lists_commands_without_importing_torch():
    output, imported_torch = help_in_fresh_process([])
    assert not imported_torch
    for name in COMMANDS:
        assert f"  {name} " in output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_imports(name):
    """A command listed in `moekit --help` whose module is missing or broken fails here, not in a user's hands."""
    import click

    from moekit.cli import cli

    command = cli.get_command(click.Context(cli), name)
    assert isinstance(command, click.Command) and command.name == name


def test_build_help_does_not_import_torch():
    output, imported_torch = help_in_fresh_process(["build"])
    assert "--dry-run" in output and not imported_torch


def test_only_the_command_line_imports_click():
    """The library raises typed errors and takes pydantic options; click (and exiting) belong to cli.py and commands/."""
    import re

    package = Path(__file__).parent.parent / "moekit"
    importers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import click|from click)\b", path.read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert importers and all(name == "cli.py" or name.startswith("commands/") for name in importers), importers


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_is_valid(recipe):
    from moekit.recipe import load_recipe

    parsed = load_recipe(recipe)
    assert len(parsed.experts) >= 2


# A command that stages output like `build` and waits to be killed; the parent kills it mid-write.
_SLOW_COMMAND = """
import sys, time
from pathlib import Path
import click
from moekit.cli import cli, main
from moekit.output import staged_output

@click.command("slow")
@click.argument("out", type=click.Path(path_type=Path))
def slow(out):
    with staged_output(out, overwrite=True) as staging:
        (staging / "half.bin").write_bytes(b"x" * 10)
        Path(sys.argv[2]).touch()  # tells the parent the work is under way
        time.sleep(60)

cli.get_command = lambda ctx, name: slow  # the lazy group only knows moekit's own commands
main(["slow", sys.argv[1]])
"""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    out, started = tmp_path / "out", tmp_path / "started"
    out.mkdir()
    (out / "old.txt").write_text("old")
    process = subprocess.Popen([sys.executable, "-c", _SLOW_COMMAND, str(out), str(started)], stderr=subprocess.PIPE, text=True)
    for _ in range(3600):  # up to 3 minutes: a loaded CI machine starts Python slowly
        if started.exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    assert started.exists(), process.stderr.read()
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "started"]  # the staging directory is gone
    assert (out / "old.txt").read_text() == "old"
