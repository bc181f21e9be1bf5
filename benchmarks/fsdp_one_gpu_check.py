"""The Trainer's FSDP wiring on one GPU, through the real CLI (a GPU machine; about 3 minutes):

    python benchmarks/fsdp_one_gpu_check.py /tmp/fsdp-check

Builds a tiny 3-expert MoE, then fine-tunes it 6 steps (checkpoint at step 3) twice: under
`accelerate launch` with moekit's fsdp_qlora.yaml and one process, and as a plain single-process run;
prints both loss curves, the checkpoint contents and the adapters' difference; resumes the FSDP run's
step-3 checkpoint on one process (and, to show it is refused, under FSDP); exports the FSDP run.
Each command's output goes to $OUT (or the work directory) as `<label>.log`. It checks the wiring
(saving, gathering, resuming, export), not scaling: that needs two GPUs (benchmarks/fsdp_scaling.py).
"""
import json, os, shutil, subprocess, sys
from pathlib import Path
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
from moekit.testing import make_tokenizer, make_dense_checkpoint
from moekit.build import build, BuildOptions
from moekit.recipe import parse_recipe
tok = make_tokenizer()
base = make_dense_checkpoint(root / "base", "llama", seed=0, tokenizer=tok)
experts = [make_dense_checkpoint(root / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5) for i in range(3)]
recipe = "\n".join([f"base_model: {base}", "gate_mode: random", "dtype: float32", "experts_per_token: 2", "experts:"]
                   + sum([[f"  - source_model: {e}", f"    positive_prompts: [\"prompt {i}\"]"] for i, e in enumerate(experts)], [])) + "\n"
build(parse_recipe(recipe), root / "moe", BuildOptions(device="cpu"))
rows = [{"messages": [{"role": "user", "content": f"{i % 7} + {(i * 3) % 5} ="}, {"role": "assistant", "content": f"{i % 7 + (i * 3) % 5}. The quick brown fox."}]} for i in range(32)]
(root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
common = [str(root / "moe"), "--data", str(root / "chat.jsonl"), "--max-steps", "6", "--save-steps", "3", "--batch-size", "4",
          "--max-seq-len", "64", "--lora-r", "8", "--learning-rate", "5e-3", "--lora-dropout", "0", "--target", "attn,experts,gate"]
from moekit.finetune.distributed import config_path
def run(args, label):
    r = subprocess.run(args, capture_output=True, text=True)
    (Path(os.environ.get("OUT", root)) / (label.replace(" ", "_") + ".log")).write_text(r.stdout + "\n=====STDERR\n" + r.stderr)
    print(f"== {label}: rc {r.returncode}"); print(r.stderr[-2500:] if r.returncode else r.stdout[-1500:]); return r.returncode
run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp")), "--num_processes", "1", "-m", "moekit", "finetune", *common, "-o", str(root / "fsdp")], "fsdp 1 GPU")
run([sys.executable, "-m", "moekit", "finetune", *common, "-o", str(root / "single")], "single")
def losses(d): return [(r["step"], round(r["lm_loss"], 5)) for r in map(json.loads, (d / "training_log.jsonl").read_text().splitlines()) if "lm_loss" in r]
for name in ("fsdp", "single"):
    d = root / name
    if d.exists():
        print(name, sorted(p.name for p in d.iterdir()), losses(d))
        from safetensors import safe_open
        with safe_open(str(d / "adapter" / "adapter_model.safetensors"), "pt") as f: print(name, "adapter tensors", len(list(f.keys())))
        print(name, "checkpoints", sorted(p.name for p in (d / "checkpoints").iterdir()) if (d / "checkpoints").exists() else None)
        print(name, "files in checkpoint-3", sorted(p.name for p in (d / "checkpoints" / "checkpoint-3").iterdir()) if (d / "checkpoints" / "checkpoint-3").exists() else None)
if (root / "fsdp" / "checkpoints" / "checkpoint-3").exists():
    (root / "resumed.partial" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "fsdp" / "checkpoints" / "checkpoint-3", root / "resumed.partial" / "checkpoints" / "checkpoint-3")
    run([sys.executable, "-m", "moekit", "finetune", *common, "-o", str(root / "resumed"), "--resume"], "fsdp checkpoint resumed on 1 process")
    if (root / "resumed").exists(): print("resumed", losses(root / "resumed"))
if (root / "fsdp" / "checkpoints" / "checkpoint-3").exists():
    (root / "fsdpresumed.partial" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "fsdp" / "checkpoints" / "checkpoint-3", root / "fsdpresumed.partial" / "checkpoints" / "checkpoint-3")
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp")), "--num_processes", "1", "-m", "moekit", "finetune", *common, "-o", str(root / "fsdpresumed"), "--resume"], "fsdp resume under fsdp refused")
    if (root / "fsdpresumed").exists(): print("fsdpresumed", losses(root / "fsdpresumed"))
if (root / "fsdp").exists():
    run([sys.executable, "-m", "moekit", "export", str(root / "fsdp"), "-o", str(root / "export")], "export of the fsdp run")
    from safetensors.torch import load_file
    a, b = load_file(str(root / "fsdp/adapter/adapter_model.safetensors")), load_file(str(root / "single/adapter/adapter_model.safetensors"))
    print("adapter fsdp vs single: same keys", sorted(a) == sorted(b), "max rel diff", max(float((a[k].float() - b[k].float()).norm() / (b[k].float().norm() + 1e-12)) for k in b))
