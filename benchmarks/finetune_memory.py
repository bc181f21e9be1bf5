"""QLoRA speed and memory of moekit's expert block against plain transformers + bitsandbytes + PEFT, on MoE shapes.

Rows (each path of each row runs in its own subprocess, so peaks are clean):
- 4x7b: the 4x7B Mixtral shape, seq 1024, batch 2 (the targets: >= 2.0x plain tokens/s, >= 85% GPU busy,
  peak <= 15.0 GB);
- 4x7b-seq4096: the same at seq 4096, batch 1;
- 8x7b-16l: 8 experts, 16 layers (as benchmarks/fsdp_scaling.py), seq 1024, batch 2;
- phixtral-4x2.8b: Phi-2-shaped Phixtral with 4 fc1/fc2 experts, seq 1024, batch 2;
- cli (--cli): the real `moekit finetune` with its defaults (plus --packing) on a 4x7B-layer-shaped checkpoint
  written to disk, and the same with --no-cuda-graphs (--cli-paths: also moekit-nf4-gemm, with --nf4-gemm).

Both paths build the same random-weight model on the device one layer at a time, then train LoRA r=16 on
attention + all experts with gradient checkpointing and bf16 autocast:
- moekit: what `moekit finetune --packing` runs on one GPU: `quantize_moe` per layer (attention NF4 Linear4bit;
  each layer's experts one `ExpertBlock`: one NF4 tensor per projection, grouped GEMMs), targets from
  `apply_targets`, the loss `causal_lm_step` (chunked LM head and cross-entropy), forward and backward captured
  once as a CUDA graph and replayed (`CapturedStep`), the optimizer step eager;
- plain: what `BitsAndBytesConfig(load_in_4bit=True)` gives (every nn.Linear NF4 except routers; Mixtral's fused
  3-D experts stay bf16), LoRA as PEFT makes it (Mixtral experts via `target_parameters`, Phixtral fc1/fc2
  modules), the model's own loss, eager;
- moekit-eager (--paths): moekit without the CUDA graph (`moekit finetune --no-cuda-graphs`);
- moekit-per-expert (--per-expert or --paths): moekit with the expert-by-expert fallback forced, to measure the grouped path;
- moekit-bnb-dequant (--paths): moekit with bitsandbytes' own NF4 dequantization instead of the fused Triton kernel;
- moekit-sliced-dequant (--paths): projections dequantized in row slices of at most 256 MiB (the default: 1 GiB);
- moekit-eager-swiglu (--paths): SiLU(gate) * up in eager torch instead of the fused Triton kernels;
- moekit-compiled (--paths): every decoder layer compiled with torch.compile (a trial of regional compilation);
- moekit-lora-apart (--paths): moekit (replayed) with every expert LoRA product computed and added apart, instead of
  folded into the frozen GEMM where that pays (`ExpertBlock.fold_lora`);
- moekit-unfused-norms (--paths): moekit (replayed) with transformers' own RMSNorm instead of the fused Triton kernels;
- moekit-full-recompute (--paths): moekit (replayed) with checkpoint recomputations that compute down_proj too
  (`ExpertBlock.skip_unsaved_recomputation`; by default they leave that unsaved GEMM out);
- moekit-nf4-gemm (--paths): moekit (replayed) with grouped GEMMs that read the NF4 expert weights themselves
  (`nf4_grouped_mm`, LoRA folded in) instead of dequantizing each projection and calling torch's grouped GEMM;
- moekit-offload (--paths): moekit with the checkpointed layers' inputs in pinned CPU memory (`--offload-activations`),
  replayed from the CUDA graph like moekit; moekit-nf4-gemm-offload: both.
The other moekit-... variants run eagerly (no CUDA graph), to compare with moekit-eager.
LoRA dropout is 0 everywhere (PEFT's fused-parameter LoRA refuses any other value; moekit's default).

One extra step per path runs under torch.profiler, recording GPU activity only: "GPU busy" is the union of its
kernels' intervals over the mean timed step (the profiler stretches the wall time of the step it records, about 2x
here, but not its kernels). Peaks are `torch.cuda.max_memory_allocated()` in decimal GB (1e9 bytes).

    python benchmarks/finetune_memory.py --out results.json            # all rows, both paths (one H100/H200)
    python benchmarks/finetune_memory.py --rows 4x7b --per-expert      # one row, with the fallback path too
    python benchmarks/finetune_memory.py --tiny                        # CPU smoke run of every row and the CLI
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from gpu_profile import kernel_seconds
from plan_accuracy import EIGHT_BY_7B, FOUR_BY_7B, PHIXTRAL_4X, TINY, TINY_PHI, build_random, make_config

# row -> (architecture, shape, seq, batch); --tiny swaps in the tiny shape of the same architecture
ROWS = {
    "4x7b": ("mixtral", FOUR_BY_7B, 1024, 2),
    "4x7b-seq4096": ("mixtral", FOUR_BY_7B, 4096, 1),
    "8x7b-16l": ("mixtral", dict(EIGHT_BY_7B, num_hidden_layers=16), 1024, 2),
    "phixtral-4x2.8b": ("phixtral", PHIXTRAL_4X, 1024, 2),
}
TINY_SHAPES = {"mixtral": TINY, "phixtral": TINY_PHI}
GB = 1e9
PHASE_PEAKS: dict[str, float] = {}  # phase of the training step -> its highest CUDA peak over the steps


def _memory(torch, device) -> float:
    if device.type == "cuda":
        return max([torch.cuda.max_memory_allocated() / GB, *PHASE_PEAKS.values()])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # CPU smoke runs: peak resident set


def build_model(path: str, config, device):
    """The MoE built on `device` one layer at a time, random weights, each layer quantized as it is made."""
    import torch

    from moekit.finetune.quantize import quantize_moe

    if path.startswith("moekit"):
        model = build_random(config, device, lambda layer: quantize_moe(layer, bits=4, compute_dtype=torch.bfloat16, device=device))
        model.is_loaded_in_4bit = True
        return model
    return build_random(config, device, lambda layer: _plain_bnb_linears(torch, layer, device))


def _plain_bnb_linears(torch, layer, device) -> None:
    """What BitsAndBytesConfig(load_in_4bit) does to a layer: nn.Linear -> Linear4bit (NF4, double quant, bf16);
    routers (`gate`) are kept in bf16 here, as moekit keeps them."""
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "gate":
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                    compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=new).to(device)
                if child.bias is not None:
                    new.bias = child.bias
                setattr(parent, name, new)


def wrap_lora(path: str, model, architecture: str, r: int):
    """LoRA r on attention + all experts: moekit's apply_targets, or PEFT as a user would ask for it."""
    if path.startswith("moekit"):
        from moekit.finetune.options import TrainingOptions
        from moekit.finetune.targets import apply_targets

        peft_model, _table = apply_targets(model, TrainingOptions(target="attn,experts", lora_r=r, lora_alpha=2 * r))
        return peft_model
    from peft import LoraConfig, get_peft_model

    from moekit.finetune.quantize import prepare_for_training

    prepare_for_training(model, gradient_checkpointing=True)  # frozen, non-reentrant checkpointing, as moekit
    if architecture == "mixtral":  # PEFT rewrites w1/w2/w3 into target_parameters on the fused experts
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    else:
        targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=targets)
    return get_peft_model(model, config)


