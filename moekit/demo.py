"""`moekit demo`: the whole pipeline, offline, on the tiny zoo of trained domain experts.

    run_demo(out, preset="standard") -> dict    (the report.json content)

1. make or reuse the zoo (`moekit.zoo`): a tiny Llama base and one expert per domain;
2. build the MoE of `moekit/zoo/tiny-4x.yaml` (linked as `recipes/tiny-4x.yaml`) with `moekit.build.pipeline.build`, once per compared gate mode;
3. evaluate every MoE and every source on each domain's held-out split, on all of them together
   (`mixed`) and on held-out chat conversations (`chat`) with `moekit.eval.compare.evaluate`;
4. QLoRA fine-tune the better MoE on a small mixed chat set with `moekit.finetune.trainer.finetune`
   and evaluate it again with the adapter;
5. write OUT/report.json (the eval report schema plus a `demo` section), OUT/report.md and charts.

Everything goes through the same functions as `moekit build`, `moekit finetune` and `moekit eval`.
The demo is written into OUT's staging directory (`moekit.output.staged_output`) and replaces OUT only
when complete; the paths its reports record are rewritten to OUT's before that (`relocate`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moekit.errors import RecipeError
from moekit.output import staged_output
from moekit.zoo.corpora import DOMAINS
from moekit.zoo.settings import PRESETS as ZOO_PRESETS
from moekit.zoo.settings import ZooSettings

RECIPE = Path(__file__).resolve().parent / "zoo" / "tiny-4x.yaml"  # package data; recipes/tiny-4x.yaml links to it
GATE_MODES = ("hidden", "calibrated")
MIXED = "mixed"
CHAT = "chat"
HEADLINE_CHART = "headline.png"

# Chat-style requests per domain; the replies are the domain's own text.
REQUESTS = {
    "code": "Continue this Python code:\n{prompt}",
    "prose": "Continue this passage from the Python documentation:\n{prompt}",
    "math": "Work out these sums, one per line:\n{prompt}",
    "json": "Write more JSON records like these:\n{prompt}",
}


class DemoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zoo: ZooSettings = Field(description="How the zoo is made (its own cache key).")
    finetune_steps: int = Field(ge=1, description="QLoRA optimizer steps on the mixed chat set.")
    finetune_examples: int = Field(ge=1, description="Chat examples per domain in the fine-tuning set (from the training splits).")
    chat_heldout: int = Field(ge=1, description="Held-out chat examples per domain in the `chat` evaluation set.")
    learning_rate: float = Field(gt=0, description="Peak learning rate of the QLoRA run.")
    lora_r: int = Field(ge=1, description="LoRA rank of the QLoRA run.")
    close_to_expert: float = Field(gt=0, description="'Close to the best expert': the MoE's perplexity on a domain is at most this fraction above the best source's.")


PRESETS: dict[str, DemoSettings] = {
    "standard": DemoSettings(zoo=ZOO_PRESETS["standard"], finetune_steps=60, finetune_examples=64, chat_heldout=16, learning_rate=1e-3, lora_r=8, close_to_expert=0.10),
    # For tests and CI: the quick zoo and a shorter fine-tune. Its smaller experts route less cleanly
    # (math and json share digits), so the MoE stays further from them: measured up to +15% on math.
    "quick": DemoSettings(zoo=ZOO_PRESETS["quick"], finetune_steps=20, finetune_examples=32, chat_heldout=8, learning_rate=1e-3, lora_r=8, close_to_expert=0.20),
}
PresetName = Literal["standard", "quick"]


def run_demo(
    out: Path | str,
    *,
    preset: PresetName = "standard",
    finetune_steps: int | None = None,
    recipe: Path | str | None = None,
    cache: Path | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Run the demo into `out`; returns the report dict (also OUT/report.json)."""
    echo = echo or (lambda _line: None)
    settings = PRESETS[preset]
    if finetune_steps is not None:
        settings = settings.model_copy(update={"finetune_steps": finetune_steps})
    recipe_path = Path(recipe) if recipe else RECIPE
    if not recipe_path.is_file():
        raise RecipeError(f"the demo recipe {recipe_path} does not exist", hint="pass --recipe PATH")
    out = Path(out).absolute()
    with staged_output(out, overwrite=overwrite) as staging:
        report = _run(staging, settings, preset, recipe_path, cache, echo)
        relocate(staging, out)
    return json.loads(json.dumps(report).replace(str(staging), str(out)))


