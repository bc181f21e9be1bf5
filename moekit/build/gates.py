"""Router ("gate") initialisation.

Modes (what each layer's router weight, one row per expert, is made from):
- `hidden` (mergekit-moe's default, same definition): the residual stream entering the layer at the
  last token of each prompt, averaged over the expert's positive prompts, minus the same for its
  negative prompts, L2-normalised. A proxy: the router really sees the post-attention-norm MLP input.
- `cheap_embed` (mergekit's code): the normalised sum of the prompts' token embeddings, the same for
  every layer. Needs no forward pass.
- `random` / `uniform_random` (mergekit's code): Gaussian, or uniform like nn.Linear's default init.
- `calibrated` (moekit): for each layer, a linear router fitted by softmax regression on the tokens
  the router actually sees (the base model's MLP input, i.e. after the post-attention norm, or the
  shared input LayerNorm for Phi-2) so that each expert's positive-prompt tokens route to it and its
  negative-prompt tokens do not.

The base model is streamed: it is built on the meta device and each decoder layer's weights are
loaded just before that layer runs and dropped right after, so the build never holds a whole model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moekit.build.sources import SourceModel
from moekit.recipe import Recipe


@dataclass
class PromptBatch:
    """All prompts of all experts, tokenized once, with which expert (and sign) each belongs to."""

    input_ids: torch.Tensor  # (prompts, tokens)
    attention_mask: torch.Tensor  # (prompts, tokens)
    expert: torch.Tensor  # (prompts,) expert index
    positive: torch.Tensor  # (prompts,) True for positive prompts


@dataclass
class LayerFeatures:
    """What one decoder layer saw for the prompt batch."""

    layer: int
    residual: torch.Tensor  # (prompts, tokens, hidden) input of the decoder layer
    router_input: torch.Tensor  # (prompts, tokens, hidden) input of the MLP, i.e. what a router sees


def tokenize_prompts(recipe: Recipe, tokenizer) -> PromptBatch:
    texts, experts, positive = [], [], []
    for index, expert in enumerate(recipe.experts):
        for sign, prompts in ((True, expert.positive_prompts or []), (False, expert.negative_prompts or [])):
            texts += prompts
            experts += [index] * len(prompts)
            positive += [sign] * len(prompts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    # Like mergekit: BOS by hand, no other special tokens, so every tokenizer behaves the same.
    encoded = tokenizer([(tokenizer.bos_token or "") + text for text in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(encoded["input_ids"], encoded["attention_mask"], torch.tensor(experts), torch.tensor(positive))


def stream_layer_features(base: SourceModel, prompts: PromptBatch, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Run the prompts through the base model one decoder layer at a time; yield LayerFeatures per layer.

    Only the embeddings, the final norm and one decoder layer are in memory at any time.
    """
    from transformers import AutoModelForCausalLM

    config = base.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    backbone = model.base_model
    prefix = "model."
    for name, child in backbone.named_children():
        if name == "layers":
            continue
        if any(not persistent for persistent in _buffer_persistence(child)):
            setattr(backbone, name, type(child)(config=config).to(device))  # rotary tables are computed, not stored
        elif any(True for _ in child.parameters()):
            _load_module(child, base, f"{prefix}{name}.", device, dtype)

    captured: dict[str, torch.Tensor] = {}
    features: list[LayerFeatures] = []

    def before_layer(layer_index):
        def hook(module, args, kwargs):
            _load_module(module, base, f"{prefix}layers.{layer_index}.", device, dtype)
            captured["residual"] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def after_layer(layer_index):
        def hook(module, args, kwargs, output):
            module.to("meta")  # drop this layer's weights before the next one is loaded
            features.append(LayerFeatures(layer_index, captured.pop("residual").float().cpu(), captured.pop("router_input").float().cpu()))

        return hook

    def before_mlp(module, args, kwargs):
        captured["router_input"] = (args[0] if args else kwargs["hidden_states"]).detach()

    with ExitStack() as stack:
        for index, layer in enumerate(backbone.layers):
            stack.callback(layer.register_forward_pre_hook(before_layer(index), with_kwargs=True).remove)
            stack.callback(layer.register_forward_hook(after_layer(index), with_kwargs=True).remove)
            stack.callback(layer.mlp.register_forward_pre_hook(before_mlp, with_kwargs=True).remove)
        with torch.no_grad():
            backbone(input_ids=prompts.input_ids.to(device), attention_mask=prompts.attention_mask.to(device), use_cache=False)
    return features


def _buffer_persistence(module: torch.nn.Module):
    for name, _ in module.named_buffers(recurse=False):
        yield name not in module._non_persistent_buffers_set


def _load_module(module: torch.nn.Module, source: SourceModel, prefix: str, device: str, dtype: torch.dtype) -> None:
    state = {name: source.tensor(prefix + name).to(device=device, dtype=dtype) for name in module.state_dict()}
    module.load_state_dict(state, assign=True, strict=True)


