"""The SFT loss of a causal-LM MoE, computed without a single host synchronisation, so that a CUDA graph can capture it.

TRL's loss reads values on the host (its fused LM head keeps only the labelled positions, a shape that depends on
the labels; its metrics call `.item()`), and older transformers count router choices with `torch.bincount`, which
waits for the GPU. Here every shape is fixed by the batch shape:

- the LM head and the cross-entropy run over all positions in chunks of `CHUNK_ROWS` rows, each chunk under
  activation checkpointing, so no more than one chunk's float32 logits exist at a time; unlabelled positions
  (-100) count zero;
- the router load-balancing loss is transformers' Mixtral loss (Switch Transformer eq. 4-6), with the top-k
  choices counted by a scatter-add.

    outputs = causal_lm_step(model, batch, aux_loss_coef=0.02, aux_loss_steps=1)
    outputs["loss"].backward()   # outputs also hold lm_loss, aux_loss, tokens, correct, entropy_sum

`batch`: input_ids, labels (unshifted, -100 where not trained), optionally attention_mask or position_ids (packed
sequences) with token_mask (0 on the padding after packed sequences), and num_items_in_batch (a 0-d tensor:
labelled tokens of the whole optimizer step, over all micro-batches and processes, as `Trainer` counts them).
The loss is TRL's: token-sum cross-entropy over `num_items_in_batch`, plus `aux_loss_coef` x the aux loss /
`aux_loss_steps` (accumulation steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' Mixtral `load_balancing_loss_func`: num_experts x sum over experts of (share of top-k choices) x
    (mean router probability), over all layers' (tokens, experts) logits; padding (attention_mask 0) excluded."""
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)  # (experts,) top-k choices
    probability_sums = torch.zeros(num_experts, dtype=torch.float32, device=device)
    weights = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # (tokens,)
    for logits in router_logits:
        probabilities = F.softmax(logits.to(device).float(), dim=-1)  # (tokens, experts)
        chosen = torch.topk(probabilities, top_k, dim=-1).indices  # (tokens, top_k)
        votes = torch.ones_like(chosen, dtype=torch.float32) if weights is None else weights[:, None].expand_as(chosen)
        counts = counts.scatter_add(0, chosen.reshape(-1), votes.reshape(-1))
        probability_sums = probability_sums + (probabilities if weights is None else probabilities * weights[:, None]).sum(0)
    rows = router_logits[0].shape[0] * len(router_logits) if weights is None else weights.sum() * len(router_logits)
    return torch.sum((counts / rows) * (probability_sums / rows)) * num_experts


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(batch, seq) 1 on the examples' tokens, 0 on padding: the attention mask, or for packed rows the token mask."""
    return batch.get("attention_mask", batch.get("token_mask"))


def _chunk_terms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    # hidden (rows, H), labels (rows,) -> summed NLL, correct top-1 predictions, summed entropy over labelled rows
    logits = F.linear(hidden, weight, bias).float()  # (rows, vocab)
    labelled = labels != -100  # (rows,)
    log_norm = torch.logsumexp(logits, dim=-1)  # (rows,)
    target = logits.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)  # (rows,)
    nll = ((log_norm - target) * labelled).sum()
    with torch.no_grad():  # logged, not trained
        correct = ((logits.argmax(-1) == labels) & labelled).sum()
        entropy = ((log_norm - (F.softmax(logits, dim=-1) * logits).sum(-1)) * labelled).sum()
    return nll, correct, entropy


def token_terms(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, correct predictions, summed entropy) of `labels` (rows,) under head(hidden) (rows, H), chunked."""
    totals = None
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        terms = checkpoint(_chunk_terms, hidden[rows], head.weight, head.bias, labels[rows], use_reentrant=False, preserve_rng_state=False)
        totals = terms if totals is None else tuple(total + term for total, term in zip(totals, terms))
    return totals


def causal_lm_step(
    model: nn.Module, batch: dict[str, torch.Tensor], *, aux_loss_coef: float | None, aux_loss_steps: int | torch.Tensor = 1, lm_loss_scale: float = 1
) -> dict[str, torch.Tensor]:
    """Loss and logged figures of one micro-batch; `model` is the causal LM (PEFT-wrapped or not). Run it under the
    compute autocast. aux_loss_coef None: no router loss; `aux_loss_steps` may be a tensor (a graph input).
    `lm_loss_scale`: the number of processes whose gradients are averaged when `num_items_in_batch` counts the
    tokens of all of them (TRL's loss under DDP)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    use_aux = aux_loss_coef is not None
    backbone = base.get_decoder()(**inputs, use_cache=False, **({"output_router_logits": True} if use_aux else {}))
    hidden = backbone.last_hidden_state[:, :-1]  # (batch, seq - 1, H): each position predicts the next label
    labels = batch["labels"][:, 1:]  # (batch, seq - 1)
    nll, correct, entropy = token_terms(hidden.reshape(-1, hidden.shape[-1]), base.get_output_embeddings(), labels.reshape(-1))
    tokens = (labels != -100).sum()
    loss = nll * lm_loss_scale / batch["num_items_in_batch"].clamp(min=1)
    outputs = {"lm_loss": (nll / tokens.clamp(min=1)).detach(), "tokens": tokens, "correct": correct, "entropy_sum": entropy}
    if use_aux:
        aux = load_balancing_loss(tuple(backbone.router_logits), config.num_local_experts, config.num_experts_per_tok, real_tokens(batch))
        loss = loss + aux_loss_coef * aux / aux_loss_steps
        outputs["aux_loss"] = aux.detach()
    outputs["loss"] = loss
    return outputs
