"""The build's routing report: where each expert's own prompts are routed, layer by layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moekit.recipe import Recipe

NOTE = (
    "Router inputs are the base model's MLP inputs for each expert's positive prompts and calibration data (what the "
    "routers were initialised from); in the built MoE, layers after the first see slightly different inputs. "
    "`share[layer][p][e]` is the share of top-k routing slots of prompt set p's tokens that go to expert e."
)


def write_routing_report(directory: Path, shares: torch.Tensor, recipe: Recipe) -> dict:
    """Write routing.json and routing.png under `directory`; returns the JSON content.

    `shares` (layers, prompt sets, experts) is counted by the gate pass as it goes (`gates.router_weights`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    own = torch.diagonal(shares, dim1=1, dim2=2)  # (layers, experts): share routed to the prompt set's own expert
    report = {
        "note": NOTE,
        "gate_mode": recipe.gate_mode,
        "experts_per_token": recipe.experts_per_token,
        "experts": [e.source_model for e in recipe.experts],
        "share": [[[_rounded(v) for v in row] for row in layer] for layer in shares.tolist()],
        "own_expert_share": {
            "per_layer": [[_rounded(v) for v in layer] for layer in own.tolist()],
            "mean_per_expert": [_rounded(v) for v in own.mean(dim=0).tolist()],
            "mean": _rounded(own.mean().item()),
        },
    }
    (directory / "routing.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _plot(directory / "routing.png", shares, recipe)
    return report


def _rounded(value: float) -> float | None:
    """None (JSON null) where a prompt set had no token to route: never NaN in a report."""
    return round(value, 4) if math.isfinite(value) else None


def _plot(path: Path, shares: torch.Tensor, recipe: Recipe) -> None:
    from moekit.eval.report import save

    save(routing_figure(shares, recipe.gate_mode, recipe.experts_per_token), path)


def routing_figure(shares: torch.Tensor, gate_mode: str, top_k: int):
    """One heatmap per expert's prompt set: (layers, experts) share of its tokens' routing slots."""
    from moekit.eval.report import _pyplot, routing_heatmaps

    plt = _pyplot()
    num_layers, num_sets, num_experts = shares.shape
    panel_width = min(2.3, 12 / num_sets)  # at most about 1400 px in all
    fig, axes = plt.subplots(
        1, num_sets, figsize=(num_sets * panel_width + 1.8, min(0.25 * num_layers, 6) + 2.4), sharey=True, squeeze=False, layout="constrained"
    )
    image = routing_heatmaps(
        axes[0],
        [f"prompts of expert {index}" for index in range(num_sets)],
        [shares[:, index, :].numpy() for index in range(num_sets)],
        [str(e) for e in range(num_experts)],
    )
    for ax in axes[0]:
        ax.set_xlabel("routed to expert", fontsize=9)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
    fig.suptitle(f"Routing of each expert's prompts (gate_mode={gate_mode}, top-{top_k})", fontsize=11)
    return fig
