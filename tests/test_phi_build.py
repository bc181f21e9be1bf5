"""`moekit build` from Phi checkpoints: Phi-2 -> Phixtral, Phi-3 -> Mixtral, and the inputs that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.recipe import load_recipe, parse_recipe
from moekit.testing import run_cli

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [["def add(a, b): return a + b", "import os"], ["The quick brown fox jumps.", "Write a poem about the sea."], ["12 + 30 = 42", "7 * 6 = 42"]]


def recipe(base: Path, experts: list[Path], gate_mode: str = "random", top_k: int = 2) -> str:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: float32", f"experts_per_token: {top_k}", "experts:"]
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: {json.dumps(PROMPTS[index % 3])}"]
    return "\n".join(lines) + "\n"


def family(root: Path, arch: str, tokenizer, **overrides) -> dict[str, Path]:
    from moekit.testing import make_dense_checkpoint

    base = make_dense_checkpoint(root / "base", arch, seed=0, tokenizer=tokenizer, **overrides)
    return {"base": base, **{f"e{i}": make_dense_checkpoint(root / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5) for i in range(2)}}


@pytest.fixture(scope="module")
def phi2(tmp_path_factory, tiny_tokenizer):
    return family(tmp_path_factory.mktemp("phi2"), "phi", tiny_tokenizer)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, tiny_tokenizer):
    # a sliding window shorter than the test generations, as Phi-3-mini-4k has (2047)
    return family(tmp_path_factory.mktemp("phi3"), "phi3", tiny_tokenizer, sliding_window=6)


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer):
    return tiny_tokenizer(["def add(a, b): the quick brown fox 12 + 30"], return_tensors="pt")["input_ids"]


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_same_model(moe, base, prompt):
    with torch.no_grad():
        torch.testing.assert_close(moe(prompt).logits, base(prompt).logits, atol=1e-5, rtol=1e-5)
    expected = base.generate(prompt[:, :5], max_new_tokens=20, min_new_tokens=20, do_sample=False)
    for use_cache in (True, False):
        generated = moe.generate(prompt[:, :5], max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=use_cache)
        assert torch.equal(generated, expected), f"use_cache={use_cache}"


@pytest.mark.parametrize("arch", ["phi2", "phi3"])
def test_moe_of_identical_experts_equals_its_base(arch, request, tmp_path, prompt):
    models = request.getfixturevalue(arch)
    out = tmp_path / "moe"
    build(parse_recipe(recipe(models["base"], [models["base"]] * 3)), out, BuildOptions(device="cpu", allow_same_experts=True))
    config = json.loads((out / "config.json").read_text())
    if arch == "phi3":  # a plain transformers Mixtral, no custom code
        assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
        assert config["sliding_window"] == 6
    else:
        assert config["architectures"] == ["PhixtralForCausalLM"] and config["auto_map"]["AutoModelForCausalLM"]
        assert (out / "modeling_phixtral.py").is_file() and (out / "configuration_phixtral.py").is_file()
    assert_same_model(load(out), load(models["base"]), prompt)


@pytest.mark.parametrize("chosen", [1, 2])
def test_phi3_forced_top1_routing_gives_that_experts_mlp(phi3, tmp_path, chosen):
    """Through the built Mixtral: routing everything to expert k gives expert k's own (fused) Phi-3 MLP."""
    experts = [phi3["base"], phi3["e0"], phi3["e1"]]
    out = tmp_path / "moe"
    build(parse_recipe(recipe(phi3["base"], experts, top_k=1)), out, BuildOptions(device="cpu"))
    block = load(out).model.layers[1].mlp
    reference = load(experts[chosen]).model.layers[1].mlp
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
    with torch.no_grad():
        block.gate.weight.copy_(-direction.expand(3, 64))
        block.gate.weight[chosen] = direction
        hidden = torch.randn(1, 7, 64) * 0.1 + direction  # every token points along `direction`
        torch.testing.assert_close(block(hidden), reference(hidden), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "calibrated", "uniform_random"])