def run_path(args) -> dict:
    import torch

    from moekit.finetune.experts import ExpertBlock, path_counts, recomputations_skipped

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    architecture, shape, _seq, _batch = ROWS[args.row]
    config = make_config(architecture, TINY_SHAPES[architecture] if args.tiny else shape)
    config.output_router_logits = False
    config.use_cache = False
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args.path, config, device)
    peft_model = wrap_lora(args.path, model, architecture, args.lora_r)
    if args.path == "moekit-per-expert":
        ExpertBlock.grouped = False
    if args.path == "moekit-bnb-dequant":  # what the fused NF4 kernel buys: bitsandbytes' three launches instead
        from moekit.finetune.expert_storage import NF4Storage

        NF4Storage.use_triton_kernel = False
    if args.path == "moekit-sliced-dequant" or args.slice_mib:  # what dequantizing in row slices saves and costs
        from moekit.finetune import experts

        experts.DEQUANTIZED_SLICE_BYTES = (args.slice_mib or 256) * 2**20
    if args.memory_limit_gb:  # as `moekit finetune --memory-limit`
        from moekit.finetune import experts

        experts.MEMORY_LIMIT_BYTES = int(args.memory_limit_gb * GB)
    if args.path == "moekit-eager-swiglu":  # what the fused SiLU(gate) * up kernel buys: eager torch instead
        from moekit.finetune import swiglu_kernel

        swiglu_kernel.use_triton_kernel = False
    if args.path == "moekit-compiled":  # each decoder layer compiled (regional torch.compile), a trial
        torch._dynamo.config.cache_size_limit = 64
        # the expert blocks count their paths in a dict: not replayed when checkpointing recomputes a layer
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for module in peft_model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile()
    load_s = time.perf_counter() - start
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = make_optimizer(torch, params, args.optimizer, device)
    peft_model.train()
    loss_fn = partial(_moekit_eager_loss if args.path.startswith("moekit") else _model_loss, torch, peft_model, device)
    captured = None
    if args.path == "moekit-lora-apart":  # what folding LoRA into the frozen GEMM buys
        ExpertBlock.fold_lora = False
    if args.path == "moekit-full-recompute":  # what leaving the unsaved down_proj GEMM out of recomputations buys
        ExpertBlock.skip_unsaved_recomputation = False
    if args.path == "moekit-unfused-norms":  # what the fused RMSNorm kernels buy
        from moekit.finetune import rmsnorm_kernel

        rmsnorm_kernel.use_triton_kernel = False
    if args.path.startswith("moekit-nf4-gemm"):  # no dequantized expert weight: the GEMM reads the 4-bit bytes
        from moekit.finetune.expert_storage import read_nf4_in_gemms

        read_nf4_in_gemms(peft_model)  # as `moekit finetune --nf4-gemm`
    replayed = ("moekit", "moekit-offload", "moekit-lora-apart", "moekit-unfused-norms", "moekit-full-recompute", "moekit-nf4-gemm", "moekit-nf4-gemm-offload")
    if args.path in replayed and device.type == "cuda":
        from moekit.finetune.cuda_graph import CapturedStep
        from moekit.finetune.offload import CheckpointInputOffload
        from moekit.finetune.quantize import enable_checkpointing

        enable_checkpointing(peft_model, preserve_rng_state=False)
        offload = CheckpointInputOffload() if args.path.endswith("-offload") else None

        def step_fn(batch):
            with offload.hooks(config.hidden_size) if offload is not None else nullcontext():
                return _moekit_loss(torch, peft_model, batch, device)

        captured = CapturedStep(step_fn, params)
    tracing = args.memory_trace is not None and device.type == "cuda" and args.warmup > 0
    if tracing:  # the warm-up steps only: the first step, the capture, a replay
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)  # see memory_peak
        baseline = torch.cuda.memory_allocated()
    step_times, losses = [], []
    for step in range(args.warmup + args.steps):
        input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
        t0 = time.perf_counter()
        losses.append(_train_step(torch, loss_fn, optimizer, input_ids, device, captured))
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
        if tracing and step == args.warmup - 1:
            from memory_peak import peak_report

            args.memory_trace.mkdir(parents=True, exist_ok=True)
            report = peak_report(torch.cuda.memory._snapshot(), baseline)
            variant = (f"-slice{args.slice_mib}" if args.slice_mib else "") + (f"-limit{args.memory_limit_gb}" if args.memory_limit_gb else "")
            (args.memory_trace / f"{args.row}-{args.path}-{args.optimizer}{variant}.txt").write_text(report + "\n")
            torch.cuda.memory._record_memory_history(enabled=None)
    timed = sum(step_times)
    paths = path_counts(peft_model)
    skipped = recomputations_skipped(peft_model)  # down_proj GEMMs left out of recomputations (Python runs, not replays)
    from moekit.finetune import nf4_grouped_mm

    nf4_gemm_launches = dict(nf4_grouped_mm.launches)  # the moekit-nf4-gemm path: proof that the kernel ran
    from moekit.finetune.experts import limited_calls

    dequantizations_under_limit = dict(limited_calls)  # --memory-limit-gb: calls that ran whole or sliced (Python calls, not replays)
    compiled = None
    if args.path == "moekit-compiled":
        from torch._dynamo.utils import counters

        compiled = {"graphs": dict(counters["stats"]), "graph_breaks": {key[:200]: n for key, n in counters["graph_break"].items()}}
    probe = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    busy = _profile_step(torch, loss_fn, optimizer, probe, device, args.trace_dir, captured)
    if busy["gpu_kernel_s"] is not None:  # the profiler stretches its step's wall time, not the kernels in it
        busy["gpu_busy"] = busy["gpu_kernel_s"] / (timed / args.steps)
    return {
        "row": args.row, "path": args.path, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "peak_gb": _memory(torch, device), "phase_peaks_gb": dict(PHASE_PEAKS),
        "tokens_per_s": args.steps * args.batch * args.seq / timed, "step_s": timed / args.steps,
        "load_s": load_s, "trainable_params": trainable, "expert_paths": paths, "recomputations_skipped": skipped, "losses": losses, "compiled": compiled,
        "graph_replays": captured.replays if captured else None, "nf4_gemm_launches": nf4_gemm_launches,
        "dequantizations_under_limit": dequantizations_under_limit, **busy,
    }  # fmt: skip


