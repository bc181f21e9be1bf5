"""`moekit demo`: the whole pipeline, offline, on the tiny zoo of trained domain experts.

    run_demo(out, preset="standard") -> dict    (the report.json content)

1. make or reuse the zoo (`moekit.zoo`): a tiny Llama base and one expert per domain;
2. build the MoE of `moekit/zoo/tiny-4x.yaml` (linked as `recipes/tiny-4x.yaml`) with `moekit.build.pipeline.build`, once per
   router variant (`VARIANTS`: `hidden` and `calibrated` gates from the prompts, and `calibrated` from the prompts
   plus each expert's training split as calibration data);
3. choose the variant with the lowest perplexity on the zoo's validation split (`validation`, all domains):
   documents neither trained on nor held out, so the choice never sees the test text;
4. evaluate every MoE and every source on each domain's held-out (test) split, on all of them together
   (`mixed`) and on held-out chat conversations (`chat`) with `moekit.eval.compare.evaluate`;
5. QLoRA fine-tune the chosen MoE on a small mixed chat set with `moekit.finetune.trainer.finetune`
   and evaluate it again with the adapter;
6. write OUT/report.json (the eval report schema plus a `demo` section), OUT/report.md and charts.

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
# Router variants the demo builds: name -> (gate mode, calibration data from each expert's training split?).
VARIANTS = {"hidden": ("hidden", False), "calibrated": ("calibrated", False), "calibrated-data": ("calibrated", True)}
VALIDATION = "validation"
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
    calibration_tokens: int = Field(ge=1, description="Tokens of each expert's training split given as calibration data to the `calibrated-data` routers.")
    learning_rate: float = Field(gt=0, description="Peak learning rate of the QLoRA run.")
    lora_r: int = Field(ge=1, description="LoRA rank of the QLoRA run.")
    close_to_expert: float = Field(
        gt=0,
        description="'Close to the best expert': the MoE's perplexity on a domain is at most this "
        "fraction above the best source's (derived from the spread over zoo seeds).",
    )


PRESETS: dict[str, DemoSettings] = {
    # close_to_expert: the 95% prediction bound, over zoo seeds 0-4, of the worst domain's excess over its best source
    # (`benchmarks/demo_seeds.py`; figures in docs/demo.md). Not tuned to one run: a neutral change moves it as a seed does.
    "standard": DemoSettings(
        zoo=ZOO_PRESETS["standard"],
        finetune_steps=60,
        finetune_examples=64,
        chat_heldout=16,
        calibration_tokens=20_000,
        learning_rate=1e-3,
        lora_r=8,
        close_to_expert=0.26,
    ),
    # For tests and CI: the quick zoo and a shorter fine-tune.
    "quick": DemoSettings(
        zoo=ZOO_PRESETS["quick"],
        finetune_steps=20,
        finetune_examples=32,
        chat_heldout=8,
        calibration_tokens=20_000,
        learning_rate=1e-3,
        lora_r=8,
        close_to_expert=0.33,
    ),
}
PresetName = Literal["standard", "quick"]


def run_demo(
    out: Path | str,
    *,
    preset: PresetName = "standard",
    finetune_steps: int | None = None,
    seed: int | None = None,
    recipe: Path | str | None = None,
    cache: Path | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Run the demo into `out`; returns the report dict (also OUT/report.json). `seed` replaces the preset's zoo
    seed (corpora, initialisation, data order: another zoo), as `benchmarks/demo_seeds.py` does to measure the spread."""
    echo = echo or (lambda _line: None)
    settings = PRESETS[preset]
    if finetune_steps is not None:
        settings = settings.model_copy(update={"finetune_steps": finetune_steps})
    if seed is not None:
        settings = settings.model_copy(update={"zoo": settings.zoo.model_copy(update={"seed": seed})})
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

        validation = write_validation_data(out / "data" / "validation", zoo)
        data = write_eval_data(out / "data", zoo, settings)
        chat_train = write_chat_set(out / "data" / "chat-train.jsonl", zoo, "train", settings.finetune_examples, seed=settings.zoo.seed)

        validation_reports, reports = {}, {}
        with use_zoo(settings.zoo, cache):
            for name in VARIANTS:
                started = time.perf_counter()
                build_moe(recipe_path, name, out / f"moe-{name}", zoo, settings.calibration_tokens)
                timings[f"build {name}"] = time.perf_counter() - started
                started = time.perf_counter()
                validation_reports[name] = _evaluate(out / f"moe-{name}", out / "eval" / VALIDATION / name, validation, settings, against=[])
                timings[f"validate {name}"] = time.perf_counter() - started
            chosen = choose_variant(validation_reports)
            echo(
                "router variants on the validation split: "
                + ", ".join(f"{name} ppl {_moe_entry(validation_reports[name])['metrics'][VALIDATION]['perplexity']:.2f}" for name in VARIANTS)
                + f" -> using {chosen}"
            )

            for name in VARIANTS:  # the test sets, which the choice above never saw
                started = time.perf_counter()
                # Sources are the same for every variant: evaluate them once, with the first MoE.
                reports[name] = _evaluate(out / f"moe-{name}", out / "eval" / name, data, settings, against=None if not reports else [])
                timings[f"eval {name}"] = time.perf_counter() - started

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
        "chosen": chosen,
        "selection": {
            "set": VALIDATION,
            "data": validation,
            "perplexity": {name: round(_moe_entry(validation_reports[name])["metrics"][VALIDATION]["perplexity"], 4) for name in VARIANTS},
            "note": "the router variant with the lowest perplexity on the validation split (documents "
            "neither trained on nor held out) is used; the test sets play no part in the choice",
        },
        "variants": {name: variant_summary(name, reports[name], settings) for name in VARIANTS},
        "zoo": {
            "key": zoo.directory.name,
            "directory": str(zoo.directory),
            "cached": cached,
            "settings": settings.zoo.model_dump(),
            "training": zoo.summary.get("perplexity"),
        },
        "finetune": {
            "directory": str(tuned.out),
            "steps": tuned.steps,
            "first_loss": tuned.first_loss,
            "last_loss": tuned.last_loss,
            "examples": len(chat_train.read_text(encoding="utf-8").splitlines()),
        },
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


