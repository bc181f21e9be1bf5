"""Start-up time of the `moekit` command: how long a user waits before a command does anything.

    python benchmarks/startup.py [--repeat 5] [--json results.json]

Runs each command below in a fresh interpreter, `--repeat` times, and prints the median wall time, the
median CPU time (user + system: what the run costs whatever else the machine does), the median time spent
importing modules (`python -X importtime`, top-level imports summed) and which heavy libraries were imported.
Targets on a 2-core machine: an argument error in under 1 s, `moekit plan` (config only) in under 3 s.
The load average is printed too: on a busy machine every figure grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moekit.testing import TINY_MOE_CONFIG

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "lm_eval", "matplotlib")
MIXTRAL_4X7B_CONFIG = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
}


def commands(work: Path) -> dict[str, list[str]]:
    for name, config in (("tiny-moe", TINY_MOE_CONFIG), ("4x7b", MIXTRAL_4X7B_CONFIG)):
        (work / name).mkdir(exist_ok=True)
        (work / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return {
        "moekit --help": ["--help"],
        "moekit bulid (mistyped)": ["bulid"],
        "moekit finetune (no --data)": ["finetune", str(work / "tiny-moe"), "-o", str(work / "out")],
        "moekit finetune (bad --max-steps)": ["finetune", str(work / "tiny-moe"), "-o", str(work / "out"), "--data", "d.jsonl", "--max-steps", "x"],
        "moekit plan (tiny MoE)": ["plan", str(work / "tiny-moe")],
        "moekit plan (4x7B, --gpu-memory 24GB)": ["plan", str(work / "4x7b"), "--gpu-memory", "24GB"],
    }


def run_once(args: list[str]) -> dict:
    """One plain run (wall and CPU time, exit code) and one under -X importtime (import time, heavy modules)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    plain = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "moekit", *args], capture_output=True, text=True)
    import_us, heavy = 0, set()
    for line in traced.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():
            continue  # the header line
        if not name.startswith("  "):  # a top-level import: its cumulative time holds its children's
            import_us += int(cumulative)
        if name.strip().split(".")[0] in HEAVY:
            heavy.add(name.strip().split(".")[0])
    return {"wall_s": wall, "cpu_s": cpu, "import_s": import_us / 1e6, "exit_code": plain.returncode, "heavy": sorted(heavy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (the median is reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    options = parser.parse_args()
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in commands(Path(tmp)).items():
            runs = [run_once(args) for _ in range(options.repeat)]
            results[label] = {
                "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
                "import_s": round(statistics.median(r["import_s"] for r in runs), 2),
                "exit_code": runs[0]["exit_code"],
                "heavy_imports": runs[0]["heavy"],
            }
    load_after = os.getloadavg()
    width = max(map(len, results))
    print(f"{'command':<{width}}  {'wall s':>7}  {'CPU s':>6}  {'import s':>8}  exit  heavy libraries imported")
    for label, result in results.items():
        print(
            f"{label:<{width}}  {result['wall_s']:>7.2f}  {result['cpu_s']:>6.2f}  {result['import_s']:>8.2f}  {result['exit_code']:>4}  "
            f"{', '.join(result['heavy_imports']) or '-'}"
        )
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs; median of {options.repeat} runs")
    if options.json:
        options.json.write_text(json.dumps({"results": results, "load_average": [load_before[0], load_after[0]], "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
