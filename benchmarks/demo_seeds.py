"""How far the demo's MoE stays from the best source on each domain, across zoo seeds (offline, CPU).

    python benchmarks/demo_seeds.py [--preset quick|standard] [--seeds 0 1 2] [--work DIR]

Runs `moekit demo` (`run_demo`) once per seed: each seed makes its own zoo (generated corpora, initialisation,
data order) and its own MoEs. Prints, per seed, the chosen routers' held-out perplexity relative to the best
source on each domain and on `mixed`, and then, per domain, the mean, standard deviation and maximum excess
over the seeds, and the tolerance this supports: the upper end of a 95% prediction interval for one more seed,
mean + t(0.975, n-1) * sd * sqrt(1 + 1/n), rounded up to a whole percent, over the worst domain. The presets'
`close_to_expert` (moekit/demo.py) is set from this; docs/demo.md gives the figures.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
from pathlib import Path

# Two-sided 95% Student t quantiles t(0.975, df) for small df.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def prediction_bound(values: list[float]) -> float:
    """Upper end of the 95% prediction interval for one more draw (needs at least 2 values)."""
    n = len(values)
    return statistics.mean(values) + T_975[n - 1] * statistics.stdev(values) * math.sqrt(1 + 1 / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=["quick", "standard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="QLoRA steps [default: the preset's] (the tolerance concerns the MoE before fine-tuning)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moekit-demo-seeds"))
    args = parser.parse_args()
    if not 2 <= len(args.seeds) <= 10:
        parser.error("give 2 to 10 seeds")

    from moekit.demo import MIXED, PRESETS, run_demo
    from moekit.zoo.corpora import DOMAINS

    excess: dict[str, list[float]] = {name: [] for name in (*DOMAINS, MIXED)}
    print(f"| seed | routers | {' | '.join(DOMAINS)} | {MIXED} |\n|---:|---|" + "---:|" * (len(DOMAINS) + 1))
    for seed in args.seeds:
        out = args.work / f"{args.preset}-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        report = run_demo(out, preset=args.preset, seed=seed, finetune_steps=args.steps)
        facts = report["demo"]["facts"]
        for domain in DOMAINS:
            excess[domain].append(facts["domains"][domain]["ratio"] - 1)
        excess[MIXED].append(facts["mixed"]["moe"] / facts["mixed"]["best"] - 1)
        print(f"| {seed} | {report['demo']['chosen']} | " + " | ".join(f"{excess[name][-1]:+.1%}" for name in (*DOMAINS, MIXED)) + " |", flush=True)

    print(f"\npreset {args.preset}, seeds {args.seeds}: MoE perplexity above the best source (held-out test split)\n")
    print("| set | mean | sd | max | 95% prediction bound |\n|---|---:|---:|---:|---:|")
    for name, values in excess.items():
        print(f"| {name} | {statistics.mean(values):+.1%} | {statistics.stdev(values):.1%} | {max(values):+.1%} | {prediction_bound(values):+.1%} |")
    worst = max(prediction_bound(excess[domain]) for domain in DOMAINS)
    print(f"\nsupported close_to_expert for {args.preset}: {math.ceil(100 * worst) / 100:.2f} (configured: {PRESETS[args.preset].close_to_expert:.2f})")


if __name__ == "__main__":
    main()
