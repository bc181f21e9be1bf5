"""Peak RSS and wall time of `moekit build` vs `mergekit-moe` on the same recipe, in one run.

    python benchmarks/build_vs_mergekit.py [--layers 16 --hidden 2048 --intermediate 5632 --experts 4] [--work DIR]

Makes random-weight Llama checkpoints of the given shape (a base and one fine-tune per expert, bf16,
safetensors), writes one mergekit-moe recipe (gate_mode hidden, the default of both tools), then runs
each tool in its own process on the CPU and reads that process's peak RSS from the kernel (wait4).
Both outputs are checked to hold the same expert and attention tensors. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = [["def main():", "import numpy as np", "class Foo:"], ["Once upon a time", "Dear diary", "The poem"],
           ["12 + 30 =", "Solve for x", "integral of"], ['{"name":', "<html>", "SELECT * FROM"]]


def make_sources(work: Path, args) -> list[Path]:
    import transformers

    from moekit.testing import make_tokenizer

    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                      num_key_value_heads=max(1, args.hidden // 512), tie_word_embeddings=False)
    paths = []
    for index in range(args.experts + 1):
        path = work / ("base" if index == 0 else f"expert{index}")
        paths.append(path)
        if (path / "config.json").exists():
            continue
        torch.manual_seed(index)
        with torch.device("cpu"):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="2GB")
        tokenizer.save_pretrained(path)
        del model
    return paths


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed:\n{process.stderr.read()[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def same_tensors(a: Path, b: Path) -> bool:
    """Spot-check: attention and one expert's weights equal in both outputs (mergekit writes the fused layout)."""
    from transformers import AutoModelForCausalLM

    left = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16).state_dict()
    right = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16).state_dict()
    names = [n for n in left if "gate.weight" not in n]  # routers: equal modes, different numerics (bf16 vs fp32 passes)
    return all(torch.equal(left[n], right[n]) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-build-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    base, *experts = make_sources(args.work, args)
    recipe = args.work / "recipe.yaml"
    lines = [f"base_model: {base}", "gate_mode: hidden", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for path, prompts in zip(experts, PROMPTS * 4):
        lines += [f"  - source_model: {path}", f"    positive_prompts: {json.dumps(prompts)}"]
    recipe.write_text("\n".join(lines) + "\n")

    bin_dir = Path(sys.executable).parent
    outputs = {"mergekit-moe 0.1.5": args.work / "out-mergekit", "moekit build": args.work / "out-moekit"}
    commands = {
        "mergekit-moe 0.1.5": [str(bin_dir / "mergekit-moe"), str(recipe), str(outputs["mergekit-moe 0.1.5"]), "--device", "cpu", "--lazy-unpickle"],
        "moekit build": [str(bin_dir / "moekit"), "build", str(recipe), "-o", str(outputs["moekit build"]), "--device", "cpu"],
    }
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    results = {name: run(command) for name, command in commands.items()}
    equal = same_tensors(args.work / "out-mergekit", args.work / "out-moekit")

    source_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    (mk_wall, mk_rss), (mo_wall, mo_rss) = results.values()
    print(f"\nshape: {args.experts}x Llama(layers={args.layers}, hidden={args.hidden}, intermediate={args.intermediate}), "
          f"{source_gb:.2f} GB per source (bf16), CPU, {os.cpu_count()} cores; non-router tensors identical: {equal}\n")
    print("| tool | wall time (s) | peak RSS (GB) |\n|---|---:|---:|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    print(f"| moekit / mergekit-moe | {mo_wall / mk_wall:.2f}x | {mo_rss / mk_rss:.2f}x |")
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