def choose_variant(validation_reports: dict[str, dict]) -> str:
    """The router variant with the lowest perplexity on the validation set: the only figures the choice reads."""
    return min(validation_reports, key=lambda name: _moe_entry(validation_reports[name])["metrics"][VALIDATION]["perplexity"])


# --- data ------------------------------------------------------------------------------------


def write_validation_data(directory: Path, zoo) -> dict[str, str]:
    """`validation`: every domain's validation split in one set, for choosing the routers; name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for domain in DOMAINS for line in zoo.validation(domain).read_text(encoding="utf-8").splitlines()]
    (directory / f"{VALIDATION}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {VALIDATION: str(directory / f"{VALIDATION}.jsonl")}


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


def build_moe(recipe_path: Path, variant: str, out: Path, zoo, calibration_tokens: int) -> Path:
    """The recipe's MoE with the routers of `variant` (see VARIANTS). Calibration data, where the variant has it, is
    each `zoo:DOMAIN` expert's training split (never its validation or held-out documents)."""
    from moekit.build.options import BuildOptions
    from moekit.build.pipeline import build
    from moekit.recipe import CalibrationData, ExpertSettings, load_recipe

    gate_mode, with_data = VARIANTS[variant]
    recipe = load_recipe(recipe_path)
    experts = recipe.experts
    if with_data:
        experts = [
            expert.model_copy(update={"moekit": ExpertSettings(calibration=CalibrationData(data=str(zoo.train_data(domain)), max_tokens=calibration_tokens))})
            if (domain := expert.source_model.removeprefix("zoo:")) in DOMAINS
            else expert
            for expert in experts
        ]
    build(recipe.model_copy(update={"gate_mode": gate_mode, "experts": experts}), out, BuildOptions(device="cpu"))
    return out


