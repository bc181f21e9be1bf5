"""Writing an evaluation report: report.json, report.md and PNG charts, from a report dict.

`write_report(report, out)` renders into a temporary sibling of `out` and renames it into place, so a
failure leaves nothing half-written. The report dict is the report.json content; callers may add model
entries (e.g. the demo's fine-tuned "moe-calibrated+finetune") and render again.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from moekit.output import check_output, staged_output

LOWER_IS_BETTER = {"perplexity", "loss", "bits_per_byte", "word_perplexity", "byte_perplexity"}
PERPLEXITY_CHART = "perplexity.png"
ROUTING_CHART = "routing.png"
DIFFERENT_TOKENIZER_MARK = "†"
TRAINING_OVERLAP_MARK = "‡"  # a set that shares documents with a fine-tune's training data


def write_report(report: dict, out: Path | str, *, overwrite: bool = False) -> list[str]:
    """Render `report` into `out` atomically; returns the file names written."""
    out = Path(out)
    check_output(out, overwrite, what="report directory")
    with staged_output(out, overwrite=overwrite) as staging:
        render(report, staging)
    return sorted(p.name for p in out.iterdir())


def render(report: dict, directory: Path) -> None:
    """Write report.json, report.md and the charts into an existing `directory`."""
    charts = [PERPLEXITY_CHART] if _sets(report) else []
    routings = _routings(report)
    charts += list(routings)
    report["charts"] = charts
    (directory / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (directory / "report.md").write_text(markdown(report), encoding="utf-8")
    if PERPLEXITY_CHART in charts:
        plot_perplexity(report, directory / PERPLEXITY_CHART)
    for chart, routing in routings.items():
        plot_routing(routing, directory / chart)


def routing_chart(model_name: str) -> str:
    """The chart file of an MoE entry's own routing (entries other than the report's first MoE)."""
    return f"routing-{re.sub(r'[^A-Za-z0-9._+-]+', '-', model_name)}.png"


def _routings(report: dict) -> dict[str, dict]:
    """chart file -> routing statistics, for the report's MoE (`routing.png`) and every other MoE entry with its own
    (a fine-tune, another gate mode): routers change in training, so each MoE's routing is shown."""
    routings = {ROUTING_CHART: report["routing"]} if report.get("routing") else {}
    for model in report["models"]:
        if model.get("role") == "moe" and model.get("routing"):
            routings[routing_chart(model["name"])] = model["routing"] | {"model": model["name"]}
    return routings


def _sets(report: dict) -> list[str]:
    names = list(report.get("data", {}))
    for model in report["models"]:
        names += [name for name in model.get("metrics", {}) if name not in names]
    return names


def _columns(report: dict) -> list[tuple[str, str, str]]:
    """(section, set or task, metric) for every table column."""
    mixed_tokenizers = any(not model.get("same_tokenizer", True) for model in report["models"])
    columns = []
    for name in _sets(report):
        columns.append(("metrics", name, "perplexity"))
        if mixed_tokenizers:
            columns.append(("metrics", name, "bits_per_byte"))
    tasks: dict[str, list[str]] = {}
    for model in report["models"]:
        for task, values in model.get("tasks", {}).items():
            tasks.setdefault(task, [])
            tasks[task] += [m for m in values if "stderr" not in m and m not in tasks[task]]
    columns += [("tasks", task, metric) for task, metrics in tasks.items() for metric in metrics]
    return columns


def _value(model: dict, column: tuple[str, str, str]) -> float | None:
    section, name, metric = column
    value = model.get(section, {}).get(name, {}).get(metric)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _best(values: list[float | None], metric: str) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if metric in LOWER_IS_BETTER else max(present)