def relocate(staging: Path, out: Path) -> None:
    """Rewrite the paths under `staging` that the demo's reports, fine-tune metadata and adapter config
    record into the paths they will have under `out`."""
    pairs = [(str(staging.resolve()), str(out.resolve())), (str(staging), str(out))]
    for file in staging.rglob("*"):
        if file.suffix in (".json", ".jsonl", ".md") and file.is_file():
            text = original = file.read_text(encoding="utf-8")
            for old, new in pairs:
                text = text.replace(old, new)
            if text != original:
                file.write_text(text, encoding="utf-8")


def _run(out: Path, settings: DemoSettings, preset: str, recipe_path: Path, cache: Path | None, echo) -> dict:
    import torch

    from moekit.zoo import ensure_zoo, is_made, use_zoo, zoo_key

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one intra-op thread is several times faster than two
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        cached = is_made(settings.zoo, cache)
        echo(f"zoo: {'cached' if cached else 'making'} ({zoo_key(settings.zoo)})")
        zoo = ensure_zoo(settings.zoo, cache)
        timings["zoo"] = time.perf_counter() - started

        data = write_eval_data(out / "data", zoo, settings)
        chat_train = write_chat_set(out / "data" / "chat-train.jsonl", zoo, "train", settings.finetune_examples, seed=settings.zoo.seed)

        reports = {}
        with use_zoo(settings.zoo, cache):
            for mode in GATE_MODES:
                started = time.perf_counter()
                moe = build_moe(recipe_path, mode, out / f"moe-{mode}")
                timings[f"build {mode}"] = time.perf_counter() - started
                started = time.perf_counter()
                # Sources are the same for every gate mode: evaluate them once, with the first MoE.
                reports[mode] = _evaluate(moe, out / "eval" / mode, data, settings, against=None if not reports else [])
                timings[f"eval {mode}"] = time.perf_counter() - started
            chosen = min(GATE_MODES, key=lambda mode: _moe_entry(reports[mode])["metrics"][MIXED]["perplexity"])
            echo("gate modes: " + ", ".join(f"{m} mixed ppl {_moe_entry(reports[m])['metrics'][MIXED]['perplexity']:.2f}" for m in GATE_MODES) + f" -> using {chosen}")

            started = time.perf_counter()
            tuned = run_finetune(out / f"moe-{chosen}", out / "finetune", chat_train, settings, echo)
            timings["finetune"] = time.perf_counter() - started
            started = time.perf_counter()
            tuned_report = _evaluate(out / f"moe-{chosen}", out / "eval" / f"{chosen}+finetune", data, settings, against=[], adapter=tuned.out)
            timings["eval finetuned"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)

    report = combine_reports(reports, chosen, tuned_report)
    report["demo"] = {
        "preset": preset,
        "recipe": str(recipe_path),
        "gate_mode": chosen,
        "gate_modes": {mode: gate_mode_summary(reports[mode]) for mode in GATE_MODES},
        "zoo": {"key": zoo.directory.name, "directory": str(zoo.directory), "cached": cached, "settings": settings.zoo.model_dump(), "training": zoo.summary.get("perplexity")},
        "finetune": {"directory": str(tuned.out), "steps": tuned.steps, "first_loss": tuned.first_loss, "last_loss": tuned.last_loss, "examples": len(chat_train.read_text(encoding="utf-8").splitlines())},
        "facts": headline_facts(report, settings.close_to_expert),
        "timings_s": {name: round(seconds, 1) for name, seconds in timings.items()},
    }
    from moekit.eval.report import render

    render(report, out)
    plot_headline(report, out / HEADLINE_CHART)
    report["charts"] = [HEADLINE_CHART, *report["charts"]]
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(demo_markdown(report), encoding="utf-8")
    return report


# --- data ------------------------------------------------------------------------------------


