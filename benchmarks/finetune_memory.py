"""QLoRA memory and speed on a 4x7B-shaped Mixtral: moekit's per-expert NF4 path vs plain transformers+bitsandbytes+PEFT.

Both paths build the same random-weight Mixtral directly in device memory, layer by layer (no 43 GB
checkpoint on disk), then train LoRA r=16 on attention + all experts with gradient checkpointing:

- moekit: each layer is quantized as it is built with `moekit.finetune.quantize.quantize_moe` (every linear
  layer NF4 + double quantization, the fused experts unfused into per-expert NF4 layers), targets from
  `moekit.finetune.targets.apply_targets`.
- plain: what `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double
  quant, bf16 compute))` gives: bitsandbytes replaces the `nn.Linear` layers (attention) and leaves the fused
  3-D expert parameters in bf16; LoRA as a user would ask PEFT for it: target_modules q/k/v/o_proj + w1/w2/w3,
  which PEFT rewrites into `target_parameters` on the fused `gate_up_proj`/`down_proj`.

LoRA dropout is 0 on both paths (PEFT's fused-parameter LoRA refuses any other value).
Each path runs in its own subprocess so that peak memory is clean. Usage:

    python benchmarks/finetune_memory.py --out results.json              # 4x7B shape, needs a ~80 GB GPU
    python benchmarks/finetune_memory.py --tiny --out /tmp/tiny.json     # CPU smoke test of both paths
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "4x7b": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
    },
    "tiny": {
        "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256,
    },
}  # fmt: skip
GB = 1e9


def _memory(torch, device) -> dict:
    if device.type == "cuda":
        return {"allocated_gb": torch.cuda.memory_allocated() / GB, "peak_gb": torch.cuda.max_memory_allocated() / GB}
    # CPU smoke runs: the process's peak resident set stands in for the peak
    return {"allocated_gb": None, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


def _init_(torch, module) -> None:
    """Random weights like a trained model's scale; norms at one."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
            else:
                param.fill_(1.0)


def _plain_bnb_linears(torch, layer, device) -> None:
    """What BitsAndBytesConfig(load_in_4bit) does to a layer: nn.Linear -> Linear4bit (NF4, double quant, bf16)."""
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                    compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                new.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=new
                ).to(device)
                setattr(parent, name, new)


