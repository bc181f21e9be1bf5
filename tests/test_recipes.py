"""Every shipped recipe runs unchanged through the real `moekit build` CLI.

The recipes name Hub models that cannot be downloaded here, so each Hub id is served from a local
Hugging Face cache holding a tiny checkpoint of the same family; huggingface_hub's own offline code
resolves them. `zoo:` recipes are built by the demo tests (tests/test_demo*.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# tiny architecture standing in for each recipe's models, and the output architecture it must build
FAMILY = {
    "4x7b.yaml": ("mistral", "MixtralForCausalLM"),
    "phi3-4x3_8b.yaml": ("phi3", "MixtralForCausalLM"),
    "phixtral-4x2_8.yaml": ("phi", "PhixtralForCausalLM"),
}
HUB_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml") if not load_recipe(p).base_model.startswith("zoo:"))


def test_every_hub_recipe_has_a_tiny_family():
    assert sorted(FAMILY) == HUB_RECIPES


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_shipped_recipe_builds_through_the_cli(name, tmp_path, tiny_tokenizer):
    from moekit.testing import make_dense_checkpoint, populate_hub_cache

    arch, output_class = FAMILY[name]
    recipe_path = RECIPES / name
    recipe = load_recipe(recipe_path)
    cache = tmp_path / "hub"
    base = make_dense_checkpoint(tmp_path / "src" / "base", arch, seed=0, tokenizer=tiny_tokenizer)
    populate_hub_cache(cache, recipe.base_model, base)
    for index, expert in enumerate(recipe.experts):
        if expert.source_model != recipe.base_model:
            tuned = make_dense_checkpoint(tmp_path / "src" / f"e{index}", base=base, seed=index + 1, mlp_noise=0.5)
            populate_hub_cache(cache, expert.source_model, tuned)

    out = tmp_path / "moe"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "moekit", "build", str(recipe_path), "-o", str(out), "--device", "cpu"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [output_class]
    assert config["num_local_experts"] == len(recipe.experts)
    assert config["num_experts_per_tok"] == recipe.experts_per_token
    assert (out / "moekit-recipe.yaml").read_text() == recipe_path.read_text()
    sources = json.loads((out / "moekit.json").read_text())["sources"]
    assert all(sources[e.source_model]["path"].startswith(str(cache)) for e in recipe.experts)
    assert (out / "README.md").exists() and (out / "routing" / "routing.json").exists()