def write_eval_data(directory: Path, zoo, settings: DemoSettings) -> dict[str, str]:
    """One JSONL per domain (its held-out split), `mixed` (all of them) and `chat`; name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    mixed = []
    for domain in DOMAINS:
        lines = zoo.heldout(domain).read_text(encoding="utf-8").splitlines()
        mixed += lines
        shutil.copyfile(zoo.heldout(domain), directory / f"{domain}.jsonl")
        paths[domain] = str(directory / f"{domain}.jsonl")
    (directory / f"{MIXED}.jsonl").write_text("\n".join(mixed) + "\n", encoding="utf-8")
    paths[MIXED] = str(directory / f"{MIXED}.jsonl")
    paths[CHAT] = str(write_chat_set(directory / f"{CHAT}.jsonl", zoo, "heldout", settings.chat_heldout, seed=settings.zoo.seed + 1))
    return paths


def write_chat_set(path: Path, zoo, split: Literal["train", "heldout"], per_domain: int, seed: int) -> Path:
    """Chat conversations made from a split of each domain: a request with the start of a document,
    and the document's continuation as the reply. Interleaved by domain, seeded."""
    rng = random.Random(seed)
    # About two characters per token keeps a whole conversation within the zoo's trained length.
    max_chars = 2 * zoo.settings.seq_len
    conversations = []
    for domain in DOMAINS:
        file = zoo.train_data(domain) if split == "train" else zoo.heldout(domain)
        documents = [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        documents = [d for d in documents if len(d.strip()) > 120]
        for document in rng.sample(documents, min(per_domain, len(documents))):
            conversations.append((domain, _conversation(domain, document, max_chars)))
    rng.shuffle(conversations)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": messages}) + "\n" for _domain, messages in conversations)
    return path


def _conversation(domain: str, document: str, max_chars: int) -> list[dict]:
    # The first lines of the document up to `max_chars`: about a third as the request, the rest as the reply.
    text = ""
    for line in document.strip().splitlines():
        if len(text) + len(line) > max_chars and text:
            break
        text += line + "\n"
    text = text[:max_chars]
    cut = text.rfind("\n", 0, max(1, len(text) // 3)) + 1 or len(text) // 3
    cut = cut if 0 < cut < len(text) else len(text) // 3
    return [
        {"role": "user", "content": REQUESTS[domain].format(prompt=text[:cut].rstrip("\n"))},
        {"role": "assistant", "content": text[cut:].rstrip("\n")},
    ]


# --- steps -----------------------------------------------------------------------------------


def build_moe(recipe_path: Path, gate_mode: str, out: Path) -> Path:
    from moekit.build.options import BuildOptions
    from moekit.build.pipeline import build
    from moekit.recipe import load_recipe

    recipe = load_recipe(recipe_path).model_copy(update={"gate_mode": gate_mode})
    build(recipe, out, BuildOptions(device="cpu"))
    return out


def _evaluate(model: Path, out: Path, data: dict[str, str], settings: DemoSettings, against: list[str] | None, adapter: Path | None = None) -> dict:
    from moekit.eval.compare import evaluate
    from moekit.eval.options import EvalOptions

    # Scored up to the length the zoo was trained on (positions beyond it were never seen).
    options = EvalOptions(against=against, data=data, adapter=str(adapter) if adapter else None, device="cpu", dtype="float32",
                          batch_size=8, max_length=settings.zoo.seq_len)
    return evaluate(model, out, options).to_dict()


def run_finetune(model: Path, out: Path, data: Path, settings: DemoSettings, echo):
    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import finetune

    options = FinetuneOptions(
        data=str(data),
        bits=4,
        target=["attn", "experts", "gate"],
        lora_r=settings.lora_r,
        lora_alpha=2 * settings.lora_r,
        lora_dropout=0.0,
        batch_size=4,
        max_seq_len=settings.zoo.seq_len,
        gradient_checkpointing=False,  # tiny activations; recomputing them only costs time
        max_steps=settings.finetune_steps,
        learning_rate=settings.learning_rate,
        warmup_ratio=0.1,
        save_steps=10**6,
        seed=settings.zoo.seed,
    )
    return finetune(model, out, options, echo=echo)


# --- report ----------------------------------------------------------------------------------


def _moe_entry(report: dict) -> dict:
    return next(m for m in report["models"] if m["role"] == "moe" and "adapter" not in m)


def combine_reports(reports: dict[str, dict], chosen: str, tuned_report: dict) -> dict:
    """One eval report: the chosen MoE, the other gate modes' MoEs, the fine-tuned MoE, then the sources."""
    first = reports[GATE_MODES[0]]
    report = json.loads(json.dumps(reports[chosen]))
    sources = [m for m in first["models"] if m["role"] == "source"]
    others = [_moe_entry(reports[mode]) | {"routing": reports[mode]["routing"]} for mode in GATE_MODES if mode != chosen]
    tuned = [m for m in tuned_report["models"] if "adapter" in m]  # named by eval: moe-<mode>+finetune, with its own routing
    report["models"] = [_moe_entry(reports[chosen]), *tuned, *others, *sources]
    report["data"] = first["data"]
    return report


def gate_mode_summary(report: dict) -> dict:
    moe = _moe_entry(report)
    own = (report.get("routing") or {}).get("own_expert_share", {})
    return {
        "perplexity": {name: round(values["perplexity"], 4) for name, values in moe["metrics"].items()},
        "own_expert_share": {name: values["mean"] for name, values in own.items()},
    }


def headline_facts(report: dict, close_to_expert: float) -> dict:
    """The claims the demo makes, each with the numbers behind it (checked, not assumed)."""
    moe = report["models"][0]
    sources = [m for m in report["models"] if m["role"] == "source"]
    best_mixed = min(sources, key=lambda m: m["metrics"][MIXED]["perplexity"])
    domains = {}
    for domain in DOMAINS:
        best = min(sources, key=lambda m: m["metrics"][domain]["perplexity"])
        ratio = moe["metrics"][domain]["perplexity"] / best["metrics"][domain]["perplexity"]
        domains[domain] = {"moe": moe["metrics"][domain]["perplexity"], "best_source": best["name"], "best": best["metrics"][domain]["perplexity"], "ratio": round(ratio, 4), "close": ratio <= 1 + close_to_expert}
    routing = report["routing"]
    routed = {}
    for domain in DOMAINS:
        share = routing["per_set"][domain]["share"]  # (layers, experts)
        mean = [sum(row[e] for row in share) / len(share) for e in range(len(routing["experts"]))]
        top = max(range(len(mean)), key=mean.__getitem__)
        routed[domain] = {"share": [round(v, 4) for v in mean], "top_expert": routing["experts"][top], "own": routing["experts"][top] == domain}
    tuned = [m for m in report["models"] if m.get("adapter")]
    facts = {
        "moe_beats_every_source_on_mixed": moe["metrics"][MIXED]["perplexity"] < best_mixed["metrics"][MIXED]["perplexity"],
        "mixed": {"moe": moe["metrics"][MIXED]["perplexity"], "best_source": best_mixed["name"], "best": best_mixed["metrics"][MIXED]["perplexity"]},
        "close_to_best_expert": all(d["close"] for d in domains.values()),
        "close_tolerance": close_to_expert,
        "domains": domains,
        "routes_each_domain_to_its_expert": all(r["own"] for r in routed.values()),
        "routing": routed,
    }
    if tuned:
        facts["finetune"] = {name: {"before": moe["metrics"][name]["perplexity"], "after": tuned[0]["metrics"][name]["perplexity"]} for name in moe["metrics"]}
    return facts


def demo_markdown(report: dict) -> str:
    from moekit.eval.report import markdown

    demo = report["demo"]
    facts = demo["facts"]
    summary = (f"Preset `{demo['preset']}`; MoE built from `{Path(demo['recipe']).name}` with gate mode `{demo['gate_mode']}` "
               f"(the better of {', '.join(GATE_MODES)} on `{MIXED}`); zoo `{demo['zoo']['key']}`.")
    lines = ["# moekit demo", "", summary, "", "## Headline", ""]
    mixed = facts["mixed"]
    top_k = report["routing"]["experts_per_token"]
    lines.append(f"- MoE perplexity on `{MIXED}` (all held-out domains): {mixed['moe']:.2f} vs best source {mixed['best_source']} {mixed['best']:.2f}: "
                 + ("**lower than every source**" if facts["moe_beats_every_source_on_mixed"] else "**not lower than every source**"))
    lines.append(f"- MoE within {facts['close_tolerance']:.0%} of the best source on every domain: " + ("yes" if facts["close_to_best_expert"] else "**no**")
                 + "; routing sends each domain mostly to its own expert: " + ("yes" if facts["routes_each_domain_to_its_expert"] else "**no**"))
    for domain, d in facts["domains"].items():
        lines.append(f"- {domain}: MoE {d['moe']:.2f} vs best source {d['best_source']} {d['best']:.2f} ({d['ratio'] - 1:+.1%}); routed mostly to "
                     f"{facts['routing'][domain]['top_expert']} ({max(facts['routing'][domain]['share']):.0%} of routing slots; {1 / top_k:.0%} = on every token)")
    if "finetune" in facts:
        ft = demo["finetune"]
        lines.append(f"- QLoRA ({ft['steps']} steps on {ft['examples']} chat examples, loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}): "
                     + ", ".join(f"{name} {v['before']:.2f} -> {v['after']:.2f}" for name, v in facts["finetune"].items()))
    lines += ["", "## Gate modes", "", "| gate mode | " + " | ".join(f"ppl {n}" for n in demo["gate_modes"][GATE_MODES[0]]["perplexity"]) + " | own-expert share (mean over domains) |",
              "|---|" + "---:|" * (len(demo["gate_modes"][GATE_MODES[0]]["perplexity"]) + 1)]
    for mode, summary in demo["gate_modes"].items():
        own = [summary["own_expert_share"][d] for d in DOMAINS if d in summary["own_expert_share"]]
        own_text = f"{sum(own) / len(own):.1%}" if own else "–"
        lines.append(f"| {mode} | " + " | ".join(f"{v:.2f}" for v in summary["perplexity"].values()) + f" | {own_text} |")
    lines += ["", "## Timings (seconds)", "", "| step | seconds |", "|---|---:|"] + [f"| {name} | {s} |" for name, s in demo["timings_s"].items()]
    evaluation = markdown(report).split("\n", 2)[2]  # the eval report without its title
    return "\n".join(lines) + "\n\n## Evaluation\n" + evaluation


def plot_headline(report: dict, path: Path) -> None:
    """headline.png: see `headline_figure`."""
    from moekit.eval.report import save

    save(headline_figure(report), path)


def headline_figure(report: dict):
    """Perplexity of every model relative to the best source on each set: bars below 0% beat every source; the
    best source itself (0%) is a diamond on the zero line."""
    from moekit.eval.report import TRAINING_OVERLAP_MARK, _pyplot, overlaps_training

    plt = _pyplot()
    sets = [name for name in (*DOMAINS, MIXED, CHAT) if all(name in m["metrics"] for m in report["models"])]
    models = report["models"]
    sources = [m for m in models if m["role"] == "source"]
    best = {name: min(m["metrics"][name]["perplexity"] for m in sources) for name in sets}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(10, 4.4), layout="constrained")
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        color = colors[index % len(colors)]
        x = [i + (index - (len(models) - 1) / 2) * width for i in range(len(sets))]
        relative = [100 * (model["metrics"][name]["perplexity"] / best[name] - 1) for name in sets]
        ax.bar(x, relative, width, label=model["name"], color=color, hatch="//" if model["role"] == "moe" else None,
               edgecolor="black", linewidth=0.4)
        best_here = [i for i, name in enumerate(sets) if model["role"] == "source" and model["metrics"][name]["perplexity"] == best[name]]
        ax.scatter([x[i] for i in best_here], [0] * len(best_here), marker="D", s=40, color=color, edgecolors="black", linewidths=0.6, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sets)), [name + (f" {TRAINING_OVERLAP_MARK}" if overlaps_training(report, name) else "") for name in sets], fontsize=10)
    ax.set_xlabel("held-out evaluation set")
    ax.set_ylabel("perplexity vs best source (%)")
    ax.set_title("Held-out perplexity relative to the best source on each set (lower is better; ◆ = that best source)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
