"""Routing statistics of an MoE, from the router logits the model returns (`output_router_logits=True`).

Counted tokens are the non-padding input positions after the prefix token (the same text tokens whose
loss is measured). For each layer: the share of top-k routing slots that go to each expert (shares sum
to 1 per layer), the mean entropy (nats) of the router's softmax, and the load-balance coefficient of
variation (std / mean of the expert shares; 0 = perfectly even, sqrt(E-1) = one expert takes all).
For a set tied to an expert (its prompts or its domain), the share of top-k slots routed to that expert, and
the share of tokens whose first choice (top-1) is that expert: its routing accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit.eval.metrics import perplexity

ROUTER_FORWARD_KWARGS = {"output_router_logits": True}
NOTE = (
    "share[e] = fraction of top-k routing slots of the counted tokens (non-padding text tokens, prefix token "
    "excluded) that go to expert e; shares sum to 1 per layer. entropy: mean over tokens of the router softmax "
    "entropy in nats (max = ln(experts)). load_cv: std/mean of the shares over experts (0 = even)."
)


def moe_layout(model) -> tuple[int, int] | None:
    """(experts, experts per token) of an MoE model, or None for a dense model."""
    config = model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


class RoutingCollector:
    """Accumulates top-k counts and router entropy per evaluation set and layer."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k
        self.counts: dict[str, torch.Tensor] = {}  # set -> (layers, experts) top-k slot counts
        self.first_counts: dict[str, torch.Tensor] = {}  # set -> (layers, experts) top-1 (first choice) counts
        self.entropy: dict[str, torch.Tensor] = {}  # set -> (layers,) summed entropy
        self.tokens: dict[str, int] = {}

    def observer(self, set_name: str):
        """A `metrics.perplexity` observer that files each batch's routing under `set_name`."""

        def observe(outputs, input_ids, attention_mask) -> None:
            router_logits = getattr(outputs, "router_logits", None)
            if not router_logits:
                raise ValueError("the model returned no router logits (is it an MoE?)")
            counted = attention_mask.bool().clone()
            counted[:, 0] = False  # the prefix token is the same for every document
            counted = counted.reshape(-1)  # (batch*seq,)
            counts = torch.zeros(len(router_logits), self.num_experts)
            first_counts = torch.zeros(len(router_logits), self.num_experts)
            entropy = torch.zeros(len(router_logits))
            for layer, logits in enumerate(router_logits):
                probs = F.softmax(logits.reshape(-1, self.num_experts)[counted].float(), dim=-1)  # (tokens, experts)
                chosen = probs.topk(self.top_k, dim=-1).indices.reshape(-1)  # (tokens*top_k,)
                counts[layer] = torch.bincount(chosen, minlength=self.num_experts).float().cpu()
                first_counts[layer] = torch.bincount(probs.argmax(dim=-1), minlength=self.num_experts).float().cpu()
                entropy[layer] = -(probs * probs.clamp_min(1e-30).log()).sum().cpu()
            self.counts[set_name] = self.counts.get(set_name, 0) + counts
            self.first_counts[set_name] = self.first_counts.get(set_name, 0) + first_counts
            self.entropy[set_name] = self.entropy.get(set_name, 0) + entropy
            self.tokens[set_name] = self.tokens.get(set_name, 0) + int(counted.sum())

        return observe

    def stats(self, expert_names: list[str] | None = None, expert_of_set: dict[str, int] | None = None) -> dict:
        """The report's `routing` section (see NOTE)."""
        names = expert_names or [f"expert {e}" for e in range(self.num_experts)]
        sets = list(self.counts)
        total_counts = sum(self.counts.values())  # (layers, experts)
        total_entropy = sum(self.entropy.values())  # (layers,)
        total_tokens = sum(self.tokens.values())
        share = total_counts / total_counts.sum(dim=-1, keepdim=True)  # (layers, experts)
        cv = share.std(dim=-1, unbiased=False) / share.mean(dim=-1)  # (layers,)
        mean_entropy = total_entropy / total_tokens  # (layers,)
        layers = [
            {"layer": layer, "share": _round(share[layer]), "entropy": round(mean_entropy[layer].item(), 4), "load_cv": round(cv[layer].item(), 4)}
            for layer in range(share.shape[0])
        ]
        per_set = {}
        for name in sets:
            set_share = self.counts[name] / self.counts[name].sum(dim=-1, keepdim=True)  # (layers, experts)
            per_set[name] = {
                "tokens": self.tokens[name],
                "share": [_round(row) for row in set_share],
                "entropy": _round(self.entropy[name] / self.tokens[name]),
                "load_cv": _round(set_share.std(dim=-1, unbiased=False) / set_share.mean(dim=-1)),
            }
        own = {}
        for name, expert in (expert_of_set or {}).items():
            if name in per_set:
                per_layer = [row[expert] for row in per_set[name]["share"]]
                first = _round(self.first_counts[name][:, expert] / self.tokens[name])  # (layers,)
                own[name] = {
                    "expert": expert,
                    "expert_name": names[expert],
                    "per_layer": per_layer,
                    "mean": round(sum(per_layer) / len(per_layer), 4),
                    "top1_per_layer": first,
                    "top1_mean": round(sum(first) / len(first), 4),
                }
        return {
            "note": NOTE,
            "experts": names,
            "experts_per_token": self.top_k,
            "tokens": total_tokens,
            "max_entropy": round(math.log(self.num_experts), 4),
            "mean_entropy": round(mean_entropy.mean().item(), 4),
            "mean_load_cv": round(cv.mean().item(), 4),
            "layers": layers,
            "per_set": per_set,
            "own_expert_share": own,
        }


def _round(values: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in values.tolist()]


def routing_stats(
    model,
    tokenizer,
    sets: dict[str, list[str]],
    *,
    expert_names: list[str] | None = None,
    expert_of_set: dict[str, int] | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict:
    """Routing statistics of `model` on each set of texts (one forward pass per batch)."""
    layout = moe_layout(model)
    if layout is None:
        raise ValueError(f"{type(model).__name__} is not an MoE (its config has no num_local_experts / num_experts_per_tok)")
    collector = RoutingCollector(*layout)
    for name, texts in sets.items():
        perplexity(
            model, tokenizer, texts, batch_size=batch_size, max_length=max_length, observer=collector.observer(name), forward_kwargs=ROUTER_FORWARD_KWARGS
        )
    return collector.stats(expert_names, expert_of_set)
