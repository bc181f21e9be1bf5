"""The streamed gate pass: batch-size and device independence, bounded memory, calibration data,
mergekit-compatible recipes through the CLI, and the Qwen2-MoE output."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_build import PROMPTS, logits, recipe_text

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.recipe import parse_recipe
from moekit.testing import run_cli

# Routers from a bfloat16 forward pass agree with the float32 build to this (rows, cosine and relative L2);
# float32 forward passes on any device agree to float32 rounding (FLOAT32_*).
BF16_MIN_COSINE, BF16_MAX_RELATIVE = 0.9995, 0.03
FLOAT32_MIN_COSINE, FLOAT32_MAX_RELATIVE = 0.99999, 1e-4


def gate_pass(models: dict, gate_mode: str, **options):
    from transformers import AutoTokenizer

    from moekit.build.gates import router_weights
    from moekit.build.sources import open_source

    recipe = parse_recipe(recipe_text(models, gate_mode))
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    return router_weights(recipe, open_source(str(models["base"])), tokenizer, **options)


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(smallest row cosine, largest row relative L2 difference) of two (layers, experts, hidden) router stacks."""
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min().item()
    relative = ((ours - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    return cosine, relative


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "calibrated"])
def test_routers_do_not_depend_on_the_batch_size(gate_mode, llama_family):
    one = gate_pass(llama_family, gate_mode, batch_size=1)
    all_at_once = gate_pass(llama_family, gate_mode, batch_size=64)
    torch.testing.assert_close(one.routers, all_at_once.routers, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.shares, all_at_once.shares)
    assert one.texts == 9 and one.tokens > 9


@pytest.mark.parametrize("gate_mode", ["hidden", "calibrated"])
def test_bfloat16_forward_agrees_with_the_float32_build(gate_mode, llama_family):
    float32 = gate_pass(llama_family, gate_mode, forward_dtype=torch.float32)
    bfloat16 = gate_pass(llama_family, gate_mode, forward_dtype=torch.bfloat16)
    assert bfloat16.routers.dtype == torch.float32
    cosine, relative = agreement(bfloat16.routers, float32.routers)
    assert cosine >= BF16_MIN_COSINE and relative <= BF16_MAX_RELATIVE, (cosine, relative)
    assert relative > 0  # the bfloat16 pass really ran in bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "calibrated"])
def test_cuda_and_cpu_builds_give_the_same_routers(gate_mode, llama_family):
    cpu = gate_pass(llama_family, gate_mode, device="cpu")
    cuda = gate_pass(llama_family, gate_mode, device="cuda")
    cosine, relative = agreement(cuda.routers, cpu.routers)
    assert cosine >= FLOAT32_MIN_COSINE and relative <= FLOAT32_MAX_RELATIVE, (cosine, relative)
    cuda_bf16 = gate_pass(llama_family, gate_mode, device="cuda", forward_dtype=torch.bfloat16)
    cosine, relative = agreement(cuda_bf16.routers, cpu.routers)
    assert cosine >= BF16_MIN_COSINE and relative <= BF16_MAX_RELATIVE, (cosine, relative)


def test_one_decoder_layer_in_memory_at_a_time(llama_family, tiny_tokenizer):
    from moekit.build.gates import stream_layers, tokenize_prompts
    from moekit.build.sources import open_source

    recipe = parse_recipe(recipe_text(llama_family))
    seen = []
    for step in stream_layers(open_source(str(llama_family["base"])), tokenize_prompts(recipe, tiny_tokenizer), batch_size=4):
        seen.append(step._layer)
        loaded = [layer for layer in seen if any(p.device.type != "meta" for p in layer.parameters())]
        assert loaded == [step._layer]
    assert len(seen) == 2 and all(p.device.type == "meta" for layer in seen for p in layer.parameters())


def test_metadata_records_how_the_routers_were_made(llama_family, tmp_path):
    out = tmp_path / "moe"
    build(parse_recipe(recipe_text(llama_family, "hidden")), out, BuildOptions(device="cpu", gate_batch_size=2))
    record = json.loads((out / "moekit.json").read_text())["gate_pass"]
    assert record["device"] == "cpu" and record["forward_dtype"] == "float32" and record["router_dtype"] == "float32"
    assert record["batch_size"] == 2 and record["texts"] == 9


def write_domain_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    code = "\n\n".join(f"def f{i}(a, b):\n    return a + b * {i}\nimport os\nprint(os.getcwd())" for i in range(30))
    (root / "code.txt").write_text(code)
    lines = [json.dumps({"id": i, "text": f"The quick brown fox {i} jumps over the lazy dog. Once upon a time, a poem about the sea."}) for i in range(30)]
    (root / "prose.jsonl").write_text("\n".join(lines) + "\n")
    return {"code": root / "code.txt", "prose": root / "prose.jsonl"}


