"""The Trainer's FSDP wiring on one GPU, through the real CLI (a GPU machine; about 3 minutes):

    python benchmarks/fsdp_one_gpu_check.py /tmp/fsdp-check

Builds a tiny 3-expert MoE, then fine-tunes it 6 steps (checkpoint at step 3) twice: under
`accelerate launch` with moekit's fsdp_qlora.yaml and one process, and as a plain single-process run;
prints both loss curves, the checkpoint contents and the adapters' difference; resumes the FSDP run's
step-3 checkpoint on one process and under FSDP; exports the FSDP run.
Each command's output goes to $OUT (or the work directory) as `<label>.log`. It checks the wiring
(saving, gathering, resuming, export), not scaling: that needs two GPUs (benchmarks/fsdp_scaling.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.finetune.distributed import config_path
from moekit.recipe import parse_recipe
from moekit.testing import make_dense_checkpoint, make_tokenizer

FINETUNE = ["--max-steps", "6", "--save-steps", "3", "--batch-size", "4", "--max-seq-len", "64", "--lora-r", "8",
            "--learning-rate", "5e-3", "--lora-dropout", "0", "--target", "attn,experts,gate"]  # fmt: skip
MOEKIT = [sys.executable, "-m", "moekit"]
UNDER_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp")), "--num_processes", "1", "-m", "moekit"]


def make_moe(root: Path) -> Path:
    """A 3-expert MoE of tiny random Llamas (random gates) and a learnable chat set."""
    base = make_dense_checkpoint(root / "base", "llama", seed=0, tokenizer=make_tokenizer())
    experts = [make_dense_checkpoint(root / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5) for i in range(3)]
    lines = [f"base_model: {base}", "gate_mode: random", "dtype: float32", "experts_per_token: 2", "experts:"]
    for i, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f'    positive_prompts: ["prompt {i}"]']
    build(parse_recipe("\n".join(lines) + "\n"), root / "moe", BuildOptions(device="cpu"))
    rows = [
        {"messages": [{"role": "user", "content": f"{i % 7} + {i * 3 % 5} ="}, {"role": "assistant", "content": f"{i % 7 + i * 3 % 5}. The quick brown fox."}]}
        for i in range(32)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "moe"


def run(command: list[str], label: str, logs: Path) -> int:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    (logs / (label.replace(" ", "_") + ".log")).write_text(done.stdout + "\n=====STDERR\n" + done.stderr)
    print(f"== {label}: rc {done.returncode}")
    print(done.stderr[-2500:] if done.returncode else done.stdout[-1500:])
    return done.returncode


def losses(out: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (out / "training_log.jsonl").read_text().splitlines())
    return [(r["step"], round(r["lm_loss"], 5)) for r in records if "lm_loss" in r]


def describe(name: str, out: Path) -> None:
    print(name, sorted(p.name for p in out.iterdir()), losses(out))
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        print(name, "adapter tensors", len(list(f.keys())))
    checkpoints = out / "checkpoints"
    print(name, "checkpoints", sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else None)
    step3 = checkpoints / "checkpoint-3"
    print(name, "files in checkpoint-3", sorted(p.name for p in step3.iterdir()) if step3.exists() else None)


def resume_from(checkpoint: Path, out: Path, launcher: list[str], common: list[str], label: str, logs: Path) -> None:
    """Resume `checkpoint` into a fresh `out`: put it where `--resume` looks (OUT.partial/checkpoints)."""
    shutil.copytree(checkpoint, out.with_name(out.name + ".partial") / "checkpoints" / checkpoint.name)
    run([*launcher, "finetune", *common, "-o", str(out), "--resume"], label, logs)
    if out.exists():
        print(out.name, losses(out))


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("OUT", root))
    common = [str(make_moe(root)), "--data", str(root / "chat.jsonl"), *FINETUNE]
    run([*UNDER_FSDP, "finetune", *common, "-o", str(root / "fsdp")], "fsdp 1 GPU", logs)
    run([*MOEKIT, "finetune", *common, "-o", str(root / "single")], "single", logs)
    for name in ("fsdp", "single"):
        if (root / name).exists():
            describe(name, root / name)
    checkpoint = root / "fsdp" / "checkpoints" / "checkpoint-3"
    if checkpoint.exists():
        resume_from(checkpoint, root / "resumed", MOEKIT, common, "fsdp checkpoint resumed on 1 process", logs)
        resume_from(checkpoint, root / "fsdpresumed", UNDER_FSDP, common, "fsdp checkpoint resumed under fsdp", logs)
    if (root / "fsdp").exists():
        run([*MOEKIT, "export", str(root / "fsdp"), "-o", str(root / "export")], "export of the fsdp run", logs)
        fsdp, single = (load_file(str(root / name / "adapter" / "adapter_model.safetensors")) for name in ("fsdp", "single"))
        worst = max(float((fsdp[k].float() - single[k].float()).norm() / (single[k].float().norm() + 1e-12)) for k in single)
        print("adapter fsdp vs single: same keys", sorted(fsdp) == sorted(single), "max rel diff", worst)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
