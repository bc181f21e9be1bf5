"""Fine-tune and export of moekit's Phixtral (Phi-2 experts): the expert names stay those of the checkpoint."""

from __future__ import annotations

import json

import torch
from test_finetune_train import QUICK, changed_tensors, toy_conversations, write_jsonl
from test_phi_build import family, recipe

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.finetune.export import export, load_finetuned
from moekit.finetune.options import FinetuneOptions
from moekit.finetune.trainer import finetune
from moekit.recipe import parse_recipe


def test_phixtral_expert_and_router_finetune_exports_exactly(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    models = family(tmp_path / "phi", "phi", tiny_tokenizer)
    moe = tmp_path / "moe"
    build(parse_recipe(recipe(models["base"], [models["e0"], models["e1"]])), moe, BuildOptions(device="cpu"))
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(16))
    out = tmp_path / "ft"
    result = finetune(moe, out, FinetuneOptions(data=str(data), max_steps=3, target="experts,gate", experts="1", **QUICK))
    assert result.trainable.to_dict()["by_expert"].keys() == {"1"}
    assert all("aux_loss" in json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line)

    exported = export(out, tmp_path / "exported", merge_into="original")
    assert changed_tensors(moe, exported) == {
        f"model.layers.{layer}.mlp.{name}" for layer in range(2) for name in ("gate.weight", "experts.1.fc1.weight", "experts.1.fc2.weight")
    }
    ids = tiny_tokenizer(["1 + 2 = 3. The quick brown fox."], return_tensors="pt").input_ids
    merged, _ = load_finetuned(out, dtype=torch.float32, device="cpu", merge_into="original")
    plain = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, merged(ids).logits, atol=1e-5)
        merged_logits = merged(ids).logits

    # merged into the dequantized 4-bit weights: every quantized linear weight differs from the original-weights
    # export (attention, all experts), never a bias, norm, embedding or lm_head
    quantized = changed_tensors(exported, export(out, tmp_path / "dequantized", merge_into="dequantized"))
    assert {key for key in quantized if ".experts." in key} == {
        f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for layer in range(2) for e in range(2) for p in ("fc1", "fc2")
    }
    assert any(".self_attn." in key for key in quantized) and all(
        key.endswith(".weight") and "norm" not in key and "embed" not in key and "lm_head" not in key for key in quantized
    )

    # stock transformers (remote code) + PEFT, without moekit: per-expert fc1/fc2 LoRA of expert 1 and the routers
    from test_finetune_quant import run_stock_peft

    stock, report = run_stock_peft(moe, out / "adapter", ids, tmp_path, "--trust-remote-code")
    assert report["adapted"] == sorted(f"base_model.model.model.layers.{layer}.mlp.experts.1.{name}" for layer in range(2) for name in ("fc1", "fc2"))
    torch.testing.assert_close(stock, merged_logits, atol=1e-4, rtol=1e-4)