def build_model(path: str, shape: str, device):
    """The Mixtral built layer by layer on `device` with random weights, quantized as each layer is made."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from moekit.finetune.quantize import quantize_moe

    config = MixtralConfig(**SHAPES[shape], tie_word_embeddings=False, use_cache=False)
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device=device)
        _init_(torch, module)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # real fp32 frequencies
    for layer in model.model.layers:
        layer.to_empty(device=device)
        _init_(torch, layer)
        if path == "moekit":
            quantize_moe(layer, bits=4, compute_dtype=torch.bfloat16, device=device)
        else:
            _plain_bnb_linears(torch, layer, device)
    if path == "moekit":
        model.is_loaded_in_4bit = True
    return model


def wrap_lora(path: str, model, r: int, targets: list[str]):
    """LoRA r on attention + all experts: moekit's explicit per-expert targets, or PEFT's fused-parameter rewrite."""
    if path == "moekit":
        from moekit.finetune.options import TrainingOptions
        from moekit.finetune.targets import apply_targets

        options = TrainingOptions(target=targets, lora_r=r, lora_alpha=2 * r, lora_dropout=0.0)
        peft_model, table = apply_targets(model, options)
        return peft_model, table.to_dict()["by_kind"]
    from peft import LoraConfig, get_peft_model

    from moekit.finetune.quantize import prepare_for_training

    prepare_for_training(model, gradient_checkpointing=True)  # same settings as moekit's path: frozen, non-reentrant
    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=(["q_proj", "k_proj", "v_proj", "o_proj"] if "attn" in targets else [])
        + (["w1", "w2", "w3"] if "experts" in targets else []),
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    converted = peft_model.peft_config["default"]
    return peft_model, {
        "target_modules": sorted(converted.target_modules or []),
        "target_parameters": sorted(converted.target_parameters or []),
    }


def run_path(args) -> dict:
    import torch

    if args.tiny:
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.expert_loop:
        from moekit.finetune.quantize import MixtralExpertList

        MixtralExpertList.grouped = False  # the expert-by-expert path, for comparison
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args.path, "tiny" if args.tiny else "4x7b", device)
    peft_model, targets = wrap_lora(args.path, model, args.lora_r, args.targets.split(","))
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    loaded = _memory(torch, device)
    experts_4bit = sum(
        1 for name, p in peft_model.named_parameters() if ".experts." in name and p.__class__.__name__ == "Params4bit"
    )
    experts_bf16_gb = sum(
        p.numel() * p.element_size() for name, p in peft_model.named_parameters()
        if ".experts." in name and p.__class__.__name__ != "Params4bit" and not p.requires_grad
    ) / GB  # fmt: skip
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=args.fused_adam)
    peft_model.train()
    vocab = model.config.vocab_size
    losses, step_times = [], []
    for step in range(args.warmup + args.steps):
        input_ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = _train_step(torch, peft_model, optimizer, args, input_ids, device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = sum(step_times)
    profile = _profile_step(torch, peft_model, optimizer, args, vocab, device) if args.profile else None
    return {
        "path": args.path,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "loaded_gb": loaded["allocated_gb"],
        "peak_gb": _memory(torch, device)["peak_gb"],
        "tokens_per_s": args.steps * args.batch * args.seq / timed,
        "step_s": timed / args.steps,
        "load_s": load_s,
        "trainable_params": trainable,
        "expert_params4bit_tensors": experts_4bit,
        "expert_weights_not_4bit_gb": experts_bf16_gb,
        "targets": targets,
        "losses": losses,
        "profile": profile,
    }


def _train_step(torch, model, optimizer, args, input_ids, device):
    """One optimizer step; on a GPU it returns only when the GPU has finished it (for timing)."""
    with _autocast(torch, args, device):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss


def _autocast(torch, args, device):
    """bf16 autocast, as a Trainer with bf16=True runs the forward (LoRA weights stay fp32 for the optimizer)."""
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()


def _profile_step(torch, model, optimizer, args, vocab, device) -> dict:
    """One training step under torch.profiler: GPU busy time vs wall time, and the costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    input_ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        _train_step(torch, model, optimizer, args, input_ids, device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
    kernels_us = sum(getattr(e, "self_device_time_total", 0) for e in averages) if device.type == "cuda" else None
    return {
        "wall_s_profiled": wall,
        "gpu_kernel_s": None if kernels_us is None else kernels_us / 1e6,
        "top": [{"name": e.key[:90], "self_s": getattr(e, key, 0) / 1e6, "calls": e.count} for e in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    parser.add_argument("--path", choices=["moekit", "plain", "both"], default="both")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--targets", default="attn,experts", help="LoRA targets (attn, experts)")
    parser.add_argument("--fused-adam", action="store_true", help="torch's fused AdamW (both paths)")
    parser.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast forward (both paths)")
    parser.add_argument("--expert-loop", action="store_true", help="moekit: run experts one by one instead of grouped GEMMs")
    parser.add_argument("--profile", action="store_true", help="profile one extra step (GPU busy vs wall, top ops)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and args.seq == 1024:
        args.seq = 32
    if args.child:
        print("RESULT " + json.dumps(run_path(args)), flush=True)
        return
    results = {"shape": "tiny" if args.tiny else "4x7b", "seq": args.seq, "batch": args.batch, "steps": args.steps,
               "lora_r": args.lora_r, "targets": args.targets, "fused_adam": args.fused_adam, "autocast": args.autocast, "expert_loop": args.expert_loop, "paths": {}}  # fmt: skip
    for path in (["moekit", "plain"] if args.path == "both" else [args.path]):
        command = [sys.executable, __file__, "--child", "--path", path, "--seq", str(args.seq), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r),
                   "--targets", args.targets]  # fmt: skip
        command += [flag for flag, on in (("--tiny", args.tiny), ("--fused-adam", args.fused_adam), ("--profile", args.profile), ("--expert-loop", args.expert_loop)) if on]
        command.append("--autocast" if args.autocast else "--no-autocast")
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results["paths"][path] = {"error": (proc.stderr or proc.stdout)[-3000:], "returncode": proc.returncode}
        else:
            results["paths"][path] = json.loads(lines[-1][len("RESULT ") :])
        print(json.dumps({path: {k: v for k, v in results["paths"][path].items() if k not in ("losses", "profile")}}, indent=1), flush=True)
        profile = results["paths"][path].get("profile")
        if profile:
            print(f"{path} profile: wall {profile['wall_s_profiled']:.3f}s, GPU kernels {profile['gpu_kernel_s']}s")
            for row in profile["top"]:
                print(f"  {row['self_s']:8.4f}s {row['calls']:6d}  {row['name']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    """The Markdown table for the README."""
    lines = ["| path | loaded GB | peak GB | tokens/s | experts in 4-bit |", "|---|---|---|---|---|"]
    for path, r in results["paths"].items():
        if "error" in r:
            lines.append(f"| {path} | error | | | |")
            continue
        loaded = "-" if r["loaded_gb"] is None else f"{r['loaded_gb']:.1f}"
        four_bit = "yes" if r["expert_weights_not_4bit_gb"] == 0 else f"no ({r['expert_weights_not_4bit_gb']:.1f} GB bf16)"
        lines.append(f"| {path} | {loaded} | {r['peak_gb']:.1f} | {r['tokens_per_s']:,.0f} | {four_bit} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
