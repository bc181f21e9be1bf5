"""How close is `moekit plan` to the memory a real fine-tune uses? Predicted vs measured peak, on a GPU.

For each shape, an MoE (Mixtral or Phixtral) with random weights is built directly in GPU memory the way `moekit finetune`
holds it: the model is created on the meta device, then each decoder layer is materialized on the GPU,
filled with random values and quantized by `moekit.finetune.quantize.quantize_moe` (experts unfused into
per-expert NF4 linears) before the next one, so the bf16 model never exists whole. Then
`moekit.finetune.targets.apply_targets` wraps it and the trainer's own `MoeSFTTrainer` (TRL SFTTrainer,
bf16 autocast, gradient checkpointing, router aux loss, AdamW) runs a few optimizer steps on full-length
random token sequences. The measured peak is `torch.cuda.max_memory_allocated()` over those steps (peak
stats reset before each configuration; the optimizer states of step 1 exist during steps 2+), compared
with `moekit.plan.estimate(...).peak_bytes` for the same config and options.

Each shape runs in its own subprocess. Usage (GPU machine, from the repository root):

    python benchmarks/plan_accuracy.py --out results/            # the README table (4x7b, 8x7b)
    python benchmarks/plan_accuracy.py --out held_out/ --groups 4x7b-variants,4x7b-bf16,4x7b-int8,phixtral-4x2.7b
    python benchmarks/plan_accuracy.py --tiny --out /tmp/plan    # a CPU smoke test of the same path
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FOUR_BY_7B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
EIGHT_BY_7B = dict(FOUR_BY_7B, num_local_experts=8)
# Phi-2 shape (2.7B) with 4 fc1/fc2 experts per layer, top-2
PHIXTRAL_4X = {
    "num_hidden_layers": 32,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 51200,
    "partial_rotary_factor": 0.4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
TINY_PHI = dict(TINY, num_key_value_heads=4, partial_rotary_factor=0.5)

LORA = {"target": ["attn", "experts"]}


def lora_runs(pairs, **extra):
    return [
        (f"attn+experts r16, seq {s}, batch {b}" + "".join(f", {k}={v}" for k, v in extra.items()), {**LORA, "max_seq_len": s, "batch_size": b, **extra})
        for s, b in pairs
    ]


# name -> (architecture, config overrides, bits, [(label, options overrides)]); runs that change the
# targets come in an order that lets one model serve them (router-only first, no checkpointing last)
GROUPS = {
    "4x7b": (
        "mixtral",
        FOUR_BY_7B,
        4,
        [("router-only, seq 1024, batch 2", {"target": ["gate"], "max_seq_len": 1024, "batch_size": 2})]
        + lora_runs([(s, b) for s in (512, 1024) for b in (1, 2, 4)])
        + [
            ("attn+experts r16, seq 1024, batch 2, adamw_8bit", {**LORA, "max_seq_len": 1024, "batch_size": 2, "optimizer": "adamw_8bit"}),
            ("attn+experts r16, seq 512, batch 1, no checkpointing", {**LORA, "max_seq_len": 512, "batch_size": 1, "gradient_checkpointing": False}),
        ],
    ),
    "8x7b": ("mixtral", EIGHT_BY_7B, 4, lora_runs([(1024, 2), (512, 4)])),
    # held out: settings the constants were not looked at for
    "4x7b-variants": (
        "mixtral",
        FOUR_BY_7B,
        4,
        [
            ("attn only r16, seq 2048, batch 2", {"target": ["attn"], "max_seq_len": 2048, "batch_size": 2}),
            (
                "experts 0,1 of layers 0-15 r64, no dropout, seq 2048, batch 1",
                {"target": ["experts"], "experts": [0, 1], "layers": list(range(16)), "lora_r": 64, "lora_dropout": 0.0, "max_seq_len": 2048, "batch_size": 1},
            ),
            ("all targets r16, seq 4096, batch 1", {"target": ["attn", "experts", "gate"], "max_seq_len": 4096, "batch_size": 1}),
        ],
    ),
    "4x7b-bf16": ("mixtral", FOUR_BY_7B, 16, lora_runs([(1024, 2)], bits=16)),
    "4x7b-int8": ("mixtral", FOUR_BY_7B, 8, lora_runs([(1024, 2)], bits=8)),
    "phixtral-4x2.7b": ("phixtral", PHIXTRAL_4X, 4, lora_runs([(1024, 2), (2048, 1)])),
}
MAIN_GROUPS = ("4x7b", "8x7b")
TINY_GROUPS = {
    "tiny": (
        "mixtral",
        TINY,
        4,
        [("router-only, seq 64, batch 2", {"target": ["gate"], "max_seq_len": 64, "batch_size": 2})]
        + lora_runs([(64, 2), (128, 1)])
        + [("attn+experts r16, seq 64, batch 2, no checkpointing", {**LORA, "max_seq_len": 64, "batch_size": 2, "gradient_checkpointing": False})],
    ),
    "tiny-phixtral": ("phixtral", TINY_PHI, 4, lora_runs([(64, 2)])),
    "tiny-int8": ("mixtral", TINY, 8, lora_runs([(64, 2)], bits=8)),
    "tiny-bf16": ("mixtral", TINY, 16, lora_runs([(64, 2)], bits=16)),
    "tiny-variants": (
        "mixtral",
        TINY,
        4,
        [
            ("attn only r16, seq 64, batch 2", {"target": ["attn"], "max_seq_len": 64, "batch_size": 2}),
            ("experts 0,1 r64, seq 64, batch 1", {"target": ["experts"], "experts": [0, 1], "lora_r": 64, "max_seq_len": 64, "batch_size": 1}),
        ],
    ),
}


def make_config(architecture: str, shape: dict):
    from transformers import MixtralConfig

    from moekit.models import register_phixtral
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

    register_phixtral()  # build_random makes models of this config with AutoModelForCausalLM

    common = {"max_position_embeddings": 4096, "tie_word_embeddings": False, "output_router_logits": True}
    if architecture == "phixtral":
        return PhixtralConfig(**shape, **common, architectures=["PhixtralForCausalLM"])
    return MixtralConfig(**shape, **common, architectures=["MixtralForCausalLM"])


def build_random(config, device, quantize_layer):
    """A random-weight model of `config` on `device`, built one decoder layer at a time: each layer is made on
    the device and handed to `quantize_layer(layer)` before the next, so the model is never whole in bf16."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)

    def materialize(module, recurse=True):
        module.to_empty(device=device, recurse=recurse)
        with torch.no_grad():
            for owner in module.modules() if recurse else [module]:
                is_norm = isinstance(owner, nn.LayerNorm) or "Norm" in type(owner).__name__
                for name, param in owner.named_parameters(recurse=False):
                    if is_norm:
                        param.fill_(1.0 if name == "weight" else 0.0)
                    else:
                        param.normal_(0.0, 0.02, generator=generator)

    for layer in model.model.layers:
        materialize(layer)
        quantize_layer(layer)
    for module in model.modules():  # embeddings, final norm, lm_head
        if any(param.is_meta for param in module.parameters(recurse=False)):
            materialize(module, recurse=False)
    # the rotary frequencies were computed on the meta device: recompute them on the real one
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model


