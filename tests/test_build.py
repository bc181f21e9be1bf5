"""`moekit build` on tiny local Llama/Mistral checkpoints: gate modes, exactness, layout, loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.recipe import parse_recipe

PROMPTS = {
    "e0": ["def add(a, b): return a + b", "import os\nprint(os.getcwd())", "for i in range(10): pass"],
    "e1": ["The quick brown fox jumps over the lazy dog.", "Write a poem about the sea.", "Once upon a time"],
    "e2": ["12 + 30 = 42", "7 * 6 = 42", "100 - 58 = 42"],
}


def recipe_text(models: dict, gate_mode: str = "hidden", experts=("e0", "e1", "e2"), top_k: int = 2, extra: str = "", base: str = "base") -> str:
    lines = [f"base_model: {models[base]}", f"gate_mode: {gate_mode}", "dtype: float32", f"experts_per_token: {top_k}", "experts:"]
    for name in experts:
        lines.append(f"  - source_model: {models[name]}")
        lines.append(f"    positive_prompts: {json.dumps(PROMPTS.get(name, PROMPTS['e0']))}")
    return "\n".join(lines) + "\n" + extra


def logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    return tiny_tokenizer(["def add(a, b): the quick brown fox 12 + 30"], return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def calibrated_moe(llama_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "moe"
    text = recipe_text(llama_family, "calibrated")
    build(parse_recipe(text), out, BuildOptions(device="cpu"), recipe_text=text)
    return out


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random", "uniform_random"])
def test_gate_modes_build_loadable_mixtral(gate_mode, llama_family, tmp_path, input_ids):
    out = tmp_path / "moe"
    result = build(parse_recipe(recipe_text(llama_family, gate_mode)), out, BuildOptions(device="cpu"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    routers = [_tensor(out, f"model.layers.{layer}.block_sparse_moe.gate.weight") for layer in range(2)]
    assert all(r.shape == (3, 64) for r in routers)
    if gate_mode in ("hidden", "cheap_embed"):  # prompt modes give unit-norm rows, one per expert
        assert torch.allclose(routers[0].norm(dim=-1), torch.ones(3), atol=1e-4)
    if gate_mode == "cheap_embed":  # the same embedding vector for every layer, as in mergekit
        assert torch.equal(routers[0], routers[1])
    assert logits(out, input_ids).isfinite().all()
    assert result.plan.parameters_total == sum(p.numel() for p in _load(out).parameters())


def test_calibrated_routes_each_experts_prompts_to_it(calibrated_moe):
    routing = json.loads((calibrated_moe / "routing" / "routing.json").read_text())
    # calibrated routers are fitted so that an expert's prompts pick it (top-2 of 3: at most half the slots)
    assert min(routing["own_expert_share"]["mean_per_expert"]) > 0.45
    assert (calibrated_moe / "routing" / "routing.png").stat().st_size > 1000


def test_calibrated_beats_hidden_on_own_expert_share(llama_family, calibrated_moe, tmp_path):
    out = tmp_path / "hidden"
    build(parse_recipe(recipe_text(llama_family, "hidden")), out, BuildOptions(device="cpu"))
    hidden = json.loads((out / "routing" / "routing.json").read_text())["own_expert_share"]["mean"]
    calibrated = json.loads((calibrated_moe / "routing" / "routing.json").read_text())["own_expert_share"]["mean"]
    assert calibrated >= hidden


def test_output_layout_and_files(calibrated_moe, llama_family):
    names = set()
    for shard in calibrated_moe.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any("gate_up_proj" in n or ".mlp." in n for n in names)
    for required in ("config.json", "generation_config.json", "tokenizer.json", "moekit-recipe.yaml", "README.md", "moekit.json"):
        assert (calibrated_moe / required).is_file(), required
    metadata = json.loads((calibrated_moe / "moekit.json").read_text())
    assert metadata["gate_mode"] == "calibrated" and metadata["num_experts"] == 3
    assert metadata["base_model"] == str(llama_family["base"])
    # the expert MLPs are copied bit for bit from their sources
    assert torch.equal(
        _tensor(calibrated_moe, "model.layers.1.block_sparse_moe.experts.2.w2.weight"), _tensor(llama_family["e2"], "model.layers.1.mlp.down_proj.weight")
    )


def test_identical_experts_equal_the_base_model(llama_family, tmp_path, input_ids):
    """Routing weights sum to one, so an MoE of copies of the base computes the base, whatever the router."""
    models = {"base": llama_family["base"], "same": llama_family["base"]}
    for gate_mode in ("random", "calibrated"):
        out = tmp_path / gate_mode
        text = recipe_text(models, gate_mode, experts=("same", "same", "same"))
        text = text.replace(json.dumps(PROMPTS["e0"]), '["a b c"]', 1).replace(json.dumps(PROMPTS["e0"]), '["1 2 3"]', 1)
        build(parse_recipe(text), out, BuildOptions(device="cpu", allow_same_experts=True))
        torch.testing.assert_close(logits(out, input_ids), logits(llama_family["base"], input_ids), atol=1e-5, rtol=1e-5)


def test_forced_top1_reproduces_expert_mlp(calibrated_moe, llama_family):
    moe = _load(calibrated_moe)
    hidden = torch.randn(1, 5, 64)
    for k in range(3):
        expert = _load(llama_family[f"e{k}"])
        for layer in range(2):
            block = moe.model.layers[layer].mlp
            forced = torch.full((5, 1), k)
            with torch.no_grad():
                out = block.experts(hidden.view(-1, 64), forced, torch.ones(5, 1)).view(1, 5, 64)
                want = expert.model.layers[layer].mlp(hidden)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_loads_in_a_plain_transformers_process(calibrated_moe, input_ids):
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(calibrated_moe)!r}, dtype=torch.float32)
        out = model(torch.tensor({input_ids.tolist()})).logits
        generated = model.generate(torch.tensor({input_ids.tolist()}), max_new_tokens=5, do_sample=False)
        assert "moekit" not in sys.modules
        print(type(model).__name__, out.sum().item(), generated.shape[1])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=True)
    name, total, length = done.stdout.split()
    assert name == "MixtralForCausalLM"
    assert abs(float(total) - logits(calibrated_moe, input_ids).sum().item()) < 1e-2
    assert int(length) == input_ids.shape[1] + 5


def test_mistral_sliding_window_and_rope_survive(tmp_path, tiny_tokenizer, input_ids):
    from moekit.testing import make_dense_checkpoint

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    base = make_dense_checkpoint(tmp_path / "base", "mistral", tokenizer=tiny_tokenizer, sliding_window=16, rope_parameters=rope)
    models = {"base": base, "e0": base}
    text = recipe_text(models, "random", experts=("e0", "e0"), top_k=1)
    out = tmp_path / "moe"
    build(parse_recipe(text), out, BuildOptions(device="cpu", allow_same_experts=True))
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 16
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    long_ids = torch.randint(4, len(tiny_tokenizer), (1, 40))  # longer than the window, so the window matters
    torch.testing.assert_close(logits(out, long_ids), logits(base, long_ids), atol=1e-5, rtol=1e-5)


def test_mergekit_recipe_builds_unchanged_with_mergekit_gates(llama_family, tmp_path):
    """A mergekit-moe recipe (no moekit keys) builds, and cheap_embed gates equal mergekit's own."""
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params
    from transformers import AutoTokenizer

    text = textwrap.dedent(f"""
        base_model: {llama_family["base"]}
        gate_mode: cheap_embed
        dtype: float32
        experts:
          - source_model: {llama_family["e0"]}
            positive_prompts: ["def add(a, b)"]
            negative_prompts: ["once upon a time"]
          - source_model: {llama_family["e1"]}
            positive_prompts: ["once upon a time"]
    """)
    out = tmp_path / "moe"
    build(parse_recipe(text), out, BuildOptions(device="cpu"))
    experts = [
        Expert(source_model=ModelReference.model_validate(str(llama_family["e0"])), positive_prompts=["def add(a, b)"], negative_prompts=["once upon a time"]),
        Expert(source_model=ModelReference.model_validate(str(llama_family["e1"])), positive_prompts=["once upon a time"]),
    ]
    tokenizer = AutoTokenizer.from_pretrained(llama_family["base"])
    theirs = get_gate_params(ModelReference.model_validate(str(llama_family["base"])), tokenizer, experts, mode="cheap_embed")
    for layer in range(2):
        torch.testing.assert_close(_tensor(out, f"model.layers.{layer}.block_sparse_moe.gate.weight"), theirs[layer].float(), atol=1e-5, rtol=1e-5)


