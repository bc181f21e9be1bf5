"""Peak RSS and wall time of `moekit build` vs `mergekit-moe` on the same recipe, in one run.

    python benchmarks/build_vs_mergekit.py [--layers 16 --hidden 2048 --intermediate 5632 --experts 4] [--work DIR]
        [--rows few,realistic] [--prompts 64 --prompt-tokens 256] [--device cpu|cuda]

Makes random-weight Llama checkpoints of the given shape (a base and one fine-tune per expert, bf16,
safetensors), writes mergekit-moe recipes and runs each tool in its own process (gate pass on `--device`), reading
that process's peak RSS from the kernel (wait4). Rows:
- few: three short prompts per expert, gate_mode hidden (the default of both tools);
- realistic: `--prompts` positive prompts of about `--prompt-tokens` tokens per expert, gate_mode
  hidden (both tools) and calibrated (moekit only; mergekit-moe has no such mode).
Both tools' outputs are checked to hold the same expert and attention tensors. Prints a Markdown table.
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

PROMPTS = [
    ["def main():", "import numpy as np", "class Foo:"],
    ["Once upon a time", "Dear diary", "The poem"],
    ["12 + 30 =", "Solve for x", "integral of"],
    ['{"name":', "<html>", "SELECT * FROM"],
]


def make_sources(work: Path, args) -> list[Path]:
    import transformers

    from moekit.testing import make_tokenizer

    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        tie_word_embeddings=False,
    )
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


# Linux folds the hiwater RSS of the address space a child replaces at exec into the child's ru_maxrss, and a
# child spawned (vfork) from this process starts in this process's address space: launched from here, every
# tool would report at least this benchmark's own RSS (about 0.8 GB once it has compared two outputs). So each
# tool is started by a small launcher process that imports nothing, and the launcher reports the tool's peak.
LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
code = os.waitstatus_to_exitcode(status)
if code != 0:
    sys.stderr.write(process.stderr.read().decode(errors="replace")[-3000:])
print(usage.ru_maxrss)
sys.exit(code)
"""


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one child process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return wall, int(done.stdout.split()[-1]) * 1024 / 1e9


DOMAINS = [
    ("def f{i}(x, y):\n    return x * {i} + y\nimport os\nprint(os.getcwd())\n", "code"),
    ("Once upon a time, {i} lazy dogs watched the quick brown fox write a poem about the sea. ", "prose"),
    ("{i} + 30 = {j}, so 7 * 6 = 42 and 100 - 58 = 42; solve for x in {i}x = {j}. ", "math"),
    ('{{"name": "item{i}", "price": {j}}} <html><body>SELECT * FROM t{i} WHERE id = {j};</body></html> ', "data"),
]


def long_prompts(tokenizer, domain: int, count: int, tokens: int) -> list[str]:
    """`count` prompts of about `tokens` tokens each, in one of four domains (varied by numbers)."""
    template = DOMAINS[domain % len(DOMAINS)][0]
    prompts = []
    for p in range(count):
        text, i = "", p * 97
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
            text += template.format(i=i, j=i * 7 + domain)
            i += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def write_recipe(path: Path, base: Path, experts: list[Path], prompts: list[list[str]], gate_mode: str) -> Path:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for expert, expert_prompts in zip(experts, prompts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: {json.dumps(expert_prompts)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


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
    parser.add_argument("--rows", default="few,realistic", help="comma-separated: few, realistic")
    parser.add_argument("--prompts", type=int, default=64, help="positive prompts per expert in the realistic rows")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt in the realistic rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both tools run the gate pass")
    parser.add_argument("--gate-batch-size", type=int, default=None, help="moekit's --gate-batch-size (default: moekit's default)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    base, *experts = make_sources(args.work, args)
    from moekit.testing import make_tokenizer

    tokenizer = make_tokenizer()
    script = Path(sys.executable).parent / "mergekit-moe"
    # without its console script (a --target install): the same entry point as a module
    mergekit_moe = [str(script)] if script.exists() else [sys.executable, "-m", "mergekit.scripts.moe"]
    rows = {}  # (row, tool) -> (wall, rss)
    checks = []

    def run_both(row: str, recipe: Path, tools=("mergekit-moe 0.1.5", "moekit build")) -> None:
        outputs = {"mergekit-moe 0.1.5": args.work / f"out-mergekit-{row}", "moekit build": args.work / f"out-moekit-{row}"}
        commands = {
            "mergekit-moe 0.1.5": mergekit_moe + [str(recipe), str(outputs["mergekit-moe 0.1.5"]), "--device", args.device, "--lazy-unpickle"],
            "moekit build": [sys.executable, "-m", "moekit", "build", str(recipe), "-o", str(outputs["moekit build"]), "--device", args.device]
            + (["--gate-batch-size", str(args.gate_batch_size)] if args.gate_batch_size else []),
        }
        for tool in tools:
            shutil.rmtree(outputs[tool], ignore_errors=True)
            rows[(row, tool)] = run(commands[tool])
            print(f"{row} / {tool}: {rows[(row, tool)][0]:.1f} s, {rows[(row, tool)][1]:.2f} GB", flush=True)
        if len(tools) == 2:
            checks.append(f"{row}: non-router tensors identical: {same_tensors(outputs['mergekit-moe 0.1.5'], outputs['moekit build'])}")
        if not args.keep:
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)

    if "few" in args.rows:
        run_both("few prompts, hidden", write_recipe(args.work / "recipe-few.yaml", base, experts, PROMPTS * 4, "hidden"))
    if "realistic" in args.rows:
        prompts = [long_prompts(tokenizer, index, args.prompts, args.prompt_tokens) for index in range(len(experts))]
        label = f"{args.prompts} prompts x {args.prompt_tokens} tokens"
        run_both(f"{label}, hidden", write_recipe(args.work / "recipe-realistic-hidden.yaml", base, experts, prompts, "hidden"))
        run_both(
            f"{label}, calibrated", write_recipe(args.work / "recipe-realistic-calibrated.yaml", base, experts, prompts, "calibrated"), tools=("moekit build",)
        )

    source_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(
        f"\nshape: {args.experts}x Llama(layers={args.layers}, hidden={args.hidden}, intermediate={args.intermediate}), "
        f"{source_gb:.2f} GB per source (bf16), gate pass on {args.device}, {os.cpu_count()} CPU cores; " + "; ".join(checks) + "\n"
    )
    print("| recipe | tool | wall time (s) | peak RSS (GB) |\n|---|---|---:|---:|")
    for (row, tool), (wall, rss) in rows.items():
        print(f"| {row} | {tool} | {wall:.1f} | {rss:.2f} |")
    few = rows.get(("few prompts, hidden", "moekit build"))
    for (row, tool), (wall, rss) in rows.items():
        theirs = rows.get((row, "mergekit-moe 0.1.5"))
        if tool == "moekit build" and few and row != "few prompts, hidden":
            print(
                f"\n{row}: moekit peak RSS {rss / few[1]:.2f}x its few-prompt build" + (f", wall time {wall / theirs[0]:.2f}x mergekit-moe's" if theirs else "")
            )
        elif tool == "moekit build" and theirs:
            print(f"\n{row}: moekit / mergekit-moe: wall {wall / theirs[0]:.2f}x, peak RSS {rss / theirs[1]:.2f}x")


if __name__ == "__main__":
    main()
