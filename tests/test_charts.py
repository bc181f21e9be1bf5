"""Every chart moekit writes, rendered from realistic data: its size in pixels, labelled axes, no text drawn over
other text, whole-number layer ticks and a colour scale fitted to the data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moekit.zoo.corpora import DOMAINS

MODELS = ["moe-calibrated", "moe-calibrated+finetune", "moe-hidden", "base", "code", "prose", "math", "json"]
SETS = [*DOMAINS, "mixed", "chat"]


def perplexity_report() -> dict:
    rng = random.Random(0)
    level = {s: rng.uniform(2.5, 400.0) for s in SETS}  # like the demo: sets differ a lot, models on a set within ~30%
    models = []
    for name in MODELS:
        role = "moe" if name.startswith("moe") else "source"
        entry = {
            "name": name,
            "role": role,
            "same_tokenizer": True,
            "metrics": {s: {"perplexity": level[s] * rng.uniform(0.85, 1.3), "loss": 1.0, "tokens": 5000} for s in SETS},
        }
        models.append(entry)
    data = {s: {"source": f"{s}.jsonl", "documents": 64} for s in SETS}
    data["chat"]["overlaps_training"] = {"model": "moe-calibrated+finetune", "training_data": "chat.jsonl", "documents": 8, "of": 64}
    return {"model": {"name": "moe-calibrated"}, "models": models, "data": data}


def routing_stats(layers: int = 32, experts: int = 4) -> dict:
    rng = random.Random(1)

    def shares():
        rows = []
        for _ in range(layers):
            row = [rng.uniform(0.05, 0.5) for _ in range(experts)]
            rows.append([v / sum(row) for v in row])  # shares of the top-k slots: they sum to 1
        return rows

    return {
        "experts": [f"expert-{i}" for i in range(experts)],
        "experts_per_token": 2,
        "model": "moe-calibrated",
        "layers": [{"layer": i, "share": row, "entropy": 1.0, "load_cv": 0.2} for i, row in enumerate(shares())],
        "per_set": {s: {"share": shares()} for s in SETS},
    }


def _texts(fig):
    """Every visible text of the figure with its window extent."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    return [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def check_readable(fig, path: Path, save) -> dict:
    """The checks shared by every chart; returns facts for chart-specific ones."""
    texts = _texts(fig)
    assert min(t.get_fontsize() for t, _ in texts) >= 8, "text below 8 pt is unreadable once a card scales the chart down"
    data_axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    for ax in data_axes:
        assert ax.get_title(), "every panel has a title"
        assert ax.get_xlabel() or any(t.get_text() for t in ax.get_xticklabels()), "the x axis says what it shows"
    assert any(ax.get_ylabel() for ax in data_axes) or any(t.get_text() for t in data_axes[0].get_yticklabels())
    suptitle = fig._suptitle
    renderer = fig.canvas.get_renderer()
    for ax in data_axes:
        title = ax.title.get_window_extent(renderer)
        if suptitle is not None:
            assert not title.overlaps(suptitle.get_window_extent(renderer)), "a panel title runs into the figure title"
        box = ax.get_window_extent(renderer)
        for label in ax.texts:  # value labels and heatmap annotations stay inside their panel
            extent = label.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, label.get_text()
            assert not extent.overlaps(title)
    save(fig, path)
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert 700 <= width <= 1600 and 250 <= height <= 1400, (width, height)  # a model card shows about 800 px
    return {"axes": data_axes, "size": (width, height)}


def check_heatmaps(axes, largest: float) -> None:
    for ax in axes:
        low, high = sorted(ax.get_ylim())
        ticks = [t for t in ax.get_yticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), f"fractional layer ticks {ticks}"
        image = ax.images[0]
        assert largest <= image.norm.vmax <= largest + 0.1, "the colour scale ends just above the largest share"


def test_perplexity_chart_reads_at_card_size(tmp_path):
    from moekit.eval.report import perplexity_figure, save

    report = perplexity_report()
    fig = perplexity_figure(report)
    facts = check_readable(fig, tmp_path / "perplexity.png", save)
    assert len(facts["axes"]) == len(SETS)
    titles = [ax.get_title() for ax in facts["axes"]]
    assert "chat ‡" in titles and "mixed" in titles  # the set overlapping training data is marked
    assert [t.get_text() for t in facts["axes"][0].get_yticklabels()] == MODELS


@pytest.mark.parametrize("layers", [2, 32])
def test_eval_routing_chart_has_integer_layers_and_a_fitted_scale(tmp_path, layers):
    from moekit.eval.report import routing_figure, save

    routing = routing_stats(layers)
    largest = max(max(layer["share"]) for layer in routing["layers"])
    largest = max([largest] + [max(map(max, info["share"])) for info in routing["per_set"].values()])
    fig = routing_figure(routing)
    facts = check_readable(fig, tmp_path / "routing.png", save)
    check_heatmaps(facts["axes"], largest)


@pytest.mark.parametrize("layers", [2, 32])
def test_build_routing_chart_has_integer_layers_and_a_fitted_scale(tmp_path, layers):
    import torch

    from moekit.build.report import routing_figure
    from moekit.eval.report import save

    generator = torch.Generator().manual_seed(2)
    shares = torch.rand(layers, 4, 4, generator=generator)
    shares = shares / shares.sum(-1, keepdim=True)  # (layers, prompt sets, experts)
    fig = routing_figure(shares, "calibrated", 2)
    facts = check_readable(fig, tmp_path / "routing.png", save)
    check_heatmaps(facts["axes"], float(shares.max()))


def test_headline_chart_has_chat_and_marks_each_best_source(tmp_path):
    from moekit.demo import headline_figure
    from moekit.eval.report import save

    report = perplexity_report()
    fig = headline_figure(report)
    facts = check_readable(fig, tmp_path / "headline.png", save)
    ax = facts["axes"][0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*DOMAINS, "mixed", "chat ‡"]
    markers = [tuple(point) for collection in ax.collections for point in collection.get_offsets()]
    sources = [m for m in report["models"] if m["role"] == "source"]
    assert len(markers) == len(SETS)  # one diamond per set, where the best source's 0% bar would have no height
    assert all(y == 0 for _, y in markers)
    for index, name in enumerate(SETS):  # each diamond sits at its best source's bar
        best = min(sources, key=lambda m: m["metrics"][name]["perplexity"])
        slot = report["models"].index(best)
        x = index + (slot - (len(report["models"]) - 1) / 2) * 0.8 / len(report["models"])
        assert any(abs(mx - x) < 1e-9 for mx, _ in markers)
