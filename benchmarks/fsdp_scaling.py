"""1 GPU vs 2-GPU FSDP vs 2-GPU DDP for `moekit finetune`: per-GPU peak memory, tokens/s, first-step losses.

Each mode trains the same MoE, built with random weights directly in GPU memory by `benchmarks/plan_accuracy.py`'s
`build_quantized` (layer by layer, every linear layer NF4 as `moekit finetune` loads it), through the trainer's
own `_make_trainer` (TRL SFTTrainer, bf16, gradient checkpointing, router aux loss, AdamW), on the same random
token sequences with the same seed. The global batch is held equal: one GPU runs `--batch` sequences per step,
each of two processes `--batch / 2`, so the loss curves should agree.

- single: one process.
- fsdp / ddp: `accelerate launch` with the config `moekit finetune --fsdp / --ddp` ships
  (`moekit/finetune/accelerate/fsdp_qlora.yaml` / `ddp.yaml`); under FSDP the 4-bit weights are stored in bf16
  (`bnb_4bit_quant_storage`), as the trainer does when `ACCELERATE_USE_FSDP=true`.

Memory: `torch.cuda.max_memory_allocated()` per GPU over the training steps after the first (peak stats are
reset once step 1 has wrapped/sharded the model), plus the allocation right after building (the whole 4-bit
model on every GPU: each process builds it before FSDP shards it). Tokens/s: global tokens per step over the
mean step time of steps 2+. The default shape is an 8x7B Mixtral cut to 16 layers (about 12 GB of NF4 weights),
so that weights dominate the memory.

    # 2-GPU machine (the device tool's nvidia-h200-x2), from the repository root, ~10 min in all:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/fsdp_scaling.py --out results/fsdp
    python benchmarks/fsdp_scaling.py --modes fsdp --out results/fsdp    # one mode per call (results merge)
    python benchmarks/fsdp_scaling.py --tiny --out /tmp/fsdp             # CPU smoke test: single and ddp (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the model is built by the sibling benchmark's helpers
sys.path.insert(0, str(Path(__file__).parent))
from plan_accuracy import EIGHT_BY_7B, TINY, build_quantized, make_config

SHAPES = {"8x7b-16l": dict(EIGHT_BY_7B, num_hidden_layers=16), "8x7b": EIGHT_BY_7B, "tiny": TINY}
MODES = ("single", "fsdp", "ddp")
GB = 2**30


def worker(args) -> None:
    """One process of a mode: build, train `--steps` steps, write this rank's figures."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from moekit.finetune import quantize
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
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    config = make_config("mixtral", SHAPES[args.shape])
    started = time.time()
    quantize_moe = quantize.quantize_moe
    if fsdp:  # what load_moe_for_training does under FSDP: 4-bit codes stored in the compute dtype
        quantize.quantize_moe = lambda model, **kw: quantize_moe(model, compute_dtype=compute_dtype, quant_storage=compute_dtype, **kw)
    try:
        model = build_quantized(config, device, bits=4)
    finally:
        quantize.quantize_moe = quantize_moe
    built_s = time.time() - started
    built_gb = torch.cuda.memory_allocated() / GB if cuda else None

    per_device = args.batch // world
    options = FinetuneOptions(data="random tokens", target=["attn", "experts"], lora_r=16, lora_dropout=0.0, batch_size=per_device,
                              max_seq_len=args.seq, max_steps=args.steps, save_steps=10**6, warmup_ratio=0.0, learning_rate=1e-4, seed=0)  # fmt: skip
    from moekit.finetune.targets import apply_targets

    torch.manual_seed(0)
    wrapped, _table = apply_targets(model, options)
    tokenizer = make_tokenizer()
    ids = torch.randint(4, config.vocab_size, (args.steps * args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    data = type("Data", (), {"dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()}), "format": "tokens"})()

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, *_rest, **_kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.start)
            if state.global_step == 1 and cuda:  # step 1 wrapped (and sharded) the model: measure from here
                torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as staging:
        trainer = _make_trainer(wrapped, tokenizer, data, Path(staging), options, compute_dtype, None)
        trainer.add_callback(Timer())
        trainer.train()
    timed = step_times[1:] or step_times
    result = {
        "mode": args.worker, "rank": rank, "world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "fsdp": trainer.is_fsdp_enabled, "ddp": world > 1 and not trainer.is_fsdp_enabled,
        "per_device_batch": per_device, "global_batch": per_device * world, "seq": args.seq,
        "built_s": built_s, "built_gb": built_gb, "peak_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
        "step_s": sum(timed) / len(timed), "tokens_per_s": per_device * world * args.seq * len(timed) / sum(timed),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }  # fmt: skip
    Path(args.out, f"{args.worker}-rank{rank}.json").write_text(json.dumps(result, indent=1))


def run_mode(mode: str, args) -> list[dict]:
    """Start the processes of `mode` and collect their per-rank results."""
    from moekit.finetune.distributed import config_path

    common = ["--worker", mode, "--out", str(args.out), "--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
    if mode == "single":
        command = [sys.executable, __file__, *common]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(mode)), "--num_processes", "2", __file__, *common]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for stale in args.out.glob(f"{mode}-rank*.json"):
        stale.unlink()
    started = time.time()
    completed = subprocess.run(command, check=False, env=env)
    ranks = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"{mode}-rank*.json"))]
    if completed.returncode != 0 or not ranks:
        return [{"mode": mode, "error": f"exit code {completed.returncode}", "wall_s": time.time() - started}]
    return ranks


