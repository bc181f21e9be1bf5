"""The `moekit` command itself: fast help, every command listed, every shipped recipe valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import COMMANDS

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_help_lists_commands_without_importing_torch():
    script = "import sys; from moekit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("NO-TORCH")
    for name in COMMANDS:
        if (Path(__file__).parent.parent / "moekit" / "commands" / f"{name}.py").exists():
            assert f"  {name} " in done.stdout


def test_build_help_does_not_import_torch():
    script = "import sys; from moekit.cli import main\ntry:\n    main(['build', '--help'])\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "--dry-run" in done.stdout and done.stdout.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_is_valid(recipe):
    from moekit.recipe import load_recipe

    parsed = load_recipe(recipe)
    assert len(parsed.experts) >= 2