def _tensor(model_dir: Path, name: str) -> torch.Tensor:
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def rope_as_transformers_4_reads_it(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) as transformers 4.x's MixtralConfig takes them from config.json: flat keys,
    rope_theta defaulting to Mixtral's 1e6; it knows nothing of `rope_parameters`."""
    return config.get("rope_theta", 1e6), config.get("rope_scaling")


@pytest.mark.parametrize(
    "rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}]
)
def test_config_has_the_legacy_rope_keys_of_the_base(tmp_path, tiny_tokenizer, rope_scaling):
    """transformers 4.x readers get the base's rope settings, not Mixtral's default rope_theta of 1e6."""
    from transformers import AutoConfig

    from moekit.testing import make_dense_checkpoint

    rope = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else {**rope_scaling, "rope_theta": 500000.0}
    base = make_dense_checkpoint(tmp_path / "base", "llama", tokenizer=tiny_tokenizer, rope_parameters=rope)
    out = tmp_path / "moe"
    build(
        parse_recipe(recipe_text({"base": base, "e0": base}, "random", experts=("e0", "e0"), top_k=1)), out, BuildOptions(device="cpu", allow_same_experts=True)
    )
    config = json.loads((out / "config.json").read_text())
    assert rope_as_transformers_4_reads_it(config) == (rope["rope_theta"], rope_scaling)
    # transformers 5 still reads rope_parameters, unchanged by the extra keys
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(base).rope_parameters