def summary(rows: list[dict]) -> dict:
    """One line per mode: worst per-GPU peak, tokens/s, rank 0's losses."""
    modes = {}
    for row in rows:
        entry = modes.setdefault(row["mode"], {"mode": row["mode"]})
        if "error" in row:
            entry["error"] = row["error"]
            continue
        entry.update({key: row[key] for key in ("device", "world_size", "per_device_batch", "global_batch", "fsdp", "ddp")})
        for key in ("peak_gb", "built_gb"):
            if row[key] is not None:
                entry[key] = max(entry.get(key, 0.0), row[key])
        if row["rank"] == 0:
            entry.update(tokens_per_s=row["tokens_per_s"], step_s=row["step_s"], losses=row["losses"])
    return modes


def markdown(modes: dict) -> str:
    lines = ["| mode | GPUs | batch per GPU (global) | per-GPU memory after build | per-GPU peak, steps 2+ | tokens/s | losses of the first steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for mode in MODES:
        entry = modes.get(mode)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"| {mode} | | | {entry['error']} | | | |")
            continue
        gb = lambda value: "-" if value is None else f"{value:.2f} GiB"
        losses = ", ".join(f"{loss:.4f}" for loss in entry["losses"])
        lines.append(f"| {mode} | {entry['world_size']} | {entry['per_device_batch']} ({entry['global_batch']}) | {gb(entry.get('built_gb'))} | "
                     f"{gb(entry.get('peak_gb'))} | {entry['tokens_per_s']:,.0f} | {losses} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory for per-rank JSON, results.json and results.md.")
    parser.add_argument("--modes", default=None, help="Comma list of single, fsdp, ddp [default: all on GPUs; single,ddp on CPUs].")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="Mixtral shape [default: 8x7b-16l, tiny with --tiny].")
    parser.add_argument("--seq", type=int, default=None, help="Tokens per sequence [default: 1024, 64 with --tiny].")
    parser.add_argument("--batch", type=int, default=4, help="Global batch (sequences per optimizer step); must be even.")
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps (the first is not timed).")
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
    modes = args.modes.split(",") if args.modes else (list(MODES) if torch.cuda.is_available() else ["single", "ddp"])
    results_path = args.out / "results.json"
    rows = [row for row in json.loads(results_path.read_text())["rows"] if row["mode"] not in modes] if results_path.exists() else []
    for mode in modes:
        print(f"[{mode}] starting", flush=True)
        rows += run_mode(mode, args)
    summarized = summary(rows)
    results_path.write_text(json.dumps({"shape": args.shape, "config": SHAPES[args.shape], "seq": args.seq, "global_batch": args.batch,
                                        "steps": args.steps, "rows": rows, "summary": summarized}, indent=1))  # fmt: skip
    table = markdown(summarized)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
