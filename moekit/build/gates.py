"""Router ("gate") initialisation.

Modes (what each layer's router weight, one row per expert, is made from):
- `hidden` / `hidden_last` (mergekit-moe's default, same definition): the residual stream entering the
  layer at the last token of each prompt, averaged over the expert's positive prompts, minus the same
  for its negative prompts, L2-normalised. A proxy: the router really sees the post-attention-norm MLP input.
- `hidden_avg` (mergekit's code): the same with each prompt's residual stream averaged over its tokens
  (BOS included, padding excluded) instead of taken at its last token.
- `cheap_embed` (mergekit's code): the normalised sum of the prompts' token embeddings, the same for
  every layer. Needs no forward pass.
- `random` / `uniform_random` (mergekit's code): Gaussian, or uniform like nn.Linear's default init.
- `calibrated` (moekit): for each layer, a linear router fitted by softmax regression on the tokens
  the router actually sees (the base model's MLP input, i.e. after the post-attention norm, or the
  shared input LayerNorm for Phi-2) so that each expert's positive-prompt and calibration-data tokens
  route to it and its negative-prompt tokens do not.

The gate pass is streamed layer by layer (`stream_layers`): the base model is built on the meta
device, each decoder layer's weights are loaded once, every batch of prompts is run through that
layer, the layer's router is made and its routing statistics counted, and then the layer's weights
and features are dropped. What stays in memory is one layer's weights and one batch of the prompts'
residual stream (on the CPU the rest waits in a temporary file; on a GPU, in device memory), plus
for `calibrated` a bounded sample of router inputs (`max_fit_tokens` per expert); nothing grows with
the number of layers.

Router arithmetic (means, normalisation, fits) is float32 on every device; the forward pass runs in
float32 unless asked otherwise (`forward_dtype`), so that a recipe gives the same routers on a CPU
and on a GPU (to float32 rounding; `tests/test_build_gates.py`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moekit.build.options import DEFAULT_GATE_BATCH_SIZE
from moekit.build.sources import SourceModel
from moekit.recipe import Recipe

POSITIVE, NEGATIVE, CALIBRATION = 0, 1, 2
HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")


@dataclass
class PromptSet:
    """Every text of the gate pass, tokenized once (BOS first, no padding), with its expert and kind."""

    input_ids: list[torch.Tensor]  # one (tokens,) tensor per text
    expert: torch.Tensor  # (texts,) expert index
    kind: torch.Tensor  # (texts,) POSITIVE, NEGATIVE or CALIBRATION

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def tokenize_prompts(recipe: Recipe, tokenizer, calibration: list[list[torch.Tensor]] | None = None) -> PromptSet:
    """The prompts of the recipe's experts, then of its shared experts, plus each expert's calibration chunks
    (already tokenized) if given."""
    ids, experts, kinds = [], [], []
    bos = tokenizer.bos_token or ""
    for index, expert in enumerate(recipe.gated_experts):
        for kind, texts in ((POSITIVE, expert.positive_prompts or []), (NEGATIVE, expert.negative_prompts or [])):
            # Like mergekit: BOS by hand, no other special tokens, so every tokenizer behaves the same.
            for text in texts:
                ids.append(torch.tensor(tokenizer(bos + text, add_special_tokens=False)["input_ids"], dtype=torch.long))
                experts.append(index)
                kinds.append(kind)
        for chunk in calibration[index] if calibration and index < len(calibration) else []:
            ids.append(chunk)
            experts.append(index)
            kinds.append(CALIBRATION)
    return PromptSet(ids, torch.tensor(experts, dtype=torch.long), torch.tensor(kinds, dtype=torch.long))


@dataclass
class Batch:
    """Texts run through the layers together, with their residual stream at the current layer.

    On a GPU the residual stream stays in device memory; on the CPU it is kept in a file between
    layers (`spill`), so that resident memory holds one batch of it, not all the prompts'.
    """

    texts: torch.Tensor  # (batch,) indices into the PromptSet
    attention_mask: torch.Tensor  # (batch, tokens) on the CPU
    layer_kwargs: list[dict] = field(default_factory=list)  # per layer: what the backbone passes each decoder layer
    spill: Path | None = None  # file that holds the residual stream between layers (CPU)
    _residual: torch.Tensor | None = None  # (batch, tokens, hidden) on the gate device, in the forward dtype

    @property
    def residual(self) -> torch.Tensor:
        if self.spill is None:
            return self._residual
        return torch.load(self.spill, weights_only=True)

    @residual.setter
    def residual(self, value: torch.Tensor) -> None:
        if self.spill is None:
            self._residual = value
        else:
            torch.save(value.contiguous(), self.spill)


@dataclass
class LayerBatch:
    """One batch at one layer, in float32 on the gate device."""

    texts: torch.Tensor  # (batch,)
    attention_mask: torch.Tensor  # (batch, tokens) on the gate device
    residual: torch.Tensor  # (batch, tokens, hidden) input of the decoder layer
    router_input: torch.Tensor | None  # (batch, tokens, hidden) input of the MLP, i.e. what a router sees; None before the layer runs


class LayerPass:
    """One decoder layer, loaded: `inputs()` gives each batch's residual input without running the layer,
    `run()` runs every batch through it (once) and gives residual and router inputs."""

    def __init__(self, index: int, layer: torch.nn.Module, batches: list[Batch], device: str):
        self.index, self._layer, self._batches, self._device = index, layer, batches, device
        self.done = False

    def inputs(self) -> Iterator[LayerBatch]:
        for batch in self._batches:
            yield LayerBatch(batch.texts, batch.attention_mask.to(self._device), batch.residual.float(), None)

    def run(self) -> Iterator[LayerBatch]:
        if self.done:
            raise RuntimeError(f"layer {self.index} has already been run")
        self.done = True
        captured = {}

        def before_mlp(module, args, kwargs):
            captured["router_input"] = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = self._layer.mlp.register_forward_pre_hook(before_mlp, with_kwargs=True)
        try:
            for batch in self._batches:
                residual = batch.residual
                with torch.no_grad():
                    output = self._layer(residual, **batch.layer_kwargs[self.index])
                batch.residual = output[0] if isinstance(output, tuple) else output
                yield LayerBatch(batch.texts, batch.attention_mask.to(self._device), residual.float(), captured.pop("router_input").float())
                del residual, output
                release_freed_memory()
        finally:
            handle.remove()


class _RecordInputs(torch.nn.Module):
    """Stands in for a decoder layer during the embedding pass: records what it is given, returns its input."""

    def __init__(self, index: int, record: dict):
        super().__init__()
        self.index, self.record = index, record

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states by keyword")
        self.record[self.index] = (hidden_states, kwargs)
        return hidden_states


def stream_layers(
    base: SourceModel, prompts: PromptSet, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = DEFAULT_GATE_BATCH_SIZE
) -> Iterator[LayerPass]:
    """Run the prompts through the base model one decoder layer at a time; yield a LayerPass per layer.

    Each layer's weights are loaded once, before it is yielded, and dropped after it; a layer whose
    batches the caller did not run is run on resumption. In memory at any time: the embeddings, the
    final norm, one decoder layer and the prompts' residual stream at that layer.
    """
    from transformers import AutoModelForCausalLM

    config = base.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    backbone = model.base_model
    prefix = "model."
    for name, child in backbone.named_children():
        if name == "layers":
            continue
        if any(not persistent for persistent in _buffer_persistence(child)):
            setattr(backbone, name, type(child)(config=config).to(device))  # rotary tables are computed, not stored
        elif any(True for _ in child.parameters()):
            _load_module(child, base, f"{prefix}{name}.", device, dtype)

    layers = backbone.layers
    with tempfile.TemporaryDirectory(prefix="moekit-gate-pass-") as spill_dir:
        batches = _embed(backbone, layers, prompts, device, batch_size, Path(spill_dir) if torch.device(device).type == "cpu" else None)
        for index, layer in enumerate(layers):
            _load_module(layer, base, f"{prefix}layers.{index}.", device, dtype)
            layer.eval()
            step = LayerPass(index, layer, batches, device)
            try:
                yield step
                if not step.done:
                    for _ in step.run():
                        pass
            finally:
                layer.to("meta")  # drop this layer's weights before the next one is loaded
            for batch in batches:
                batch.layer_kwargs[index] = None  # this layer's masks and rotary tables are no longer needed


def _embed(backbone, layers, prompts: PromptSet, device: str, batch_size: int, spill_dir: Path | None) -> list[Batch]:
    """Embed the prompts in batches (similar lengths together) and record each layer's keyword arguments."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts.input_ids[i]))
    batches = []
    backbone.layers = torch.nn.ModuleList([_RecordInputs(i, {}) for i in range(len(layers))])
    try:
        for start in range(0, len(order), batch_size):
            texts = torch.tensor(order[start : start + batch_size])
            rows = [prompts.input_ids[i] for i in texts]
            width = max(len(r) for r in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for row, ids in enumerate(rows):  # right padding: a prompt's positions do not depend on its batch
                input_ids[row, : len(ids)] = ids
                mask[row, : len(ids)] = 1
            with torch.no_grad():
                backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            recorded = [recorder.record.pop(recorder.index) for recorder in backbone.layers]
            batch = Batch(texts, mask, [kwargs for _, kwargs in recorded], spill_dir / f"batch-{len(batches)}.pt" if spill_dir else None)
            batch.residual = recorded[0][0]
            batches.append(batch)
            del recorded
            release_freed_memory()
    finally:
        backbone.layers = layers
    return batches


def _buffer_persistence(module: torch.nn.Module):
    for name, _ in module.named_buffers(recurse=False):
        yield name not in module._non_persistent_buffers_set


def _load_module(module: torch.nn.Module, source: SourceModel, prefix: str, device: str, dtype: torch.dtype) -> None:
    state = {name: source.tensor(prefix + name).to(device=device, dtype=dtype) for name in module.state_dict()}
    module.load_state_dict(state, assign=True, strict=True)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Batch after batch of equal-sized activations otherwise
    leaves freed chunks resident (measured: +130 MB peak RSS over 256 prompts of 256 tokens on a 512-wide model)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


@contextmanager
def exact_float32():
    """No TF32 and no reduced-precision reductions on a GPU while routers are computed; restored after."""
    cuda = torch.backends.cuda.matmul
    saved = (cuda.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.allow_fp16_reduced_precision_reduction, cuda.allow_bf16_reduced_precision_reduction)
    cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.allow_fp16_reduced_precision_reduction, cuda.allow_bf16_reduced_precision_reduction = saved


@contextmanager
def threads(count: int | None):
    """torch's intra-op thread count set to `count` (None: unchanged), restored on every path."""
    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def calibrated_gate(
    pos_x: torch.Tensor,
    pos_y: torch.Tensor,
    neg_x: torch.Tensor,
    neg_y: torch.Tensor,
    num_experts: int,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> torch.Tensor:
    """Fit one layer's router (experts, hidden), float32, on router inputs.

    `pos_x` (tokens, hidden) should route to their expert `pos_y` (tokens,) (positive prompts,
    calibration data); `neg_x` should not route to `neg_y` (negative prompts). Both are float32 and
    are divided in place by their mean norm (no copy of what can be the largest tensors of a build).
    """
    count = len(pos_x) + len(neg_x)
    scale = ((pos_x.norm(dim=-1).sum() + neg_x.norm(dim=-1).sum()) / count).clamp(min=1e-6)
    pos_x.div_(scale)  # unit-scale features make one learning rate fit every model
    neg_x.div_(scale)
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_experts, pos_x.shape[1], generator=generator) * 0.01).to(pos_x.device).requires_grad_()
    # Every expert counts the same, however many tokens its texts have.
    class_weight = 1.0 / torch.bincount(pos_y, minlength=num_experts).clamp(min=1).float()
    # small fits on a CPU are dominated by thread synchronisation, not arithmetic
    with threads(1 if pos_x.device.type == "cpu" and count * pos_x.shape[1] < 2**22 else None), torch.enable_grad():
        optimizer = torch.optim.Adam([weight], lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(pos_x @ weight.T, pos_y, weight=class_weight * num_experts)
            if len(neg_y):
                p_wrong = torch.softmax(neg_x @ weight.T, dim=-1).gather(1, neg_y[:, None]).squeeze(1)  # (neg tokens,)
                loss = loss - torch.log1p(-p_wrong.clamp(max=1 - 1e-6)).mean()
            loss = loss + weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return (weight.detach() / scale).cpu()


@dataclass
class GatePass:
    """Result of the gate pass: routers and, where there were prompts, the routing report's counts."""

    routers: torch.Tensor  # (layers, experts, hidden) float32
    shares: torch.Tensor | None  # (layers, prompt sets = experts, experts) or None
    texts: int = 0
    tokens: int = 0


def router_weights(
    recipe: Recipe,
    base: SourceModel,
    tokenizer,
    device: str = "cpu",
    forward_dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_GATE_BATCH_SIZE,
    calibration: list[list[torch.Tensor]] | None = None,
) -> GatePass:
    """Router weights (layers, experts + shared experts, hidden), float32, for the recipe's gate mode, and the routing shares.

    `calibration` holds each expert's calibration chunks (token ids); only `calibrated` mode uses them.
    Shared experts (Qwen2-MoE) get their gate row as in mergekit: from their prompts by the `hidden`
    rule (also under `calibrated`), from their embeddings under `cheap_embed`, at random otherwise.
    """
    num_experts, num_gated = len(recipe.experts), len(recipe.gated_experts)
    config = base.config
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    mode = recipe.gate_mode
    fixed = None if mode in HIDDEN_MODES or mode == "calibrated" else _mergekit_gates(recipe, base, tokenizer, num_layers, num_gated, hidden)
    has_prompts = all(e.positive_prompts or (calibration and calibration[i]) for i, e in enumerate(recipe.experts))
    if not has_prompts:
        return GatePass(fixed.float(), None)
    prompts = tokenize_prompts(recipe, tokenizer, calibration if mode == "calibrated" else None)
    routers = torch.zeros(num_layers, num_gated, hidden)
    shares = torch.zeros(num_layers, num_experts, num_experts)
    sample = fit_sample(prompts, num_experts, recipe.moekit.calibration.max_fit_tokens, recipe.moekit.seed) if mode == "calibrated" else None
    with exact_float32():
        layers = stream_layers(base, prompts, device, forward_dtype, batch_size)
        for step in tqdm(layers, total=num_layers, desc="gate pass", unit="layer"):
            if mode == "calibrated":
                if num_gated > num_experts:
                    routers[step.index, num_experts:] = _hidden_gate(step.inputs(), prompts, num_gated, average=False)[num_experts:]
                routers[step.index, :num_experts], shares[step.index] = _calibrated_layer(step, prompts, num_experts, recipe, sample)
                continue
            if mode in HIDDEN_MODES:
                routers[step.index] = _hidden_gate(step.inputs(), prompts, num_gated, average=mode == "hidden_avg")
            else:
                routers[step.index] = fixed[step.index].float()
            shares[step.index] = _routing_shares(step.run(), prompts, routers[step.index, :num_experts].to(device), recipe.experts_per_token, num_experts)
    return GatePass(routers, shares, len(prompts), prompts.tokens)


def _hidden_gate(batches: Iterator[LayerBatch], prompts: PromptSet, num_experts: int, average: bool) -> torch.Tensor:
    """mergekit's `hidden`/`hidden_avg` for one layer: (experts, hidden), from running sums per expert and sign."""
    sums = None
    counts = torch.zeros(num_experts, 2)
    for batch in batches:
        mask = batch.attention_mask.float()  # (batch, tokens)
        if average:
            state = (batch.residual * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)  # (batch, hidden)
        else:
            last = batch.attention_mask.sum(dim=1) - 1  # (batch,)
            state = batch.residual[torch.arange(len(last)), last]  # (batch, hidden)
        if sums is None:
            sums = torch.zeros(num_experts, 2, state.shape[-1], device=state.device)
        expert, kind = prompts.expert[batch.texts], prompts.kind[batch.texts]
        keep = kind != CALIBRATION
        sums.index_put_((expert[keep].to(state.device), kind[keep].to(state.device)), state[keep.to(state.device)], accumulate=True)
        counts.index_put_((expert[keep], kind[keep]), torch.ones(int(keep.sum())), accumulate=True)
    means = sums.cpu() / counts.clamp(min=1)[..., None]  # (experts, 2, hidden)
    rows = means[:, POSITIVE] - torch.where(counts[:, NEGATIVE, None] > 0, means[:, NEGATIVE], 0.0)
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _fitted_tokens(batch: LayerBatch, prompts: PromptSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask (batch, tokens) of the tokens that count (real, not the BOS at position 0), with per-token expert and kind."""
    mask = batch.attention_mask.bool().clone()
    mask[:, 0] = False  # the BOS token looks the same in every text, so it carries no routing signal
    expert = prompts.expert[batch.texts].to(mask.device)[:, None].expand_as(mask)
    kind = prompts.kind[batch.texts].to(mask.device)[:, None].expand_as(mask)
    return mask, expert, kind


def fit_sample(prompts: PromptSet, num_experts: int, max_tokens: int, seed: int) -> list[torch.Tensor]:
    """Per text, a (tokens,) mask of the tokens whose router inputs the fit keeps: all but BOS, at most
    `max_tokens` per expert and direction (for it: positive and calibration; against it: negative), drawn at random."""
    keep = [torch.zeros(len(ids), dtype=torch.bool) for ids in prompts.input_ids]
    generator = torch.Generator().manual_seed(seed)
    for expert in range(num_experts):
        for against in (False, True):
            texts = [i for i in range(len(prompts)) if prompts.expert[i] == expert and (prompts.kind[i] == NEGATIVE) == against]
            candidates = [(i, position) for i in texts for position in range(1, len(prompts.input_ids[i]))]
            chosen = range(len(candidates)) if len(candidates) <= max_tokens else torch.randperm(len(candidates), generator=generator)[:max_tokens].tolist()
            for pick in chosen:
                text, position = candidates[pick]
                keep[text][position] = True
    return keep


def _calibrated_layer(step: LayerPass, prompts: PromptSet, num_experts: int, recipe: Recipe, sample: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the layer, keep the router inputs of the sampled tokens, fit the router: (router, routing shares of the sample)."""
    against = prompts.kind == NEGATIVE
    sizes = [sum(int(sample[i].sum()) for i in range(len(prompts)) if against[i] == side) for side in (False, True)]
    buffers = None  # (pos_x, pos_y, neg_x, neg_y), filled batch by batch: the sample is held once
    filled = [0, 0]
    for batch in step.run():
        mask, expert, kind = _fitted_tokens(batch, prompts)
        keep = torch.zeros_like(mask)
        for row, text in enumerate(batch.texts.tolist()):
            keep[row, : len(sample[text])] = sample[text].to(keep.device)
        mask &= keep
        if buffers is None:
            hidden, device = batch.router_input.shape[-1], batch.router_input.device
            buffers = [
                torch.empty(sizes[0], hidden, device=device),
                torch.empty(sizes[0], dtype=torch.long, device=device),
                torch.empty(sizes[1], hidden, device=device),
                torch.empty(sizes[1], dtype=torch.long, device=device),
            ]
        for side, x, y in ((0, buffers[0], buffers[1]), (1, buffers[2], buffers[3])):
            chosen = mask & ((kind == NEGATIVE) == bool(side))
            count = int(chosen.sum())
            x[filled[side] : filled[side] + count] = batch.router_input[chosen]
            y[filled[side] : filled[side] + count] = expert[chosen]
            filled[side] += count
    pos_x, pos_y, neg_x, neg_y = buffers
    settings = recipe.moekit.calibration
    router = calibrated_gate(
        pos_x, pos_y, neg_x, neg_y, num_experts, settings.steps, settings.learning_rate, settings.weight_decay, recipe.moekit.seed + step.index
    )
    # pos_x is now scaled by a positive factor, which changes no top-k choice
    return router, _shares(pos_x @ router.to(pos_x.device).T, pos_y, recipe.experts_per_token, num_experts)


def _routing_shares(batches: Iterator[LayerBatch], prompts: PromptSet, router: torch.Tensor, top_k: int, num_experts: int) -> torch.Tensor:
    """Share of each expert's own tokens (positive prompts, calibration data) routed top-k to each expert: (experts, experts)."""
    chosen = torch.zeros(num_experts, num_experts)
    counts = torch.zeros(num_experts)
    for batch in batches:
        mask, expert, kind = _fitted_tokens(batch, prompts)
        own = mask & (kind != NEGATIVE) & (expert < num_experts)
        logits = batch.router_input[own] @ router.T  # (tokens, experts)
        picks = F.one_hot(logits.topk(top_k, dim=-1).indices, num_experts).sum(dim=-2).float()  # (tokens, experts)
        chosen.index_add_(0, expert[own].cpu(), picks.cpu())
        counts.index_add_(0, expert[own].cpu(), torch.ones(int(own.sum())))
    return chosen / counts.clamp(min=1)[:, None] / top_k


def _shares(logits: torch.Tensor, token_expert: torch.Tensor, top_k: int, num_experts: int) -> torch.Tensor:
    picks = F.one_hot(logits.topk(top_k, dim=-1).indices, num_experts).sum(dim=-2).float().cpu()  # (tokens, experts)
    chosen = torch.zeros(num_experts, num_experts).index_add_(0, token_expert.cpu(), picks)
    counts = torch.bincount(token_expert.cpu(), minlength=num_experts).float()
    return chosen / counts.clamp(min=1)[:, None] / top_k


def _mergekit_gates(recipe: Recipe, base: SourceModel, tokenizer, num_layers: int, num_experts: int, hidden: int) -> torch.Tensor:
    """cheap_embed, random and uniform_random exactly as mergekit-moe computes them."""
    from mergekit.moe.router import get_cheap_embedding
    from mergekit.moe.router import tokenize_prompts as mergekit_tokenize

    generator = torch.Generator().manual_seed(recipe.moekit.seed)
    if recipe.gate_mode == "random":
        return torch.randn((num_layers, num_experts, hidden), generator=generator)
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((num_layers, num_experts, hidden), generator=generator) * 2 * scale - scale
    embed = base.tensor("model.embed_tokens.weight")
    vectors = []
    for expert in recipe.gated_experts:
        vector = get_cheap_embedding(embed, mergekit_tokenize(expert.positive_prompts, tokenizer), num_layers, base.config.vocab_size)
        if expert.negative_prompts:
            vector = vector - get_cheap_embedding(embed, mergekit_tokenize(expert.negative_prompts, tokenizer), num_layers, base.config.vocab_size)
        vectors.append(vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vectors, dim=1)  # (layers, experts, hidden)
