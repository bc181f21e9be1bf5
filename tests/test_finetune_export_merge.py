"""`moekit export --merge-into dequantized|original`: what the LoRA delta is added to.

dequantized (the default): the base quantized as in training, then dequantized; the adapter was trained against
these weights, so the export computes what the trained model computed. original: the base's unquantized weights.
The oracle for the quantized weights is bitsandbytes' own quantize/dequantize round trip of the base checkpoint's
tensors, independent of moekit's loaders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_finetune_train import QUICK, changed_tensors, logits, toy_conversations, write_jsonl

from moekit.finetune.export import _checkpoint_state_dict, _checkpoint_tensor_names, load_finetuned
from moekit.finetune.options import FinetuneOptions
from moekit.finetune.trainer import finetune
from moekit.testing import run_cli

LAYERS = range(2)
ATTENTION = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for layer in LAYERS for p in "qkvo"]
EXPERTS = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for layer in LAYERS for e in range(3) for w in ("w1", "w2", "w3")]
ROUTERS = [f"model.layers.{layer}.block_sparse_moe.gate.weight" for layer in LAYERS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_merge")


@pytest.fixture(scope="module")
def moe(random_moe) -> Path:
    return random_moe


@pytest.fixture(scope="module", params=[4, 8])
def trained(request, moe, workdir) -> tuple[Path, int]:
    """QLoRA on attention, all experts and the routers, at 4 or 8 bits."""
    bits = request.param
    data = write_jsonl(workdir / "chat.jsonl", toy_conversations())
    out = workdir / f"full-{bits}bit"
    finetune(moe, out, FinetuneOptions(data=str(data), max_steps=8, bits=bits, **QUICK))
    return out, bits


def base_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


def roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` quantized and dequantized by bitsandbytes as training stores it: NF4 (blocks of 64, double-quantized
    absmax, over the flattened tensor) or LLM.int8 row-wise absmax (float16 rows)."""
    import bitsandbytes as bnb

    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(weight.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnb.functional.dequantize_4bit(packed, state).view(weight.shape)
    rows = weight.reshape(-1, weight.shape[-1]).half()
    quantized, row_absmax, _ = bnb.functional.int8_vectorwise_quant(rows)
    return bnb.functional.int8_vectorwise_dequant(quantized, row_absmax).view(weight.shape)


def quantized_reference(moe: Path, bits: int) -> dict[str, torch.Tensor]:
    """{checkpoint name: dequantized weight} for every weight training quantizes: attention projections one by one,
    each layer's experts stacked per projection as training stores them ((E, 2I, H) gate/up, (E, H, I) down)."""
    tensors = base_tensors(moe)
    reference = {key: roundtrip(tensors[key].float(), bits) for key in ATTENTION}
    for layer in LAYERS:
        name = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = torch.stack([torch.cat([tensors[f"{name}.{e}.w1.weight"], tensors[f"{name}.{e}.w3.weight"]]) for e in range(3)]).float()
        down = torch.stack([tensors[f"{name}.{e}.w2.weight"] for e in range(3)]).float()
        gate_up, down = roundtrip(gate_up, bits), roundtrip(down, bits)
        inter = down.shape[-1]
        for e in range(3):
            reference[f"{name}.{e}.w1.weight"], reference[f"{name}.{e}.w3.weight"] = gate_up[e, :inter], gate_up[e, inter:]
            reference[f"{name}.{e}.w2.weight"] = down[e]
    return reference


def zero_adapter(finetune_dir: Path, out: Path) -> Path:
    """A copy of `finetune_dir` whose LoRA B matrices are zero: merging it adds exactly nothing."""
    shutil.copytree(finetune_dir, out)
    weights = out / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    return out


def merged_tensors(finetune_dir: Path, moe: Path, merge_into: str) -> dict[str, torch.Tensor]:
    model, _ = load_finetuned(finetune_dir, dtype=torch.float32, merge_into=merge_into)
    return _checkpoint_state_dict(model, _checkpoint_tensor_names(moe), {})[0]


def test_zero_adapter_merged_into_dequantized_gives_the_quantized_weights_bit_for_bit(trained, moe, tmp_path):
    finetune_dir, bits = trained
    merged = merged_tensors(zero_adapter(finetune_dir, tmp_path / "zero"), moe, "dequantized")
    reference = quantized_reference(moe, bits)
    original = base_tensors(moe)
    for key, weight in reference.items():
        if bits == 4:
            assert torch.equal(merged[key], weight), key
        else:  # bitsandbytes' int8 dequantization and the expert storage's round differently in the last bit
            torch.testing.assert_close(merged[key], weight, rtol=1e-6, atol=0, msg=key)
        assert not torch.equal(merged[key], original[key]), key  # the quantization error is there
    for key in set(original) - set(reference) - set(ROUTERS):  # embeddings, norms, lm_head: never quantized
        assert torch.equal(merged[key], original[key]), key


def test_zero_adapter_merged_into_original_gives_the_original_weights(trained, moe, tmp_path):
    finetune_dir, _bits = trained
    merged = merged_tensors(zero_adapter(finetune_dir, tmp_path / "zero"), moe, "original")
    original = base_tensors(moe)
    assert {key for key in original if not torch.equal(merged[key], original[key])} == set(ROUTERS)  # the trained routers


def trained_model_logits(finetune_dir: Path, moe: Path, bits: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The model as trained: the base quantized, the adapter attached, 4-bit layers computing as in training."""
    from moekit.finetune.adapter import load_adapter
    from moekit.finetune.loading import load_for_training

    model = load_for_training(moe, bits=bits, compute_dtype=torch.float32, device_map="cpu")
    model, counts = load_adapter(model, finetune_dir / "adapter")
    assert counts["lora_modules"] and counts["expert_blocks"] and counts["routers"]
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False  # not bitsandbytes' bf16 CPU inference kernel
    return logits(model.eval(), input_ids)


def test_the_dequantized_export_computes_what_was_trained(trained, moe, tmp_path, capsys, tiny_tokenizer):
    """Exported through the CLI: --merge-into dequantized reproduces the trained 4-bit model's logits, and is closer
    to the trained 8-bit model's than the default, merging into the original weights. Each export records its mode."""
    from transformers import AutoModelForCausalLM

    finetune_dir, bits = trained
    ids = tiny_tokenizer(["3 + 4 = 7. The quick brown fox."], return_tensors="pt").input_ids
    expected = trained_model_logits(finetune_dir, moe, bits, ids)
    errors = {}
    for mode, args in (("dequantized", ["--merge-into", "dequantized"]), ("original", [])):
        out = tmp_path / mode
        code, output = run_cli(["export", str(finetune_dir), "-o", str(out), *args], capsys)
        assert code == 0, output
        metadata = json.loads((out / "moekit.json").read_text())
        assert metadata["finetune"]["merge_into"] == mode and metadata["finetune"]["bits"] == bits
        assert ("dequantized" in (out / "README.md").read_text()) == (mode == "dequantized")
        changed = changed_tensors(moe, out)
        assert changed == (set(ATTENTION) | set(EXPERTS) | set(ROUTERS)), mode  # everything trained or quantized
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        errors[mode] = (logits(exported, ids) - expected).abs().max().item()
    if bits == 4:  # the 4-bit layers compute x @ dequantized W: the same function, up to float32 rounding
        assert errors["dequantized"] < 1e-4, errors
        assert errors["original"] > 10 * max(errors["dequantized"], 1e-5), errors
    else:  # LLM.int8 also quantizes the activations (and keeps outlier columns in float16): closer, not equal
        assert errors["dequantized"] < 0.75 * errors["original"], errors


def test_dequantized_export_refuses_an_adapter_that_did_not_train(trained, tmp_path, capsys):
    finetune_dir, _bits = trained
    broken = zero_adapter(finetune_dir, tmp_path / "broken")
    out = tmp_path / "merged"
    code, output = run_cli(["export", str(broken), "-o", str(out), "--merge-into", "dequantized"], capsys)
    assert code != 0 and "unchanged although trained" in output and "block_sparse_moe.experts.0.w1" in output
    assert not out.exists()


def test_dequantized_export_without_bitsandbytes_says_how_to_export(trained, tmp_path, capsys, monkeypatch):
    finetune_dir, bits = trained
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    code, output = run_cli(["export", str(finetune_dir), "-o", str(tmp_path / "out"), "--merge-into", "dequantized"], capsys)
    assert code != 0 and "needs bitsandbytes" in output and "--merge-into original" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_dequantizing_after_a_cpu_forward_is_exact_or_refused(moe, tiny_tokenizer):
    """bitsandbytes repacks a 4-bit weight at its first eval-mode CPU forward on avx512_bf16 CPUs, after which
    `dequantize_4bit(weight.data, ...)` reads it wrongly: `dequantize_moe` gives the weights of a fresh model or refuses."""
    from moekit.errors import TrainingError
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.quantize import dequantize_moe

    fresh = load_for_training(moe, bits=4, compute_dtype=torch.float32, device_map="cpu")
    dequantize_moe(fresh, torch.float32)
    used = load_for_training(moe, bits=4, compute_dtype=torch.float32, device_map="cpu").eval()
    logits(used, tiny_tokenizer(["1 + 2 = 3"], return_tensors="pt").input_ids)
    repacked = any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False) for m in used.modules() if type(m).__name__ == "Linear4bit")
    if repacked:
        with pytest.raises(TrainingError, match="repacked"):
            dequantize_moe(used, torch.float32)
    else:
        dequantize_moe(used, torch.float32)
        names = _checkpoint_tensor_names(moe)
        ours, theirs = _checkpoint_state_dict(used, names, {})[0], _checkpoint_state_dict(fresh, names, {})[0]
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_the_cpu_quantizes_as_the_gpu_did(bits):
    """Training quantizes on the GPU; `export --merge-into dequantized` quantizes the base again on the CPU. Both
    must choose the same codes, for the experts' storage and for bitsandbytes' Params4bit / Int8Params (attention),
    and dequantize to the same weights up to the rounding of the constants (a float32 mean/max on two devices)."""
    import bitsandbytes as bnb

    from moekit.finetune.expert_storage import quantize_tensor

    torch.manual_seed(0)
    experts = torch.randn(4, 384, 256, dtype=torch.bfloat16) * 0.02  # (experts, out, in)
    cpu, gpu = (quantize_tensor(experts, bits=bits, compute_dtype=torch.bfloat16, quant_storage=torch.uint8, device=d) for d in ("cpu", "cuda"))
    assert_same_codes(cpu.weight, gpu.weight.cpu(), bits)
    step = 0 if bits == 4 else float(experts.abs().max()) / 127  # 8-bit: one code apart where a weight sits on a rounding boundary
    torch.testing.assert_close(cpu.dequantize(), gpu.dequantize().cpu(), rtol=2**-7, atol=step)  # one bf16 step (4-bit)

    linear = experts[0]  # (out, in)
    if bits == 4:
        on_cpu, on_gpu = (bnb.nn.Params4bit(linear, requires_grad=False, compress_statistics=True, quant_type="nf4").to(d) for d in ("cpu", "cuda"))
        assert torch.equal(on_cpu.data, on_gpu.data.cpu())
        weights = [bnb.functional.dequantize_4bit(p.data, p.quant_state).cpu() for p in (on_cpu, on_gpu)]
    else:
        on_cpu, on_gpu = (bnb.nn.Int8Params(linear, requires_grad=False, has_fp16_weights=False).to(d) for d in ("cpu", "cuda"))
        assert_same_codes(on_cpu.CB, on_gpu.CB.cpu(), bits)
        weights = [bnb.functional.int8_vectorwise_dequant(p.CB, p.SCB).cpu() for p in (on_cpu, on_gpu)]
    torch.testing.assert_close(weights[0], weights[1], rtol=2**-7, atol=step)


def assert_same_codes(cpu: torch.Tensor, gpu: torch.Tensor, bits: int) -> None:
    """NF4: the same codes. LLM.int8: bitsandbytes' CPU and CUDA kernels round x * 127 / absmax differently at .5,
    so a few codes may differ by one (measured on an H200: see docs/finetune.md, "Which weights to merge into")."""
    if bits == 4:
        assert torch.equal(cpu, gpu)
        return
    difference = (cpu.int() - gpu.int()).abs()
    assert int(difference.max()) <= 1 and float((difference > 0).float().mean()) < 0.01, (int(difference.max()), float((difference > 0).float().mean()))
