"""1 GPU vs 2-GPU FSDP vs 2-GPU DDP for `moekit finetune`: per-GPU peak memory, tokens/s, GPU busy, first losses.

Each mode trains the same MoE, built with random weights directly in GPU memory by `benchmarks/plan_accuracy.py`'s
`build_quantized` (layer by layer, through `quantize_moe`: NF4 attention and the expert block `ExpertBlock`, as
`moekit finetune` loads it), through the trainer's own `_make_trainer` (TRL SFTTrainer, bf16, gradient
checkpointing, router aux loss, AdamW), on the same random token sequences with the same seed.

- single: one process on the first visible GPU (the script sets CUDA_VISIBLE_DEVICES for it).
- fsdp / ddp: `accelerate launch` on the first two visible GPUs with the config `moekit finetune --fsdp / --ddp`
  ships (`moekit/finetune/accelerate/fsdp_qlora.yaml`: FSDP2, one unit per decoder layer; `ddp.yaml`). With
  `--cuda-graphs` (default) DDP processes replay their steps from CUDA graphs and the trainer averages the gradients
  (no DDP wrapper); FSDP runs eagerly. Strong
  scaling: the global batch is held equal (each of 2 processes runs `--batch / 2` sequences), so the loss curves
  should agree with single's.
- fsdp-weak / ddp-weak: weak scaling, each process runs single's `--batch` (global batch 2 x `--batch`).

Steps: `--warmup` (untimed; step 1 wraps/shards the model), then `--steps` timed (one synchronisation before and
one after them, none per step), then one step under torch.profiler on rank 0, recording the GPU only ("GPU busy": the union of its
kernels' intervals over the mean timed step, NCCL kernels included, and without them). Memory: `torch.cuda.max_memory_allocated()` per GPU
after the warm-up steps (the worst GPU is reported), plus the allocation right after building. FSDP mode also writes
a checkpoint (adapter + optimizer, the trainer's own code) and reads it back into the sharded model (round trip exact).
Modes run in order within `--budget-s` seconds; a mode that would not fit is reported as skipped.

    # 2-GPU machine, from the repository root (under 9 minutes in all):
    python benchmarks/fsdp_scaling.py --out results/fsdp
    python benchmarks/fsdp_scaling.py --modes fsdp --out results/fsdp    # one mode per call (results merge)
    python benchmarks/fsdp_scaling.py --tiny --out /tmp/fsdp             # CPU smoke test: single, ddp, ddp-weak (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the model is built by the sibling benchmark's helpers
sys.path.insert(0, str(Path(__file__).parent))
from gpu_profile import idle_gaps, kernel_seconds
from plan_accuracy import EIGHT_BY_7B, TINY, build_quantized, make_config

SHAPES = {"8x7b-16l": dict(EIGHT_BY_7B, num_hidden_layers=16), "8x7b": EIGHT_BY_7B, "tiny": TINY}
STAGING_VARIABLE = "FSDP_SCALING_STAGING"
MODES = ("single", "fsdp", "ddp", "fsdp-weak", "ddp-weak", "cli-resume")
DEFAULT_GPU_MODES = ("single", "fsdp", "ddp", "ddp-weak", "cli-resume", "fsdp-weak")  # in this order, as the budget allows
CPU_MODES = ("single", "ddp", "ddp-weak", "cli-resume")  # accelerate runs FSDP on GPUs only
GB = 2**30


def worker(args) -> None:
    """One process of a mode: build, train warm-up + timed + profiled steps, write this rank's figures."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from moekit.finetune import nf4_grouped_mm, quantize
    from moekit.finetune.experts import path_counts
    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import _make_trainer
    from moekit.testing import make_tokenizer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    if args.slice_mib is not None:  # dequantize projections in row slices of this size (moekit's default: 1 GiB)
        from moekit.finetune import experts

        experts.DEQUANTIZED_SLICE_BYTES = args.slice_mib * 2**20
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    config = make_config("mixtral", SHAPES[args.shape])
    started = time.time()
    quantize_moe = quantize.quantize_moe
    # what load_for_training does: weights in the compute dtype; under FSDP 4-bit codes stored in it too
    storage = compute_dtype if fsdp else torch.uint8
    quantize.quantize_moe = lambda model, **kw: quantize_moe(model, **{**kw, "compute_dtype": compute_dtype, "quant_storage": storage})
    try:
        model = build_quantized(config, device, bits=4)
    finally:
        quantize.quantize_moe = quantize_moe
    built_s = time.time() - started
    built_gb = torch.cuda.memory_allocated() / GB if cuda else None

    weak = args.worker.endswith("-weak")
    per_device = args.batch if weak else args.batch // world
    total_steps = args.warmup + args.steps + 1  # the last one is profiled
    options = FinetuneOptions(data="random tokens", target=["attn", "experts"], lora_r=16, lora_dropout=0.0, batch_size=per_device,
                              max_seq_len=args.seq, max_steps=total_steps, save_steps=10**6, warmup_ratio=0.0, learning_rate=1e-4, seed=0,
                              packing=True, cuda_graphs=args.cuda_graphs)  # fmt: skip
    from moekit.finetune.targets import apply_targets

    torch.manual_seed(0)
    wrapped, _table = apply_targets(model, options)
    if args.nf4_gemm:  # grouped GEMMs that read the NF4 experts themselves, as `moekit finetune --nf4-gemm`
        from moekit.finetune.expert_storage import read_nf4_in_gemms

        read_nf4_in_gemms(wrapped)
    tokenizer = make_tokenizer()
    ids = torch.randint(4, config.vocab_size, (total_steps * per_device * world, args.seq), generator=torch.Generator().manual_seed(1))
    data = type("Data", (), {"dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()}), "format": "tokens"})()

    timing: dict = {}

    class Measure(TrainerCallback):
        """Times steps warmup+1 .. warmup+steps with one synchronisation on each side; profiles the last step."""

        def on_step_begin(self, _args, state, *_rest, **_kwargs):
            if state.global_step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                timing["start"] = time.perf_counter()
            elif state.global_step == args.warmup + args.steps and rank == 0:
                timing["profile"] = _start_profiler(torch, cuda, args.host_profile)

        def on_step_end(self, _args, state, *_rest, **_kwargs):
            if state.global_step == args.warmup + args.steps:
                if cuda:
                    torch.cuda.synchronize()
                timing["timed_s"] = time.perf_counter() - timing["start"]
                timing["peak_gb"] = torch.cuda.max_memory_allocated() / GB if cuda else None
            elif state.global_step == total_steps and "profile" in timing:
                started = timing.pop("profile")
                timing["busy"] = _stop_profiler(torch, cuda, started, timing["timed_s"] / args.steps)
                if args.host_profile:
                    _write_host_profile(started[0], Path(args.out), args.worker)

    staging = Path(os.environ[STAGING_VARIABLE])  # one directory for every rank of the mode (run_mode makes it)
    trainer = _make_trainer(wrapped, tokenizer, data, staging, options, compute_dtype, None)
    trainer.add_callback(Measure())
    trainer.train()
    round_trip = _checkpoint_round_trip(trainer, staging / "checkpoint-check") if trainer.is_fsdp_enabled else None
    from moekit.finetune.distributed import fsdp_units

    step_s = timing["timed_s"] / args.steps
    result = {
        "mode": args.worker, "rank": rank, "world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "fsdp": trainer.is_fsdp_enabled, "ddp": world > 1 and not trainer.is_fsdp_enabled,
        "fsdp_units": len(fsdp_units(trainer.model_wrapped)) if trainer.is_fsdp_enabled else None,
        "per_device_batch": per_device, "global_batch": per_device * world, "seq": args.seq,
        "built_s": built_s, "built_gb": built_gb, "peak_gb": timing["peak_gb"],
        "step_s": step_s, "tokens_per_s": per_device * world * args.seq / step_s,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:6],
        "expert_paths": path_counts(trainer.model_wrapped), "checkpoint_round_trip": round_trip, "cuda_graphs": trainer.cuda_graph_summary(),
        "nf4_gemm_launches": dict(nf4_grouped_mm.launches), **timing.get("busy", {}),
    }  # fmt: skip
    Path(args.out, f"{args.worker}-rank{rank}.json").write_text(json.dumps(result, indent=1))


def _start_profiler(torch, cuda: bool, host: bool = False):
    from torch.profiler import ProfilerActivity, profile

    if cuda:
        torch.cuda.synchronize()
    # GPU only unless asked: recording the host stretches the step
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if host and cuda else [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    profiler = profile(activities=activities, with_stack=host)
    profiler.__enter__()
    return profiler, time.perf_counter()


def _stop_profiler(torch, cuda: bool, started, timed_step_s: float | None) -> dict:
    profiler, start = started
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    profiler.__exit__(None, None, None)
    if not cuda:
        return {"profiled_step_s": wall}
    # kernel time over the mean timed step: the profiler stretches the wall time of the step it records, not its kernels
    step_s = timed_step_s or wall
    kernel_s, compute_s = kernel_seconds(profiler), kernel_seconds(profiler, skip="nccl")
    return {"profiled_step_s": wall, "gpu_busy": kernel_s / step_s, "gpu_busy_without_nccl": compute_s / step_s, "gpu_kernel_s": kernel_s}


def _write_host_profile(profiler, out: Path, mode: str) -> None:
    """Where the host spends the profiled step, and when the GPU waits: `{mode}-host.txt` (host operators by own
    time, grouped by their Python call site; the GPU's idle gaps) and `{mode}-trace.json.gz` (chrome://tracing)."""
    import gzip

    gaps = sorted(idle_gaps(profiler), reverse=True)
    host_ops = [(e.time_range.start, e.time_range.end, e.name) for e in profiler.events() if e.device_type.name == "CPU"]

    def running_at(moment: float) -> str:  # the innermost host operators running when a gap begins
        return ", ".join(name for start, end, name in host_ops if start <= moment <= end)[-300:]

    lines = [f"GPU idle between kernels: {sum(g for g, _ in gaps) / 1e3:.1f} ms in {len(gaps)} gaps "
             f"({sum(g for g, _ in gaps if g > 100) / 1e3:.1f} ms in gaps over 100 us)", "largest gaps (us, host operators open at its start):"]  # fmt: skip
    lines += [f"  {gap:9.0f}  {running_at(start)}" for gap, start in gaps[:25]]
    table = profiler.key_averages(group_by_stack_n=4).table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    (out / f"{mode}-host.txt").write_text("\n".join(lines) + "\n\n" + table + "\n")
    trace = out / f"{mode}-trace.json"
    profiler.export_chrome_trace(str(trace))
    with trace.open("rb") as source, gzip.open(f"{trace}.gz", "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target)
    trace.unlink()


def _checkpoint_round_trip(trainer, folder: Path) -> dict:
    """FSDP: the trainer's checkpoint code (adapter + routers gathered, optimizer state gathered) and its resume code
    (sharded back) on the trained model: the largest difference of any trainable value and optimizer state."""
    import torch

    from moekit.finetune.distributed import gathered_trainable

    folder.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    before = gathered_trainable(trainer.model_wrapped)
    state_before = {id(p): {k: v.detach().clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    trainer.save_model(str(folder))
    trainer._save_optimizer_and_scheduler(str(folder))
    trainer.accelerator.wait_for_everyone()
    with torch.no_grad():  # make the load do something
        for param in trainer.model_wrapped.parameters():
            if param.requires_grad:
                param.zero_()
    trainer._load_from_checkpoint(str(folder))
    trainer._load_optimizer_and_scheduler(str(folder))
    after = gathered_trainable(trainer.model_wrapped)
    state_after = {id(p): s for p, s in trainer.optimizer.state.items()}
    differences = [float((before[name] - after[name]).abs().max()) for name in before]
    for key, saved in state_before.items():
        differences += [float((saved[k].float() - state_after[key][k].float()).abs().max()) for k in saved if hasattr(saved[k], "float")]
    return {"tensors": len(before), "max_difference": max(differences)}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (all of them when it is unset)."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry for entry in listed.split(",") if entry.strip()]
    return [str(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _messages(process: subprocess.CompletedProcess) -> list[str]:
    """What a failed CLI run said: its `error:`/`hint:` lines, else the end of its output."""
    lines = (process.stdout + process.stderr).strip().splitlines()
    said = [line.strip() for line in lines if line.strip().startswith(("error:", "hint:", "[rank"))]
    return said[-12:] or lines[-12:]


def run_cli_resume(args, env: dict, timeout: float) -> list[dict]:
    """The real CLI on 2 GPUs under --fsdp (on CPUs --ddp): a tiny MoE, 6 steps with a checkpoint at step 3, then a
    second run resumed from that checkpoint under --fsdp; its steps 4-6 should repeat the first run's."""
    from fsdp_one_gpu_check import FINETUNE, losses, make_moe

    kind = "--fsdp" if visible_gpus() else "--ddp"
    root = Path(tempfile.mkdtemp(prefix="moekit-cli-resume-"))
    deadline = time.time() + timeout
    common = [sys.executable, "-m", "moekit", "finetune", str(make_moe(root)), "--data", str(root / "chat.jsonl"), *FINETUNE,
              "--batch-size", "2", kind, "--num-processes", "2"]  # fmt: skip
    first = subprocess.run([*common, "-o", str(root / "first")], env=env, capture_output=True, text=True, timeout=max(deadline - time.time(), 1), check=False)
    if first.returncode != 0:
        return [{"mode": "cli-resume", "error": f"first run exit code {first.returncode}: {_messages(first)}"}]
    shutil.copytree(root / "first" / "checkpoints" / "checkpoint-3", root / "resumed.partial" / "checkpoints" / "checkpoint-3")
    resumed = subprocess.run(
        [*common, "-o", str(root / "resumed"), "--resume"], env=env, capture_output=True, text=True, timeout=max(deadline - time.time(), 1), check=False
    )
    if resumed.returncode != 0:
        return [{"mode": "cli-resume", "error": f"resumed run exit code {resumed.returncode}: {_messages(resumed)}"}]
    uninterrupted, again = dict(losses(root / "first")), dict(losses(root / "resumed"))
    steps = sorted(step for step in again if step > 3)
    worst = max(abs(again[step] - uninterrupted[step]) / abs(uninterrupted[step]) for step in steps)
    return [
        {
            "mode": "cli-resume",
            "launch": kind,
            "steps": steps,
            "uninterrupted": [uninterrupted[s] for s in steps],
            "resumed": [again[s] for s in steps],
            "max_rel_difference": worst,
        }
    ]


def run_mode(mode: str, args, timeout: float) -> list[dict]:
    """Start the processes of `mode` (one GPU for single, two otherwise) and collect their per-rank results."""
    from moekit.finetune.distributed import config_path

    common = ["--worker", mode, "--out", str(args.out), "--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.slice_mib is not None:
        common += ["--slice-mib", str(args.slice_mib)]
    if not args.cuda_graphs:
        common.append("--no-cuda-graphs")
    if args.nf4_gemm:
        common.append("--nf4-gemm")
    if args.host_profile:
        common.append("--host-profile")
    gpus = visible_gpus()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if mode == "cli-resume":
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:2])
        try:
            return run_cli_resume(args, env, timeout)
        except subprocess.TimeoutExpired:
            return [{"mode": mode, "error": f"stopped after {timeout:.0f} s (--budget-s)"}]
    if mode == "single":
        command = [sys.executable, __file__, *common]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[0]  # else the Trainer would see all GPUs
    else:
        kind = mode.removesuffix("-weak")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(kind)), "--num_processes", "2", __file__, *common]
        if gpus:
            if len(gpus) < 2:
                return [{"mode": mode, "error": f"needs 2 GPUs, {len(gpus)} visible"}]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:2])
    for stale in args.out.glob(f"{mode}-rank*.json"):
        stale.unlink()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"fsdp-scaling-{mode}-") as staging:  # shared by the ranks: checkpoints
        env[STAGING_VARIABLE] = staging
        process = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the launcher and every rank
            process.wait()
            return [{"mode": mode, "error": f"stopped after {timeout:.0f} s (--budget-s)"}]
    ranks = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"{mode}-rank*.json"))]
    if code != 0 or not ranks:
        return [{"mode": mode, "error": f"exit code {code}", "wall_s": time.time() - started}]
    for rank in ranks:
        rank["wall_s"] = time.time() - started
    return ranks