def build_quantized(config, device, bits: int):
    """A random MoE at `bits` on `device`, quantized one layer at a time (never whole in bf16)."""
    from torch import nn

    from moekit.finetune.quantize import quantize_moe

    model = build_random(config, device, lambda layer: quantize_moe(layer, bits=bits, device=device))
    # flag the model and check the rest; the layers are done (16-bit ones would be copied again)
    layers, model.model.layers = model.model.layers, nn.ModuleList()
    quantize_moe(model, bits=bits, device=device)
    model.model.layers = layers
    model.config.use_cache = False
    return model


def quantized_bytes(model) -> int:
    """Bytes of every parameter with its quantization state (4-bit absmax, nested absmax, codes, offset;
    int8 row scales): what the plan calls weights."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    from moekit.finetune.expert_storage import ExpertStorage

    for module in model.modules():
        if isinstance(module, ExpertStorage):  # the expert block's quantization constants are buffers
            for tensor in module.buffers():
                add(tensor)
    for param in model.parameters():
        add(param)
        add(getattr(param, "SCB", None))
        state = getattr(param, "quant_state", None)
        if state is not None:
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return total


def run_group(name: str, tiny: bool, steps: int) -> list[dict]:
    import datasets
    import torch

    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.targets import apply_targets
    from moekit.finetune.trainer import _make_trainer
    from moekit.plan import estimate
    from moekit.testing import make_tokenizer

    architecture, shape, bits, runs = (TINY_GROUPS if tiny else GROUPS)[name]
    config = make_config(architecture, shape)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    started = time.time()
    model = build_quantized(config, device, bits)
    loaded = torch.cuda.memory_allocated() if cuda else None
    weights_measured = quantized_bytes(model)
    print(
        f"[{name}] built in {time.time() - started:.0f}s: {weights_measured / 2**30:.2f} GiB of weights"
        + (f", {loaded / 2**30:.2f} GiB allocated" if cuda else ""),
        flush=True,
    )
    tokenizer = make_tokenizer()
    results = []
    wrapped, wrapped_for = None, None
    for label, overrides in runs:
        options = FinetuneOptions(data="random tokens", max_steps=steps, save_steps=10**6, warmup_ratio=0.0, **overrides)
        plan = estimate(config, options)
        row = {
            "group": name,
            "config": label,
            "options": options.model_dump(mode="json"),
            "predicted_peak": plan.peak_bytes,
            "predicted_phase": plan.peak_phase,
            "predicted_weights": plan.group_bytes("weights"),
            "measured_weights": weights_measured,
            "loaded_allocated": loaded,
        }
        try:
            targets = tuple(options.target)
            if wrapped_for != targets:
                for param in model.parameters():
                    param.requires_grad_(False)
                if wrapped is not None and hasattr(wrapped, "unload"):
                    model = wrapped.unload()  # the LoRA layers of the previous targets out, base layers back
                wrapped, table = apply_targets(model, options)
                wrapped_for = targets
                row["trainable_measured"] = table.trainable_params
            row["trainable_predicted"] = sum(plan.trainable.values())
            if not options.gradient_checkpointing:  # apply_targets turned it on; the runs without it come last
                wrapped.get_base_model().gradient_checkpointing_disable()
            ids = torch.randint(4, len(tokenizer), (max(8, steps * options.batch_size), options.max_seq_len), generator=torch.Generator().manual_seed(1))
            data = type("Data", (), {"dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()}), "format": "tokens"})()
            with tempfile.TemporaryDirectory() as staging:
                trainer = _make_trainer(wrapped, tokenizer, data, Path(staging), options, compute_dtype, None)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                step_start = time.time()
                trainer.train()
                row["seconds_per_step"] = (time.time() - step_start) / steps
                if cuda:
                    row["measured_peak"] = torch.cuda.max_memory_allocated()
                    row["measured_reserved"] = torch.cuda.max_memory_reserved()
                    # weights + adapters + optimizer states between steps (gradients are set to None)
                    row["measured_resident"] = torch.cuda.memory_allocated()
                    row["predicted_resident"] = plan.group_bytes("weights") + plan.part("training", "LoRA adapters") + plan.part("training", "optimizer states")
                row["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
                del trainer
        except Exception as err:  # noqa: BLE001  (one failing configuration must not hide the others)
            row["error"] = f"{type(err).__name__}: {err}"
        for param in model.parameters():
            param.grad = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if "measured_peak" in row:
            row["error_pct"] = 100 * (row["predicted_peak"] - row["measured_peak"]) / row["measured_peak"]
        print(json.dumps({k: v for k, v in row.items() if k != "options"}), flush=True)
        results.append(row)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| shape | configuration | predicted peak | measured peak | error | measured reserved |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in results:
        measured = row.get("measured_peak")
        lines.append(
            f"| {row['group']} | {row['config']} | {row['predicted_peak'] / 2**30:.2f} GiB | "
            + (
                f"{measured / 2**30:.2f} GiB | {row['error_pct']:+.1f}% | {row['measured_reserved'] / 2**30:.2f} GiB |"
                if measured
                else f"{row.get('error', 'not measured (no GPU)')} | | |"
            )
        )
    weights = {row["group"]: row for row in results}
    lines.append("")
    for group, row in weights.items():
        lines.append(
            f"- {group}: weights predicted {row['predicted_weights'] / 2**30:.3f} GiB, counted on the quantized model "
            f"{row['measured_weights'] / 2**30:.3f} GiB"
            + (f", allocated after loading {row['loaded_allocated'] / 2**30:.3f} GiB" if row["loaded_allocated"] else "")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory for results.json and results.md.")
    parser.add_argument("--groups", default=None, help="Comma list of shapes to run (default: all).")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per configuration.")
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes (a CPU smoke test of the same path).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        results = run_group(args.worker, args.tiny, args.steps)
        (args.out / f"{args.worker}.json").write_text(json.dumps(results, indent=2))
        return
    groups = args.groups.split(",") if args.groups else list(TINY_GROUPS if args.tiny else MAIN_GROUPS)
    results = []
    for group in groups:
        command = [sys.executable, __file__, "--worker", group, "--out", str(args.out), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
        completed = subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        path = args.out / f"{group}.json"
        if completed.returncode != 0 or not path.exists():
            print(f"[{group}] failed with exit code {completed.returncode}", flush=True)
            continue
        results += json.loads(path.read_text())
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