def last_token(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(prompts, tokens, hidden) -> (prompts, hidden): the state at each prompt's last real token."""
    last = attention_mask.sum(dim=1) - 1  # (prompts,)
    return states[torch.arange(states.shape[0]), last]


def hidden_gate(features: LayerFeatures, prompts: PromptBatch, num_experts: int) -> torch.Tensor:
    """mergekit's `hidden` mode for one layer: (experts, hidden)."""
    last = last_token(features.residual, prompts.attention_mask)  # (prompts, hidden)
    rows = []
    for expert in range(num_experts):
        pos = last[(prompts.expert == expert) & prompts.positive]
        neg = last[(prompts.expert == expert) & ~prompts.positive]
        row = pos.mean(dim=0) - (neg.mean(dim=0) if len(neg) else 0)
        rows.append(row / row.norm().clamp(min=1e-8))
    return torch.stack(rows)


def calibrated_gate(features: LayerFeatures, prompts: PromptBatch, num_experts: int, steps: int, learning_rate: float, weight_decay: float, seed: int) -> torch.Tensor:
    """Fit one layer's router (experts, hidden) on the router inputs of the prompts' tokens."""
    mask = prompts.attention_mask.bool().clone()
    mask[:, 0] = False  # the BOS token looks the same in every prompt, so it carries no routing signal
    tokens = features.router_input[mask]  # (tokens, hidden)
    token_expert = prompts.expert[:, None].expand_as(mask)[mask]  # (tokens,)
    token_positive = prompts.positive[:, None].expand_as(mask)[mask]  # (tokens,)
    scale = tokens.norm(dim=-1).mean().clamp(min=1e-6)
    x = tokens / scale  # unit-scale features make one learning rate fit every model

    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_experts, x.shape[1], generator=generator) * 0.01).requires_grad_()
    threads = torch.get_num_threads()
    if x.numel() < 2**22:
        torch.set_num_threads(1)  # small fits are dominated by thread synchronisation, not arithmetic
    optimizer = torch.optim.Adam([weight], lr=learning_rate)
    pos_x, pos_y = x[token_positive], token_expert[token_positive]
    neg_x, neg_y = x[~token_positive], token_expert[~token_positive]
    # Every expert counts the same, however many tokens its prompts have.
    class_weight = 1.0 / torch.bincount(pos_y, minlength=num_experts).clamp(min=1).float()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(pos_x @ weight.T, pos_y, weight=class_weight * num_experts)
        if len(neg_y):
            p_wrong = torch.softmax(neg_x @ weight.T, dim=-1).gather(1, neg_y[:, None]).squeeze(1)  # (neg tokens,)
            loss = loss - torch.log1p(-p_wrong.clamp(max=1 - 1e-6)).mean()
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return weight.detach() / scale


def router_weights(recipe: Recipe, base: SourceModel, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[LayerFeatures] | None, PromptBatch | None]:
    """Router weights (layers, experts, hidden) for the recipe's gate mode, float32.

    Also returns the streamed per-layer features and prompts (None when the mode needs no forward
    pass and there are no prompts), which the routing report reuses.
    """
    num_experts = len(recipe.experts)
    config = base.config
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    settings = recipe.moekit
    has_prompts = all(e.positive_prompts for e in recipe.experts)
    prompts = tokenize_prompts(recipe, tokenizer) if has_prompts else None
    features = stream_layer_features(base, prompts, device, dtype) if prompts is not None else None

    if recipe.gate_mode == "hidden":
        gates = torch.stack([hidden_gate(f, prompts, num_experts) for f in features])
    elif recipe.gate_mode == "calibrated":
        calibration = settings.calibration
        gates = torch.stack([
            calibrated_gate(f, prompts, num_experts, calibration.steps, calibration.learning_rate, calibration.weight_decay, settings.seed + f.layer)
            for f in tqdm(features, desc="fitting routers", unit="layer")
        ])
    else:
        gates = _mergekit_gates(recipe, base, tokenizer, num_layers, num_experts, hidden)
    return gates.float(), features, prompts


def _mergekit_gates(recipe: Recipe, base: SourceModel, tokenizer, num_layers: int, num_experts: int, hidden: int) -> torch.Tensor:
    """cheap_embed, random and uniform_random exactly as mergekit-moe computes them."""
    from mergekit.moe.router import get_cheap_embedding, tokenize_prompts as mergekit_tokenize

    generator = torch.Generator().manual_seed(recipe.moekit.seed)
    if recipe.gate_mode == "random":
        return torch.randn((num_layers, num_experts, hidden), generator=generator)
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((num_layers, num_experts, hidden), generator=generator) * 2 * scale - scale
    embed = base.tensor("model.embed_tokens.weight")
    vectors = []
    for expert in recipe.experts:
        vector = get_cheap_embedding(embed, mergekit_tokenize(expert.positive_prompts, tokenizer), num_layers, base.config.vocab_size)
        if expert.negative_prompts:
            vector = vector - get_cheap_embedding(embed, mergekit_tokenize(expert.negative_prompts, tokenizer), num_layers, base.config.vocab_size)
        vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vectors, dim=1)  # (layers, experts, hidden)


def routing_shares(features: list[LayerFeatures], prompts: PromptBatch, gates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of each expert's positive-prompt tokens routed (top-k) to each expert, per layer.

    Returns (layers, prompt sets = experts, experts); each row sums to 1 when top_k == 1 and to
    top_k otherwise, divided by top_k so that rows are shares.
    """
    num_experts = gates.shape[1]
    mask = prompts.attention_mask.bool().clone()
    mask[:, 0] = False
    shares = torch.zeros(len(features), num_experts, num_experts)
    for f in features:
        logits = f.router_input @ gates[f.layer].T  # (prompts, tokens, experts)
        chosen = F.one_hot(logits.topk(top_k, dim=-1).indices, num_experts).sum(dim=-2).float()  # (prompts, tokens, experts)
        for expert in range(num_experts):
            rows = mask & ((prompts.expert == expert) & prompts.positive)[:, None]
            shares[f.layer, expert] = chosen[rows].mean(dim=0) / top_k
    return shares