def _evaluate(model: Path, out: Path, data: dict[str, str], settings: DemoSettings, against: list[str] | None, adapter: Path | None = None) -> dict:
    from moekit.eval.compare import evaluate
    from moekit.eval.options import EvalOptions

    # Scored up to the length the zoo was trained on (positions beyond it were never seen).
    options = EvalOptions(
        against=against, data=data, adapter=str(adapter) if adapter else None, device="cpu", dtype="float32", batch_size=8, max_length=settings.zoo.seq_len
    )
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
    """One eval report: the chosen MoE, the fine-tuned MoE, the other variants' MoEs, then the sources."""
    first = reports[next(iter(VARIANTS))]
    report = json.loads(json.dumps(reports[chosen]))
    sources = [m for m in first["models"] if m["role"] == "source"]
    others = [_moe_entry(reports[name]) | {"routing": reports[name]["routing"]} for name in VARIANTS if name != chosen]
    tuned = [m for m in tuned_report["models"] if "adapter" in m]  # named by eval: moe-<variant>+finetune, with its own routing
    report["models"] = [_moe_entry(reports[chosen]), *tuned, *others, *sources]
    report["data"] = first["data"]
    return report


def variant_summary(name: str, report: dict, settings: DemoSettings) -> dict:
    """A router variant on the test sets: perplexity, and on each domain's held-out text its routing accuracy (share
    of tokens whose first choice is the domain's expert) and the share of top-k slots that go to that expert."""
    gate_mode, with_data = VARIANTS[name]
    own = report["routing"]["own_expert_share"]
    accuracy = {domain: own[domain]["top1_mean"] for domain in DOMAINS if domain in own}
    return {
        "gate_mode": gate_mode,
        "calibration_data": {"from": "each expert's training split", "max_tokens": settings.calibration_tokens} if with_data else None,
        "perplexity": {set_name: round(values["perplexity"], 4) for set_name, values in _moe_entry(report)["metrics"].items()},
        "routing_accuracy": accuracy | {"mean": round(sum(accuracy.values()) / len(accuracy), 4)} if accuracy else {},
        "own_expert_share": {domain: own[domain]["mean"] for domain in DOMAINS if domain in own},
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
        domains[domain] = {
            "moe": moe["metrics"][domain]["perplexity"],
            "best_source": best["name"],
            "best": best["metrics"][domain]["perplexity"],
            "ratio": round(ratio, 4),
            "close": ratio <= 1 + close_to_expert,
        }
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


def summary_lines(report: dict) -> list[str]:
    """What `moekit demo` prints under its table: the headline, the routing, and each router variant's figures."""
    demo, facts = report["demo"], report["demo"]["facts"]
    mixed = facts["mixed"]
    lines = [
        f"MoE ({demo['chosen']} routers, chosen on the validation split) on mixed held-out data: perplexity {mixed['moe']:.2f} vs best source "
        f"{mixed['best_source']} {mixed['best']:.2f} "
        f"({'lower than every source' if facts['moe_beats_every_source_on_mixed'] else 'NOT lower than every source'})",
        "routing (top expert per domain): " + ", ".join(f"{d} -> {r['top_expert']}" for d, r in facts["routing"].items()),
    ]
    for name, variant in demo["variants"].items():
        accuracy = variant["routing_accuracy"]
        lines.append(
            f"routers {name}: validation ppl {demo['selection']['perplexity'][name]:.2f}; held-out mixed ppl {variant['perplexity'][MIXED]:.2f}, "
            f"routing accuracy {accuracy['mean']:.1%} (" + ", ".join(f"{d} {accuracy[d]:.0%}" for d in DOMAINS if d in accuracy) + ")"
        )
    return lines


def demo_markdown(report: dict) -> str:
    from moekit.eval.report import markdown

    demo = report["demo"]
    facts = demo["facts"]
    summary = (
        f"Preset `{demo['preset']}`; MoE built from `{Path(demo['recipe']).name}` with the `{demo['chosen']}` routers "
        f"(the lowest `{VALIDATION}` perplexity of {', '.join(VARIANTS)}; the test sets below played no part in that choice); zoo `{demo['zoo']['key']}`."
    )
    lines = ["# moekit demo", "", summary, "", "## Headline", ""]
    mixed = facts["mixed"]
    top_k = report["routing"]["experts_per_token"]
    lines.append(
        f"- MoE perplexity on `{MIXED}` (all held-out domains): {mixed['moe']:.2f} vs best source {mixed['best_source']} {mixed['best']:.2f}: "
        + ("**lower than every source**" if facts["moe_beats_every_source_on_mixed"] else "**not lower than every source**")
    )
    lines.append(
        f"- MoE within {facts['close_tolerance']:.0%} of the best source on every domain: "
        + ("yes" if facts["close_to_best_expert"] else "**no**")
        + "; routing sends each domain mostly to its own expert: "
        + ("yes" if facts["routes_each_domain_to_its_expert"] else "**no**")
    )
    for domain, d in facts["domains"].items():
        lines.append(
            f"- {domain}: MoE {d['moe']:.2f} vs best source {d['best_source']} {d['best']:.2f} ({d['ratio'] - 1:+.1%}); routed mostly to "
            f"{facts['routing'][domain]['top_expert']} ({max(facts['routing'][domain]['share']):.0%} of routing slots; {1 / top_k:.0%} = on every token)"
        )
    if "finetune" in facts:
        ft = demo["finetune"]
        lines.append(
            f"- QLoRA ({ft['steps']} steps on {ft['examples']} chat examples, loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}): "
            + ", ".join(f"{name} {v['before']:.2f} -> {v['after']:.2f}" for name, v in facts["finetune"].items())
        )
    test_sets = list(demo["variants"][demo["chosen"]]["perplexity"])
    experts = len(report["routing"]["experts"])
    lines += [
        "",
        "## Router variants",
        "",
        f"Chosen on `{VALIDATION}`; measured on the held-out test sets. Routing accuracy: share of a domain's held-out tokens whose "
        f"first choice is the domain's expert, mean over layers and domains (chance {1 / experts:.0%}).",
        "",
        "| routers | calibration data | ppl validation | " + " | ".join(f"ppl {n}" for n in test_sets) + " | routing accuracy |",
        "|---|---|" + "---:|" * (len(test_sets) + 2),
    ]
    for name, variant in demo["variants"].items():
        data = f"{variant['calibration_data']['max_tokens']} tokens per expert" if variant["calibration_data"] else "–"
        chosen = " (chosen)" if name == demo["chosen"] else ""
        lines.append(
            f"| {name}{chosen} | {data} | {demo['selection']['perplexity'][name]:.2f} | "
            + " | ".join(f"{variant['perplexity'][n]:.2f}" for n in test_sets)
            + f" | {variant['routing_accuracy']['mean']:.1%} |"
        )
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
        ax.bar(x, relative, width, label=model["name"], color=color, hatch="//" if model["role"] == "moe" else None, edgecolor="black", linewidth=0.4)
        best_here = [i for i, name in enumerate(sets) if model["role"] == "source" and model["metrics"][name]["perplexity"] == best[name]]
        ax.scatter([x[i] for i in best_here], [0] * len(best_here), marker="D", s=40, color=color, edgecolors="black", linewidths=0.6, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sets)), [name + (f" {TRAINING_OVERLAP_MARK}" if overlaps_training(report, name) else "") for name in sets], fontsize=10)
    ax.set_xlabel("held-out evaluation set")
    ax.set_ylabel("perplexity vs best source (%)")
    ax.set_title("Held-out perplexity relative to the best source on each set (lower is better; ◆ = that best source)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