def calibration_recipe(models: dict, files: dict, max_tokens: int = 300) -> str:
    return textwrap.dedent(f"""
        base_model: {models["base"]}
        gate_mode: calibrated
        dtype: float32
        experts_per_token: 1
        experts:
          - source_model: {models["e0"]}
            moekit:
              calibration: {{data: {files["code"]}, max_tokens: {max_tokens}, chunk_tokens: 64}}
          - source_model: {models["e1"]}
            positive_prompts: ["Write a poem about the sea."]
            moekit:
              calibration: {{data: {files["prose"]}, max_tokens: {max_tokens}}}
    """)


def test_calibration_data_instead_of_prompts(llama_family, tmp_path):
    files = write_domain_files(tmp_path / "data")
    out = tmp_path / "moe"
    build(parse_recipe(calibration_recipe(llama_family, files)), out, BuildOptions(device="cpu"))
    record = json.loads((out / "moekit.json").read_text())["gate_pass"]
    assert all(0 < tokens <= 300 for tokens in record["calibration_tokens"])
    routing = json.loads((out / "routing" / "routing.json").read_text())
    assert min(routing["own_expert_share"]["mean_per_expert"]) > 0.9  # top-1 of 2: each domain routes to its expert

    # held-out text of each domain goes to its expert in the built model, at every layer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for expert, text in ((0, "def g(x, y):\n    return x * y\nimport sys"), (1, "A lazy dog and a quick brown fox, once upon a time.")):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            router_logits = model(ids, output_router_logits=True).router_logits
        chosen = torch.cat([layer.reshape(-1, 2).argmax(-1) for layer in router_logits])
        assert (chosen == expert).float().mean() > 0.7