def test_phi2_gate_modes_build_loadable_phixtral(gate_mode, phi2, tmp_path, prompt):
    out = tmp_path / "moe"
    result = build(parse_recipe(recipe(phi2["base"], [phi2["base"], phi2["e0"], phi2["e1"]], gate_mode)), out, BuildOptions(device="cpu"))
    metadata = json.loads((out / "moekit.json").read_text())
    assert metadata["architecture"] == "phixtral" and metadata["trust_remote_code"] is True
    moe = load(out)
    assert type(moe).__name__ == "PhixtralForCausalLM"
    assert result.plan.parameters_total == sum(p.numel() for p in moe.parameters())
    with torch.no_grad():
        assert moe(prompt).logits.isfinite().all()
    if gate_mode in ("hidden", "cheap_embed"):  # unit rows, one per expert
        torch.testing.assert_close(moe.model.layers[0].mlp.gate.weight.norm(dim=-1), torch.ones(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,base_class", [("phi2", "PhiForCausalLM"), ("phi3", "Phi3ForCausalLM")])
def test_router_input_is_what_the_moe_block_sees(arch, base_class, request, tiny_tokenizer):
    """Phi-2's router sees the shared input LayerNorm output; Phi-3's the post-attention norm output."""
    from moekit.build.gates import stream_layers, tokenize_prompts
    from moekit.build.sources import open_source

    models = request.getfixturevalue(arch)
    source = open_source(str(models["base"]))
    parsed = parse_recipe(recipe(models["base"], [models["e0"], models["e1"]], "hidden"))
    prompts = tokenize_prompts(parsed, tiny_tokenizer)
    base = load(models["base"])
    assert type(base).__name__ == base_class
    checked = 0
    for step in stream_layers(source, prompts, batch_size=2):  # several batches, padded to different lengths
        layer = base.model.layers[step.index]
        for batch in step.run():
            residual = batch.residual
            with torch.no_grad():
                if arch == "phi2":
                    expected = layer.input_layernorm(residual)
                else:
                    position_ids = torch.arange(residual.shape[1])[None]
                    cos_sin = base.model.rotary_emb(residual, position_ids)
                    from transformers.masking_utils import create_sliding_window_causal_mask

                    # no cache: passed by position, its keyword is `past_key_values` before transformers 5.2x and `cache` after
                    mask = create_sliding_window_causal_mask(base.config, residual, batch.attention_mask, None, position_ids=position_ids)
                    attn, _ = layer.self_attn(layer.input_layernorm(residual), position_embeddings=cos_sin, attention_mask=mask)
                    expected = layer.post_attention_layernorm(residual + attn)
            real = batch.attention_mask.bool()
            torch.testing.assert_close(batch.router_input[real], expected[real], atol=1e-5, rtol=1e-4)
            checked += int(real.sum())
    assert checked == 2 * prompts.tokens  # every real token of every prompt, at both layers


def assert_refused(tmp_path: Path, text: str, capsys, *expected: str) -> None:
    recipe_path, out = tmp_path / "r.yaml", tmp_path / "out"
    recipe_path.write_text(text)
    code, output = run_cli(["build", str(recipe_path), "-o", str(out)], capsys)
    assert code != 0 and "Traceback" not in output
    for fragment in expected:
        assert fragment in output, output
    assert not out.exists() and not list(tmp_path.glob(".out*")), "something was written"


def test_mixing_phi2_expert_into_phi3_base_is_refused(phi2, phi3, tmp_path, capsys):
    text = recipe(phi3["base"], [phi3["e0"], phi2["e1"]])
    assert_refused(tmp_path, text, capsys, f"expert 1 ({phi2['e1']})", "PhiForCausalLM", "Phi3ForCausalLM")


@pytest.mark.parametrize(
    "overrides,setting",
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}, "partial_rotary_factor=0.75"),
        (
            {
                "max_position_embeddings": 64,
                "original_max_position_embeddings": 16,
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "partial_rotary_factor": 1.0,
                    "original_max_position_embeddings": 16,
                },
            },
            "'longrope'",
        ),
    ],
    ids=["partial-rotary", "longrope"],
)
def test_phi3_settings_mixtral_cannot_express_are_refused(overrides, setting, tmp_path, tiny_tokenizer, capsys):
    from moekit.testing import make_dense_checkpoint

    base = make_dense_checkpoint(tmp_path / "models" / "base", "phi3", tokenizer=tiny_tokenizer, **overrides)
    expert = make_dense_checkpoint(tmp_path / "models" / "expert", base=base, seed=1)
    assert_refused(tmp_path, recipe(base, [base, expert]), capsys, "Mixtral", setting)


def test_phi_msft_layout_is_refused(tmp_path, phi2, capsys):
    legacy = tmp_path / "models" / "phi-msft"
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text(
        json.dumps({"model_type": "phi-msft", "architectures": ["PhiForCausalLM"], "auto_map": {"AutoConfig": "configuration_phi.PhiConfig"}, "n_embd": 64})
    )
    save_file({"transformer.h.0.mixer.Wqkv.weight": torch.zeros(192, 64), "layers.0.mlp.fc1.weight": torch.zeros(128, 64)}, legacy / "model.safetensors")
    assert_refused(tmp_path, recipe(phi2["base"], [phi2["e0"], legacy]), capsys, "phi-msft", str(legacy))


@pytest.mark.parametrize("name,base", [("phixtral-4x2_8.yaml", "microsoft/phi-2"), ("phi3-4x3_8b.yaml", "microsoft/Phi-3-mini-4k-instruct")])
def test_shipped_phi_recipes_parse(name, base):
    parsed = load_recipe(REPO / "recipes" / name)
    assert parsed.base_model == base and len(parsed.experts) == 4
    assert all(expert.positive_prompts and "/" in expert.source_model for expert in parsed.experts)