def summary(rows: list[dict]) -> dict:
    """One line per mode: worst per-GPU peak, rank 0's tokens/s, busy and losses, speed-up over single."""
    modes = {}
    for row in rows:
        entry = modes.setdefault(row["mode"], {"mode": row["mode"]})
        if row["mode"] == "cli-resume" or "error" in row:
            entry.update(row)
            continue
        if "error" in row:
            entry["error"] = row["error"]
            continue
        entry.update({key: row[key] for key in ("device", "world_size", "per_device_batch", "global_batch", "fsdp", "ddp", "wall_s")})
        for key in ("peak_gb", "built_gb"):
            if row[key] is not None:
                entry[key] = max(entry.get(key, 0.0), row[key])
        if row["rank"] == 0:
            keys = ("tokens_per_s", "step_s", "losses", "expert_paths", "fsdp_units", "checkpoint_round_trip", "gpu_busy", "gpu_busy_without_nccl")
            entry.update({key: row.get(key) for key in keys}, cuda_graphs=row.get("cuda_graphs"))
    single = modes.get("single", {})
    for entry in modes.values():
        if "tokens_per_s" in entry and single.get("tokens_per_s"):
            entry["speedup"] = entry["tokens_per_s"] / single["tokens_per_s"]
            if entry.get("peak_gb") is not None and single.get("peak_gb"):
                entry["peak_vs_single"] = entry["peak_gb"] / single["peak_gb"]
    return modes