def test_calibration_data_problems_are_one_message(llama_family, tmp_path, capsys):
    files = write_domain_files(tmp_path / "data")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(calibration_recipe(llama_family, dict(files, code=tmp_path / "missing.txt")))
    code, output = run_cli(["build", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code != 0 and "Traceback" not in output
    assert "calibration data" in output and "missing.txt" in output and "does not exist" in output
    assert not (tmp_path / "out").exists()


def test_mergekit_upcycling_and_ignored_keys_through_the_cli(llama_family, tmp_path, capsys):
    """mergekit's sparse-upcycling example (one model, random gates) and keys mergekit ignores build, with notes."""
    recipe = tmp_path / "upcycle.yaml"
    experts = "".join(f"  - source_model: {llama_family['base']}\n" for _ in range(4))
    recipe.write_text(f"base_model: {llama_family['base']}\ngate_mode: random\ntokenizer:\n  source: union\nexperts:\n{experts}")
    code, output = run_cli(["build", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 0, output
    assert "note: ignored key 'tokenizer'" in output and "sparse upcycling" in output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4


def test_identical_experts_still_refused_under_prompt_modes(llama_family, tmp_path, capsys):
    models = dict(llama_family, e1=llama_family["e0"], e2=llama_family["e0"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(models, "hidden"))
    code, output = run_cli(["build", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code != 0 and "are the same model" in output and "--allow-same-experts" in output


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    from moekit.testing import make_dense_checkpoint

    root = tmp_path_factory.mktemp("qwen2")
    base = make_dense_checkpoint(root / "base", "qwen2", seed=20, tokenizer=tiny_tokenizer)
    return {"base": base, "e0": make_dense_checkpoint(root / "e0", base=base, seed=21, mlp_noise=0.5)}


def qwen2_recipe(models: dict, gate_mode: str = "hidden", routed=("base", "base"), residual_scale: float = 0.0) -> str:
    experts = "".join(f"  - source_model: {models[name]}\n    positive_prompts: {json.dumps(PROMPTS[f'e{i}'])}\n" for i, name in enumerate(routed))
    return (
        f"base_model: {models['base']}\ngate_mode: {gate_mode}\ndtype: float32\nexperts_per_token: 1\nexperts:\n{experts}"
        f'shared_experts:\n  - source_model: {models["e0"]}\n    positive_prompts: ["hello"]\n    residual_scale: {residual_scale}\n'
    )


@pytest.mark.parametrize("gate_mode", ["hidden", "calibrated", "random"])
def test_qwen2_moe_of_identical_experts_equals_the_base(gate_mode, qwen2_family, tmp_path, input_ids):
    """Routed weights renormalise to one and a shared expert scaled by 0 adds nothing: the base model, whatever the routers."""
    out = tmp_path / "moe"
    result = build(parse_recipe(qwen2_recipe(qwen2_family, gate_mode)), out, BuildOptions(device="cpu", allow_same_experts=True))
    assert result.plan.architecture == "qwen2_moe"
    torch.testing.assert_close(logits(out, input_ids), logits(qwen2_family["base"], input_ids), atol=1e-5, rtol=1e-5)


def test_qwen2_moe_loads_in_plain_transformers(qwen2_family, tmp_path, input_ids):
    out = tmp_path / "moe"
    result = build(parse_recipe(qwen2_recipe(qwen2_family, routed=("base", "e0"), residual_scale=0.1)), out, BuildOptions(device="cpu"))
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        block = model.model.layers[1].mlp
        print(type(model).__name__, sum(p.numel() for p in model.parameters()), block.shared_expert_gate.weight.shape[0], "moekit" in sys.modules)
        print(model(torch.tensor({input_ids.tolist()})).logits.sum().item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=True)
    (name, parameters, shared_rows, imported), (total,) = (line.split() for line in done.stdout.strip().splitlines())
    assert name == "Qwen2MoeForCausalLM" and int(parameters) == result.plan.parameters_total and shared_rows == "1" and imported == "False"
    assert abs(float(total) - logits(out, input_ids).sum().item()) < 1e-2


def test_finetune_says_it_cannot_take_qwen2_moe_yet(qwen2_family, tmp_path, capsys):
    out = tmp_path / "moe"
    build(parse_recipe(qwen2_recipe(qwen2_family)), out, BuildOptions(device="cpu", allow_same_experts=True))
    code, output = run_cli(["finetune", str(out), "-o", str(tmp_path / "ft"), "--data", str(tmp_path / "none.jsonl")], capsys)
    assert code != 0 and "Traceback" not in output
    assert "cannot take Qwen2-MoE" in output and output.count("error:") == 1


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    return tiny_tokenizer(["def add(a, b): the quick brown fox 12 + 30"], return_tensors="pt")["input_ids"]


def test_calibrated_fit_keeps_a_bounded_sample_of_tokens(llama_family, tiny_tokenizer):
    from moekit.build.gates import NEGATIVE, fit_sample, tokenize_prompts

    text = recipe_text(llama_family, "calibrated").replace(
        "    positive_prompts: " + json.dumps(PROMPTS["e0"]),
        "    positive_prompts: " + json.dumps(PROMPTS["e0"]) + '\n    negative_prompts: ["Once upon a time"]',
    )
    prompts = tokenize_prompts(parse_recipe(text), tiny_tokenizer)
    sample = fit_sample(prompts, 3, max_tokens=5, seed=0)
    for expert in range(3):
        for against in (False, True):
            texts = [i for i in range(len(prompts)) if prompts.expert[i] == expert and (prompts.kind[i] == NEGATIVE) == against]
            available = sum(len(prompts.input_ids[i]) - 1 for i in texts)
            assert sum(int(sample[i].sum()) for i in texts) == min(5, available)
    assert not any(mask[0] for mask in sample)  # never the BOS token
    everything = fit_sample(prompts, 3, max_tokens=10**6, seed=0)
    assert sum(int(m.sum()) for m in everything) == prompts.tokens - len(prompts)


def test_calibration_data_from_a_dataset(tmp_path, tiny_tokenizer):
    """`hf:NAME[:split]` goes through datasets.load_dataset (here a local data directory, as offline as a cached Hub dataset)."""
    from moekit.build.calibration import load_calibration
    from moekit.recipe import CalibrationData

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": f"def f{i}(a, b): return a + b"}) + "\n" for i in range(50)))
    chunks = load_calibration(CalibrationData(data=f"hf:{folder}:train", max_tokens=100, chunk_tokens=16, text_field="body"), tiny_tokenizer, "0")
    assert sum(len(c) for c in chunks) == 100 and all(len(c) <= 16 and c[0] == tiny_tokenizer.bos_token_id for c in chunks)
    assert tiny_tokenizer.decode(chunks[0][1:]).startswith("def f0(a, b)")


def test_qwen2_moe_dry_run_names_every_source(qwen2_family, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(qwen2_recipe(qwen2_family, routed=("base", "e0")).replace("dtype: float32\n", "dtype: float32\narchitecture: qwen\n"))
    code, output = run_cli(["build", str(recipe), "--dry-run"], capsys)
    assert code == 0, output
    assert "qwen2_moe (2 experts, top-1" in output and "shared_expert_gate.weight" in output and "<- shared expert (" in output