def make_optimizer(torch, params, name: str, device):
    """AdamW with float32 states (fused on CUDA), or bitsandbytes' 8-bit AdamW (`moekit finetune --optimizer adamw_8bit`)."""
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def _moekit_loss(torch, model, batch, device) -> dict:
    """The trainer's loss (`causal_lm_step`, no router loss: the benchmark models do not return router logits)."""
    from moekit.finetune.causal_lm_loss import causal_lm_step

    labels = batch["input_ids"]
    batch = {**batch, "labels": labels, "num_items_in_batch": (labels[:, 1:] != -100).sum()}
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        return causal_lm_step(model, batch, aux_loss_coef=None)


def _moekit_eager_loss(torch, model, device, input_ids):
    return _moekit_loss(torch, model, {"input_ids": input_ids}, device)["loss"]


def _model_loss(torch, model, device, input_ids):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return model(input_ids=input_ids, labels=input_ids).loss


def _train_step(torch, loss_fn, optimizer, input_ids, device, captured=None) -> float:
    """One optimizer step under bf16 autocast (as a Trainer with bf16=True); returns when the GPU is done. With a
    `CapturedStep`, forward and backward are one graph replay (one phase, "backward")."""
    _phase_peak(torch, device, "before")  # the build, or the step before
    if captured is not None:
        loss = captured({"input_ids": input_ids})["loss"]
    else:
        loss = loss_fn(input_ids)
        _phase_peak(torch, device, "forward")
        loss.backward()
    _phase_peak(torch, device, "backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _phase_peak(torch, device, "optimizer")
    return float(loss)  # synchronises


def _phase_peak(torch, device, phase: str) -> None:
    """The CUDA memory peak since the last call, kept in PHASE_PEAKS[phase] (GB, highest over the steps); resets it."""
    if device.type == "cuda":
        PHASE_PEAKS[phase] = max(PHASE_PEAKS.get(phase, 0.0), torch.cuda.max_memory_allocated() / GB)
        torch.cuda.reset_peak_memory_stats()


def _profile_step(torch, loss_fn, optimizer, input_ids, device, trace_dir: Path | None = None, captured=None) -> dict:
    """One step under torch.profiler, recording the GPU only: the union of its kernels' intervals (kernel time, with
    overlapping kernels counted once), and the costliest and most launched kernels."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"profiled_wall_s": None, "gpu_kernel_s": None, "gpu_busy": None, "top_kernels": []}
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _train_step(torch, loss_fn, optimizer, input_ids, device, captured)
    wall = time.perf_counter() - start
    averages = [event for event in prof.key_averages() if event.self_device_time_total > 0]
    if trace_dir:  # every kernel of the step by GPU time, for a closer look than the top 20
        trace_dir.mkdir(parents=True, exist_ok=True)
        table_text = prof.key_averages().table(sort_by="self_device_time_total", row_limit=120, max_name_column_width=90)
        (trace_dir / f"kernels-{os.getpid()}.txt").write_text(table_text)
    kernels = sum(1 for event in prof.events() if event.device_type.name == "CUDA")

    def listed(events):
        return [{"name": event.key[:100], "s": event.self_device_time_total / 1e6, "calls": event.count} for event in events]

    return {
        "profiled_wall_s": wall, "gpu_kernel_s": kernel_seconds(prof), "gpu_busy": None, "kernels": kernels,
        "top_kernels": listed(sorted(averages, key=lambda event: event.self_device_time_total, reverse=True)[:20]),
        "most_launched": listed(sorted(averages, key=lambda event: event.count, reverse=True)[:15]),
    }  # fmt: skip


# --- the real CLI on a checkpoint on disk ------------------------------------------------------------


def run_cli_row(args) -> dict:
    """`moekit finetune` with its defaults (plus --max-steps, --packing) on a written checkpoint."""
    import torch

    from moekit.testing import make_tokenizer

    work = Path(tempfile.mkdtemp(prefix="moekit-bench-"))
    shape = dict(TINY if args.tiny else FOUR_BY_7B, num_hidden_layers=2 if args.tiny else args.cli_layers)
    config = make_config("mixtral", shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _dense_random(config, device)
    checkpoint = work / "moe"
    model.save_pretrained(checkpoint)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    data = work / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i % 97} plus {i % 13}? Answer in words and explain."},
                          {"role": "assistant",
                           "content": f"{i % 97} plus {i % 13} is {i % 97 + i % 13}. " + "The quick brown fox jumps over the lazy dog. " * 8}]}
            for i in range(4000)]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    steps = 3 if args.tiny else args.cli_steps
    seq = 64 if args.tiny else 1024
    command = [sys.executable, "-m", "moekit", "finetune", str(checkpoint), "--data", str(data), "-o", str(work / "out"),
               "--max-steps", str(steps), "--max-seq-len", str(seq), "--packing", "--save-steps", "100000"]  # fmt: skip
    # moekit-memory-limit: a limit under the 4-layer row's peak (3.85 GB), so that the real CLI slices
    flags = {"moekit-eager": ["--no-cuda-graphs"], "moekit-nf4-gemm": ["--nf4-gemm"], "moekit-memory-limit": ["--memory-limit", "3.2GB"]}.get(args.path, [])
    command += flags
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"row": "cli", "error": (proc.stderr or proc.stdout)[-3000:]}
    log = [json.loads(line) for line in (work / "out" / "training_log.jsonl").read_text().splitlines()]
    summary = next((record for record in log if "train_runtime" in record), {})
    metadata = json.loads((work / "out" / "moekit-finetune.json").read_text())
    batch = metadata["options"]["batch_size"] * metadata["options"]["grad_accum"]
    runtime = summary.get("train_runtime")
    expert_line = next((line for line in proc.stdout.splitlines() if line.startswith("expert blocks:")), None)
    return {
        "row": "cli", "path": " ".join(["moekit finetune", *flags]),
        "layers": shape["num_hidden_layers"], "steps": steps, "seq": seq, "batch": batch,
        "wall_s": wall, "train_runtime_s": runtime, "tokens_per_s": steps * batch * seq / runtime if runtime else None,
        "peak_gb": (metadata.get("peak_memory_bytes") or 0) / GB or None, "expert_paths": metadata.get("expert_paths"),
        "expert_line": expert_line, "cuda_graphs": metadata.get("cuda_graphs"), "memory_limit_calls": metadata.get("memory_limit_calls"),
        "checkpoint_gb": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / GB,
    }  # fmt: skip


def _dense_random(config, device):
    """A bf16 random-weight model of `config` (fused experts, as transformers builds it), made on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.cpu() if device.type == "cuda" else model


# --- driver -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run of every row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--paths", default="moekit,plain", help="moekit, plain, and the moekit-... variants above")
    parser.add_argument("--per-expert", action="store_true", help="also run moekit with the expert-by-expert fallback")
    parser.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True, help="the real `moekit finetune` row")
    parser.add_argument("--cli-layers", type=int, default=4, help="layers of the 4x7B-shaped checkpoint for the CLI row")
    parser.add_argument(
        "--cli-paths",
        default="moekit,moekit-eager",
        help="CLI rows: moekit (defaults), moekit-eager (--no-cuda-graphs), moekit-nf4-gemm, moekit-memory-limit (3.2GB)",
    )
    parser.add_argument("--cli-steps", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default="adamw", help="float32 AdamW (fused) or bitsandbytes' 8-bit AdamW")
    parser.add_argument("--slice-mib", type=int, help="dequantize expert projections in row slices of at most this many MiB [moekit's default: 1024]")
    parser.add_argument("--memory-limit-gb", type=float, help="moekit paths: as `moekit finetune --memory-limit` (GB, 1e9 bytes)")
    parser.add_argument("--trace-dir", type=Path, help="write each path's profiled kernels, sorted by GPU time, here")
    parser.add_argument("--memory-trace", type=Path, help="write what is allocated at each path's peak (warm-up steps), by size and when, to this folder")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_cli_row(args) if args.row == "cli" else run_path(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    paths = [path for path in args.paths.split(",") if path] + (["moekit-per-expert"] if args.per_expert else [])
    results = []
    rows = [row for row in args.rows.split(",") if row]  # --rows "" runs the CLI row alone
    jobs = [(row, path) for row in rows for path in paths] + ([("cli", path) for path in args.cli_paths.split(",")] if args.cli else [])
    for row, path in jobs:
        seq, batch = ((32, 2) if args.tiny else ROWS[row][2:]) if row in ROWS else (0, 0)  # the CLI row reports its own
        command = [sys.executable, __file__, "--child", "--row", row, "--path", path, "--seq", str(seq), "--batch", str(batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r),
                   "--cli-layers", str(args.cli_layers), "--cli-steps", str(args.cli_steps), "--optimizer", args.optimizer]  # fmt: skip
        if args.trace_dir:
            command += ["--trace-dir", str(args.trace_dir)]
        if args.slice_mib:
            command += ["--slice-mib", str(args.slice_mib)]
        if args.memory_trace:
            command += ["--memory-trace", str(args.memory_trace)]
        if args.memory_limit_gb:
            command += ["--memory-limit-gb", str(args.memory_limit_gb)]
        if args.tiny:
            command.append("--tiny")
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][len("RESULT ") :]) if proc.returncode == 0 and lines else {"error": (proc.stderr or proc.stdout)[-3000:]}
        result.update(
            row=row, path=result.get("path", path), seq=seq or result.get("seq"), batch=batch or result.get("batch"), run_s=time.perf_counter() - start
        )
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "top_kernels", "most_launched")}), flush=True)
        for kernel in result.get("top_kernels", []):
            print(f"    {kernel['s']:8.4f}s {kernel['calls']:6d}  {kernel['name']}")
        if args.out:  # after every job: a run stopped part-way keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    """The Markdown table for the README: speed against the plain path of the same row."""
    plain = {r["row"]: r["tokens_per_s"] for r in results if r.get("path") == "plain" and "tokens_per_s" in r}
    lines = ["| row | seq x batch | path | peak GB | tokens/s | vs plain | GPU busy | expert forwards (grouped / per-expert) |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | | {r['path']} | error: {r['error'].strip().splitlines()[-1][:60] if r['error'].strip() else '?'} | | | | |")
            continue
        speed = r.get("tokens_per_s")
        ratio = f"{speed / plain[r['row']]:.2f}x" if speed and r["row"] in plain else "-"
        busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "-"
        paths = r.get("expert_paths") or {}
        paths_text = f"{paths.get('grouped', 0)} / {paths.get('per_expert', 0)}" if paths and (paths.get("grouped") or paths.get("per_expert")) else "-"
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else "-"
        lines.append(f"| {r['row']} | {r['seq']} x {r['batch']} | {r['path']} | {peak} | {speed:,.0f} | {ratio} | {busy} | {paths_text} |" if speed else
                     f"| {r['row']} | {r['seq']} x {r['batch']} | {r['path']} | {peak} | - | - | {busy} | {paths_text} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