def _format(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    if metric == "perplexity" or metric.endswith("perplexity"):
        return f"{value:.2f}" if value < 1000 else f"{value:.4g}"
    return f"{value:.3f}"


def _header(column: tuple[str, str, str], report: dict | None = None) -> str:
    section, name, metric = column
    short = {"perplexity": "ppl", "bits_per_byte": "bits/byte"}.get(metric, metric)
    mark = f" {TRAINING_OVERLAP_MARK}" if section == "metrics" and report and overlaps_training(report, name) else ""
    return f"{short} {name}{mark}" if section == "metrics" else f"{name} {short}"


def overlaps_training(report: dict, set_name: str) -> dict | None:
    """The record of a set that shares documents with a fine-tuned entry's training data (None if held out)."""
    return ((report.get("data") or {}).get(set_name) or {}).get("overlaps_training")


def overlap_note(report: dict) -> str | None:
    """One sentence naming each set that overlaps training data, for reports and model cards."""
    marked = [(name, info["overlaps_training"]) for name, info in (report.get("data") or {}).items() if info.get("overlaps_training")]
    if not marked:
        return None
    parts = [f"`{name}` shares {o['documents']} of its {o['of']} documents with the training data of {o['model']}" for name, o in marked]
    return f"{TRAINING_OVERLAP_MARK} not held out: " + "; ".join(parts) + ". Those figures measure memorisation of the training set, not generalisation."


def markdown_table(report: dict) -> str:
    """Rows = models, columns = metrics; the best value per column in bold; one row per MoE with its
    difference to the best source model."""
    columns = _columns(report)
    models = report["models"]
    lines = ["| model | role | " + " | ".join(_header(c, report) for c in columns) + " |", "|---|---|" + "---:|" * len(columns)]
    best = {c: _best([_value(m, c) for m in models], c[2]) for c in columns}
    for model in models:
        name = model["name"] + ("" if model.get("same_tokenizer", True) else f" {DIFFERENT_TOKENIZER_MARK}")
        cells = []
        for column in columns:
            value = _value(model, column)
            text = _format(value, column[2])
            cells.append(f"**{text}**" if value is not None and value == best[column] else text)
        lines.append(f"| {name} | {model['role']} | " + " | ".join(cells) + " |")
    sources = [m for m in models if m["role"] == "source"]
    for moe in (m for m in models if m["role"] != "source"):
        if not sources:
            break
        cells = []
        for column in columns:
            ours, theirs = _value(moe, column), _best([_value(s, column) for s in sources], column[2])
            cells.append(_delta(ours, theirs, column[2]))
        lines.append(f"| Δ {moe['name']} vs best source | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta(ours: float | None, theirs: float | None, metric: str) -> str:
    if ours is None or theirs is None:
        return "–"
    difference = ours - theirs
    relative = f" ({difference / theirs:+.1%})" if metric in LOWER_IS_BETTER and theirs else ""
    return f"{difference:+.3g}{relative}"


def markdown(report: dict) -> str:
    """The whole report.md: results table, data, routing, notes."""
    parts = [f"# Evaluation of {report['model']['name']}", "", markdown_table(report), ""]
    parts += [
        (
            "Perplexity = exp(token-weighted mean loss over every scored token of the set); lower is better, "
            "best per column in **bold**; the Δ rows give the MoE minus the best source model (relative change in brackets)."
        )
    ]
    if any(not m.get("same_tokenizer", True) for m in report["models"]):
        parts += [
            "",
            (
                f"{DIFFERENT_TOKENIZER_MARK} evaluated with its own tokenizer, which differs from the MoE's: its perplexities are "
                "per token of a different tokenizer and not comparable; compare bits/byte instead."
            ),
        ]
    if overlap_note(report):
        parts += ["", overlap_note(report)]
    if report.get("data"):
        parts += ["", "## Evaluation data", "", "| set | source | documents | tokens (MoE tokenizer) | bytes |", "|---|---|---:|---:|---:|"]
        for name, info in report["data"].items():
            parts.append(f"| {name} | {info['source']} | {info['documents']} | {info.get('tokens', '–')} | {info.get('bytes', '–')} |")
        small = [name for name, info in report["data"].items() if info.get("small")]
        if small:
            parts += ["", f"Small sets ({', '.join(small)}): a sanity check only, not a benchmark; pass --data NAME=PATH for real numbers."]
    for routing in _routings(report).values():
        parts += _routing_markdown(routing, report["model"]["name"])
    if report.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    if report.get("charts"):
        parts += ["", "## Charts", ""] + [f"![{chart}]({chart})" for chart in report["charts"]]
    return "\n".join(parts) + "\n"


def _routing_markdown(routing: dict, default_name: str) -> list[str]:
    experts = routing["experts"]
    parts = [
        "",
        f"## Routing of {routing.get('model', default_name)}",
        "",
        routing["note"],
        "",
        (
            f"Mean router entropy {routing['mean_entropy']:.3f} nats (max {routing['max_entropy']:.3f}); "
            f"mean load-balance CV {routing['mean_load_cv']:.3f}; {routing['tokens']} tokens."
        ),
        "",
    ]
    parts += ["| layer | " + " | ".join(experts) + " | entropy | load CV |", "|---:|" + "---:|" * (len(experts) + 2)]
    for layer in routing["layers"]:
        parts.append(f"| {layer['layer']} | " + " | ".join(f"{s:.1%}" for s in layer["share"]) + f" | {layer['entropy']:.3f} | {layer['load_cv']:.3f} |")
    if routing.get("own_expert_share"):
        parts += ["", (f"Share of each expert-tied set routed to its own expert (mean over layers; an even router gives {1 / len(experts):.0%}):"), ""]
        for name, own in routing["own_expert_share"].items():
            parts.append(f"- {name} → {own['expert_name']}: {own['mean']:.1%}")
    return parts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(report: dict, path: Path) -> None:
    """perplexity.png: see `perplexity_figure`."""
    save(perplexity_figure(report), path)


def save(fig, path: Path) -> None:
    """Write a chart at 100 dpi (the figure sizes are chosen for that) and free it."""
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def perplexity_figure(report: dict):
    """One panel per evaluation set (each with its own scale), one horizontal bar per model (MoE entries hatched),
    sized to stay readable at the width a model card shows it (about 800 px)."""
    plt = _pyplot()
    sets, models = _sets(report), report["models"]
    columns = min(len(sets), 3)
    rows = -(-len(sets) // columns)
    panel_height = 0.32 * len(models) + 0.9
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1.6, panel_height * rows + 0.6), squeeze=False, sharey=True, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [m["name"] + ("" if m.get("same_tokenizer", True) else f" {DIFFERENT_TOKENIZER_MARK}") for m in models]
    positions = range(len(models))
    for ax, name in zip(axes.flat, sets):
        values = [m.get("metrics", {}).get(name, {}).get("perplexity", float("nan")) for m in models]
        bars = ax.barh(positions, values, color=[colors[i % len(colors)] for i in positions], edgecolor="black", linewidth=0.4)
        for bar, model in zip(bars, models):
            if model["role"] != "source":
                bar.set_hatch("//")
        ax.bar_label(bars, labels=[_format(v if math.isfinite(v) else None, "perplexity") for v in values], fontsize=9, padding=3)
        finite = [v for v in values if math.isfinite(v)]
        ax.set_xlim(0, 1.3 * max(finite) if finite else 1)  # room for the value labels inside the panel
        mark = f" {TRAINING_OVERLAP_MARK}" if overlaps_training(report, name) else ""
        ax.set_title(name + mark, fontsize=11)
        ax.set_xlabel("perplexity", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", labelsize=9)
    axes[0][0].set_yticks(list(positions), labels)
    axes[0][0].invert_yaxis()  # first model on top (shared by every panel)
    for ax in list(axes.flat)[len(sets) :]:
        ax.set_visible(False)
    fig.suptitle("Perplexity per evaluation set (lower is better; MoEs hatched)", fontsize=12)
    overlaps = sorted({info["overlaps_training"]["model"] for info in (report.get("data") or {}).values() if info.get("overlaps_training")})
    if overlaps:
        fig.supxlabel(f"{TRAINING_OVERLAP_MARK} not held out: shares documents with the training data of {', '.join(overlaps)}", fontsize=9)
    return fig


def plot_routing(routing: dict, path: Path) -> None:
    """A routing chart: see `routing_figure`."""
    save(routing_figure(routing), path)


def routing_figure(routing: dict):
    """Expert utilisation heatmaps (layers x experts): all tokens, then each evaluation set."""
    import numpy as np

    plt = _pyplot()
    panels = [("all sets", np.array([layer["share"] for layer in routing["layers"]]))]
    panels += [(name, np.array(info["share"])) for name, info in routing.get("per_set", {}).items()]
    experts = routing["experts"]
    num_layers = len(routing["layers"])
    columns = min(len(panels), 4)  # wrapped, so that a model card's width keeps the labels legible
    rows = -(-len(panels) // columns)
    panel_width = min(0.4 * len(experts) + 0.6, 12 / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(columns * panel_width + 1.8, rows * (min(0.3 * num_layers, 6 / rows + 2) + 1.6) + 0.8),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    image = routing_heatmaps(list(axes.flat), [title for title, _ in panels], [shares for _, shares in panels], experts)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in list(axes.flat)[: len(panels)]:
        ax.set_xlabel("expert", fontsize=9)
    for row in axes:
        row[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of top-k slots")
    fig.suptitle(
        f"Expert utilisation per layer (top-{routing['experts_per_token']}) of {routing.get('model', 'the MoE')}; even = {1 / len(experts):.0%}", fontsize=11
    )
    return fig


def routing_heatmaps(axes, titles: list[str], panels: list, experts: list[str]):
    """Draw one (layers, experts) share heatmap per axis on a common colour scale fitted to the data; returns the
    last image for the colour bar. Shared by the eval report and the build's routing report."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    top = max(float(np.max(shares)) for shares in panels)
    top = min(1.0, math.ceil(top * 10) / 10) or 1.0  # the scale ends just above the largest share, not at 100%
    num_layers = panels[0].shape[0]
    annotate = num_layers * len(experts) <= 64
    image = None
    for ax, title, shares in zip(axes, titles, panels):
        image = ax.imshow(shares, aspect="auto", vmin=0, vmax=top, cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(
            range(len(experts)), experts, rotation=45 if max(map(len, experts)) > 3 else 0, ha="right" if max(map(len, experts)) > 3 else "center", fontsize=8
        )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        if annotate:
            for (layer, expert), value in np.ndenumerate(shares):
                ax.text(expert, layer, f"{value:.0%}", ha="center", va="center", fontsize=8, color="white" if value < top * 0.6 else "black")
    return image
