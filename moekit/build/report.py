"""The build's routing report: where each expert's own prompts are routed, layer by layer."""

from __future__ import annotations

import json
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
        "share": [[[round(v, 4) for v in row] for row in layer] for layer in shares.tolist()],
        "own_expert_share": {
            "per_layer": [[round(v, 4) for v in layer] for layer in own.tolist()],
            "mean_per_expert": [round(v, 4) for v in own.mean(dim=0).tolist()],
            "mean": round(own.mean().item(), 4),
        },
    }
    (directory / "routing.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _plot(directory / "routing.png", shares, recipe)
    return report


def _plot(path: Path, shares: torch.Tensor, recipe: Recipe) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_sets, num_experts = shares.shape
    fig, axes = plt.subplots(1, num_sets, figsize=(2.2 * num_sets + 1.5, 0.22 * num_layers + 1.8), sharey=True, squeeze=False)
    for index, ax in enumerate(axes[0]):
        image = ax.imshow(shares[:, index, :].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"prompts of\nexpert {index}", fontsize=9)
        ax.set_xticks(range(num_experts))
        ax.set_xlabel("routed to expert")
        if index == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
    fig.suptitle(f"Routing of each expert's prompts (gate_mode={recipe.gate_mode}, top-{recipe.experts_per_token})", fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
