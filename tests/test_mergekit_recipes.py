"""Published mergekit-moe recipes (tests/mergekit_recipes/) through mergekit-moe and `moekit build`.

Each recipe's Hub ids are swapped for tiny local checkpoints of the same family (the base model's id
for a random base, every other id for a fine-tune of it). Whatever mergekit-moe builds, moekit builds
too, with the same parameters and bit-identical non-router tensors once loaded by transformers
(mergekit 0.1.5 writes Mixtral experts fused in transformers 5's layout, moekit in the Hub's
per-expert layout that every loader reads); routers of the prompt modes point the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.recipe import parse_recipe

RECIPES = Path(__file__).parent / "mergekit_recipes"
# recipe -> (tiny family, does mergekit-moe 0.1.5 build it?)
EXPECTED = {
    "mergekit-docs-upcycling.yaml": ("llama", True),
    "mergekit-docs-clown-car.yaml": ("mistral", True),
    "mergekit-docs-shared-expert.yaml": ("qwen2", True),
    "chatml-clown-car.yaml": ("mistral", True),
    "beyonder-4x7b-v2.yaml": ("mistral", True),
    "llama31-4x8b.yaml": ("llama", True),
    "llama3-hidden-avg.yaml": ("llama", True),
    "phixtral-2x2_8.yaml": ("phi", False),  # mergekit-moe writes no Phi-2 MoE (Phixtral came from a fork)
}
ROUTER = re.compile(r"\.(gate|shared_expert_gate)\.weight$")


def test_every_recipe_is_listed():
    assert sorted(EXPECTED) == sorted(p.name for p in RECIPES.glob("*.yaml"))


def localize(text: str, family: str, root: Path, tokenizer) -> str:
    """The recipe with each Hub id replaced by a tiny local checkpoint of `family`."""
    from moekit.testing import make_dense_checkpoint

    data = yaml.safe_load(text)
    ids = [data["base_model"]] + [e["source_model"] for e in data["experts"] + (data.get("shared_experts") or [])]
    base = make_dense_checkpoint(root / "base", family, seed=0, tokenizer=tokenizer)
    local = {data["base_model"]: base}
    for index, ref in enumerate(dict.fromkeys(ids)):
        if ref not in local:
            local[ref] = make_dense_checkpoint(root / f"m{index}", base=base, seed=index + 1, mlp_noise=0.5)
    for ref in sorted(local, key=len, reverse=True):
        text = text.replace(ref, str(local[ref]))
    return text


def build_with_mergekit(text: str, out: Path) -> bool:
    """Build with mergekit-moe's own code, as its CLI does without flags; False where it refuses."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build as mergekit_build

    config = MoEMergeConfig.model_validate(yaml.safe_load(text))
    try:
        mergekit_build(config, str(out), MergeOptions(device="cpu"), device="cpu")
    except SystemExit:
        return False
    return True


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The model's parameters as transformers loads them, in the checkpoint's dtype (loading copies exactly)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto", trust_remote_code=True).state_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_recipe_builds_in_both_tools(name, tmp_path, tiny_tokenizer):
    family, mergekit_builds = EXPECTED[name]
    text = localize((RECIPES / name).read_text(), family, tmp_path / "models", tiny_tokenizer)

    assert build_with_mergekit(text, tmp_path / "mergekit") == mergekit_builds
    recipe = parse_recipe(text)
    build(recipe, tmp_path / "moekit", BuildOptions(device="cpu"), recipe_text=text)
    if not mergekit_builds:
        return

    theirs, ours = tensors(tmp_path / "mergekit"), tensors(tmp_path / "moekit")
    assert sorted(ours) == sorted(theirs)
    for tensor_name, tensor in theirs.items():
        if ROUTER.search(tensor_name) and ".mlp." in tensor_name:
            assert ours[tensor_name].shape == tensor.shape
            if recipe.gate_mode in ("hidden", "hidden_last", "cheap_embed"):
                # same definition; mergekit's forward runs in bfloat16 (and left-pads), ours in float32.
                # (hidden_avg: mergekit also averages over its left padding; see the test below)
                cosine = torch.nn.functional.cosine_similarity(ours[tensor_name].float(), tensor.float(), dim=-1)
                assert cosine.min() > 0.99, (tensor_name, cosine)
        else:
            assert ours[tensor_name].dtype == tensor.dtype and torch.equal(ours[tensor_name], tensor), tensor_name


def test_hidden_avg_is_mergekits_where_mergekit_pads_nothing(tmp_path, tiny_tokenizer):
    """mergekit's hidden_avg averages each prompt's states over the padded batch, padding included;
    moekit over the prompt's own tokens. With one prompt per expert there is no padding and the two agree."""
    text = (RECIPES / "llama3-hidden-avg.yaml").read_text()
    text = text.replace('["Hello, how can I help you today?", "Tell me about yourself"]', '["Hello, how can I help you today?"]')
    text = text.replace('["def quicksort(arr):", "SELECT name FROM users WHERE"]', '["def quicksort(arr):"]').replace(
        '    negative_prompts: ["Tell me about yourself"]\n', ""
    )
    text = localize(text, "llama", tmp_path / "models", tiny_tokenizer)
    assert build_with_mergekit(text, tmp_path / "mergekit")
    build(parse_recipe(text), tmp_path / "moekit", BuildOptions(device="cpu"))
    theirs, ours = tensors(tmp_path / "mergekit"), tensors(tmp_path / "moekit")
    routers = [name for name in theirs if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for name in routers:
        cosine = torch.nn.functional.cosine_similarity(ours[name].float(), theirs[name].float(), dim=-1)
        assert cosine.min() > 0.999, (name, cosine)