def markdown(modes: dict) -> str:
    lines = ["| mode | GPUs | batch per GPU (global) | per-GPU memory after build | per-GPU peak | "
             "tokens/s | vs one GPU | GPU busy (w/o NCCL) | expert path | losses of the first steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    gb = lambda value: "-" if value is None else f"{value:.2f} GiB"
    for mode in MODES:
        entry = modes.get(mode)
        if entry is None or mode == "cli-resume":
            continue
        if "error" in entry:
            lines.append(f"| {mode} | | | {entry['error']} | | | | | | |")
            continue
        ratio = f"{entry['speedup']:.2f}x" if "speedup" in entry else "-"
        peak = gb(entry.get("peak_gb")) + (f" ({entry['peak_vs_single']:.2f}x)" if "peak_vs_single" in entry else "")
        busy = f"{entry['gpu_busy']:.0%} ({entry['gpu_busy_without_nccl']:.0%})" if entry.get("gpu_busy") is not None else "-"
        paths = entry.get("expert_paths") or {}
        path = f"{paths.get('grouped', 0)} grouped / {paths.get('per_expert', 0)} per expert"
        graphs = entry.get("cuda_graphs") or {}
        path += f"; {graphs['replayed']} steps replayed from a CUDA graph" if graphs.get("used") else ""
        losses = ", ".join(f"{loss:.4f}" for loss in entry["losses"])
        lines.append(f"| {mode} | {entry['world_size']} | {entry['per_device_batch']} ({entry['global_batch']}) | {gb(entry.get('built_gb'))} | "
                     f"{peak} | {entry['tokens_per_s']:,.0f} | {ratio} | {busy} | {path} | {losses} |")  # fmt: skip
    notes = [f"{mode}: {entry['fsdp_units']} FSDP units, checkpoint round trip max difference "
             f"{entry['checkpoint_round_trip']['max_difference']:.3g} over {entry['checkpoint_round_trip']['tensors']} tensors"
             for mode, entry in modes.items() if entry.get("fsdp_units")]  # fmt: skip
    resume = modes.get("cli-resume")
    if resume and "error" in resume:
        notes.append(f"cli-resume: {resume['error']}")
    elif resume:
        notes.append(f"cli-resume (moekit finetune {resume['launch']} --num-processes 2, checkpoint-3 resumed): steps {resume['steps']} "
                     f"losses {', '.join(f'{v:.5f}' for v in resume['uninterrupted'])} uninterrupted "
                     f"vs {', '.join(f'{v:.5f}' for v in resume['resumed'])} resumed, "
                     f"max rel. difference {resume['max_rel_difference']:.2g}")  # fmt: skip
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory for per-rank JSON, results.json and results.md.")
    parser.add_argument(
        "--modes", default=None, help=f"Comma list of {', '.join(MODES)} [default on GPUs: {','.join(DEFAULT_GPU_MODES)}; on CPUs: {','.join(CPU_MODES)}]."
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="Mixtral shape [default: 8x7b-16l, tiny with --tiny].")
    parser.add_argument("--seq", type=int, default=None, help="Tokens per sequence [default: 1024, 64 with --tiny].")
    parser.add_argument("--batch", type=int, default=4, help="Global batch of single, fsdp and ddp (sequences per optimizer step); must be even.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (step 1 wraps and shards the model).")
    parser.add_argument("--steps", type=int, default=6, help="Timed optimizer steps.")
    parser.add_argument(
        "--slice-mib", type=int, default=None, help="Dequantize expert projections in row slices of at most this many MiB [moekit's default: 1024]."
    )
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="moekit finetune's --cuda-graphs (single and ddp modes) [default: on]."
    )
    parser.add_argument("--nf4-gemm", action="store_true", help="Grouped GEMMs that read the NF4 experts themselves (moekit finetune --nf4-gemm).")
    parser.add_argument(
        "--host-profile", action="store_true", help="Record the host too in the profiled step: {mode}-host.txt and {mode}-trace.json.gz per mode."
    )
    parser.add_argument("--budget-s", type=float, default=510, help="Seconds for all modes; modes that would start past it are skipped.")
    parser.add_argument("--tiny", action="store_true", help="Tiny shape for a CPU smoke test.")
    parser.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("tiny" if args.tiny else "8x7b-16l")
    args.seq = args.seq or (64 if args.tiny else 1024)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    import torch

    if args.batch % 2:
        parser.error("--batch must be even (it is split over 2 processes)")
    modes = args.modes.split(",") if args.modes else list(DEFAULT_GPU_MODES if torch.cuda.is_available() else CPU_MODES)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    results_path = args.out / "results.json"
    rows = [row for row in json.loads(results_path.read_text())["rows"] if row["mode"] not in modes] if results_path.exists() else []
    deadline = time.time() + args.budget_s
    longest = 0.0
    for mode in modes:
        left = deadline - time.time()
        if left < longest * 0.8 or left < 30:  # would not finish: say so instead of overrunning
            rows.append({"mode": mode, "error": f"skipped: {left:.0f} s of --budget-s left"})
            continue
        print(f"[{mode}] starting ({left:.0f} s of the budget left)", flush=True)
        started = time.time()
        rows += run_mode(mode, args, timeout=left)
        longest = max(longest, time.time() - started)
        write_results(args, rows)  # after every mode, so a run cut short still leaves its table
        print(f"[{mode}] done in {time.time() - started:.0f} s", flush=True)
    print(write_results(args, rows))


def write_results(args, rows: list[dict]) -> str:
    summarized = summary(rows)
    results = {"shape": args.shape, "config": SHAPES[args.shape], "seq": args.seq, "global_batch": args.batch, "warmup": args.warmup,
               "steps": args.steps, "slice_mib": args.slice_mib, "cuda_graphs": args.cuda_graphs, "nf4_gemm": args.nf4_gemm,
               "rows": rows, "summary": summarized}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(summarized)
    (args.out / "results.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
