"""What per-expert calibration data gives over positive prompts alone, on the demo's tiny zoo (offline, CPU).

    python benchmarks/calibration_data.py [--preset quick|standard] [--max-tokens 20000] [--work DIR]

Builds the demo's MoE (`moekit/zoo/tiny-4x.yaml`: a tiny Llama base and four trained domain experts)
with `hidden` and `calibrated` routers from the recipe's eight prompts per expert, and `calibrated`
from those prompts (or the first prompt only) with and without each expert's training split (the
zoo's `data/<domain>/train.jsonl`) as calibration data. Each MoE is then
measured on the zoo's held-out split, which neither prompts nor calibration data saw:
- routing accuracy: share of held-out tokens of each domain whose top-1 router choice is that domain's
  expert, averaged over layers and domains (chance: 25%);
- mixed perplexity: over the held-out blocks of all four domains together.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch


def heldout_blocks(zoo, domain: str, tokenizer, limit: int) -> list[torch.Tensor]:
    lines = zoo.heldout(domain).read_text(encoding="utf-8").splitlines()[:limit]
    return [tokenizer(json.loads(line)["text"], return_tensors="pt")["input_ids"] for line in lines]


def measure(model_dir: Path, zoo, domains: list[str], limit: int) -> tuple[float, float]:
    """(routing accuracy, mixed perplexity) on the held-out blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    accuracies, total_loss, total_tokens = [], 0.0, 0
    for expert, domain in enumerate(domains):
        hits, count = 0, 0
        for ids in heldout_blocks(zoo, domain, tokenizer, limit):
            with torch.no_grad():
                out = model(ids, labels=ids, output_router_logits=True)
            tokens = ids.shape[1] - 1
            total_loss += out.loss.item() * tokens
            total_tokens += tokens
            for layer_logits in out.router_logits:  # (tokens, experts) per layer
                chosen = layer_logits.reshape(-1, len(domains)).argmax(-1)
                hits += int((chosen == expert).sum())
                count += chosen.numel()
        accuracies.append(hits / count)
    return sum(accuracies) / len(accuracies), math.exp(total_loss / total_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=["quick", "standard"])
    parser.add_argument("--max-tokens", type=int, default=20000, help="calibration tokens per expert")
    parser.add_argument("--heldout", type=int, default=32, help="held-out blocks per domain")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-calibration-bench"))
    args = parser.parse_args()

    import yaml

    from moekit.build.options import BuildOptions
    from moekit.build.pipeline import build
    from moekit.demo import RECIPE
    from moekit.recipe import parse_recipe
    from moekit.zoo import PRESETS, ensure_zoo, use_zoo

    settings = PRESETS[args.preset]
    zoo = ensure_zoo(settings)
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    domains = [expert["source_model"].removeprefix("zoo:") for expert in recipe["experts"]]
    variants = {  # name: (gate mode, calibration data?, prompts kept per expert)
        "hidden, prompts": ("hidden", False, None),
        "calibrated, prompts": ("calibrated", False, None),
        "calibrated, prompts + data": ("calibrated", True, None),
        "calibrated, one prompt": ("calibrated", False, 1),
        "calibrated, one prompt + data": ("calibrated", True, 1),
    }
    rows = {}
    with use_zoo(settings):
        for name, (gate_mode, with_data, keep_prompts) in variants.items():
            data = dict(recipe, gate_mode=gate_mode)
            data["experts"] = [dict(e, positive_prompts=e["positive_prompts"][:keep_prompts]) for e in recipe["experts"]]
            if with_data:
                for expert, domain in zip(data["experts"], domains):
                    expert["moekit"] = {"calibration": {"data": str(zoo.train_data(domain)), "max_tokens": args.max_tokens}}
            out = args.work / name.replace(", ", "-").replace(" + ", "-")
            shutil.rmtree(out, ignore_errors=True)
            build(parse_recipe(yaml.safe_dump(data)), out, BuildOptions(device="cpu"))
            rows[name] = measure(out, zoo, domains, args.heldout)
            print(f"{name}: routing accuracy {rows[name][0]:.1%}, mixed perplexity {rows[name][1]:.3f}", flush=True)

    print(
        f"\nzoo preset {args.preset}; calibration data: each domain's training split, {args.max_tokens} tokens per expert; "
        f"held-out: {args.heldout} blocks per domain\n"
    )
    print("| routers | held-out routing accuracy (top-1, chance 25%) | mixed perplexity |\n|---|---:|---:|")
    for name, (accuracy, perplexity) in rows.items():
        print(f"| {name} | {accuracy:.1%} | {perplexity:.3f} |")


if __name__ == "__main__":
    main()
