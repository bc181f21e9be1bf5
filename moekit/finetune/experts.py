"""The expert block moekit trains: all experts of a layer as one quantized, grouped module, LoRA included.

    block = build_expert_block("mixtral", {"gate_up_proj": w13, "down_proj": w2}, bits=4, compute_dtype=torch.bfloat16,
                               quant_storage=torch.uint8, device="cuda", act_fn=nn.SiLU())
    block(hidden_states, top_k_index, top_k_weights)  # the call signature of transformers' MixtralExperts

It replaces transformers 5's fused `MixtralExperts` (and Phixtral's list of `PhiMLP` experts) and keeps their
layout: one frozen tensor per projection for all experts (`expert_storage`), Mixtral `gate_up_proj` (E, 2I, H) with
gate and up as one GEMM and `down_proj` (E, H, I); Phixtral `fc1` (E, I, H) and `fc2` (E, H, I) with biases.

A forward sorts the (token, slot) pairs by expert once and runs each projection as one grouped GEMM over the
per-expert row offsets (`torch.nn.functional.grouped_mm`). Counts and offsets stay on the device, so nothing
waits for the host. A projection's weight is dequantized once for all experts (in row slices of at most
`DEQUANTIZED_SLICE_BYTES` where it is larger) and again in the backward pass instead of being kept; with
`NF4Storage.use_grouped_mm_kernel` the GEMMs read the 4-bit bytes themselves (`nf4_grouped_mm`). SiLU(gate) * up
runs as one kernel each way on CUDA (`swiglu_kernel`), with the routing weights applied there, before the linear
second projection, so that projection's output is never saved and a checkpoint's recomputation skips its GEMM
(`_in_backward_pass`). Where torch has no grouped kernel for the tensors at hand
(CUDA before sm80 or not bf16, CPU torch < 2.11) the same math runs expert by expert. `path_counts` says which path ran: under FSDP the storage
is read through plain tensor views, and the path does not depend on any parameter class.

LoRA (`add_lora`) is owned by the block as stacked parameters, in PEFT's parameterisation of `target_parameters`
on fused experts: per projection A (E, r, in) and B (E, out, r), delta W_e = alpha / r * B_e @ A_e, computed
as grouped (x A^T) B^T without materialising any per-expert delta. `moekit.finetune.adapter` writes them in
PEFT's key layout.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import TrainingError
from moekit.finetune.expert_layout import GATED, GROUPED_ALIGNMENT_BYTES, PROJECTIONS, SLICE_ROWS, runs_grouped
from moekit.finetune.expert_storage import ExpertStorage, quantize_tensor
from moekit.finetune.swiglu_kernel import weighted_silu_and_mul

PATHS = ("grouped", "per_expert")


def _torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _grouped_mm(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    """(rows, in) grouped by expert @ (experts, in, out) -> (rows, out); offsets = cumulative rows per expert (int32).

    grouped: torch's grouped GEMM (no host synchronisation); else one matmul per expert (reads the offsets on the host).
    """
    if grouped:
        return F.grouped_mm(inputs, weight, offs=offsets)
    outputs, start = [], 0
    for expert_idx, end in enumerate(offsets.tolist()):
        outputs.append(inputs[start:end] @ weight[expert_idx])
        start = end
    return torch.cat(outputs)


# a quantized projection is dequantized in slices of at most this many bytes (the same rows of every expert), so a
# training step holds at most one slice in 16 bits. Slices cost speed (copies into the output columns, sums of the
# backward's parts): on an H200, 256 MiB slices everywhere took 0.39 GB off the 4x7B peak (8-bit AdamW) and 9% off
# its speed, so the default only slices projections over 1 GiB (8x7B's gate_up_proj is 1.9 GB; the 4x7B one,
# 0.94 GB, runs whole), and MEMORY_LIMIT_BYTES slices the calls that need it
DEQUANTIZED_SLICE_BYTES = 2**30


# `moekit finetune --memory-limit`: the bytes a step may have allocated on its GPU (None: no limit). Where a dequantized
# projection would take the allocation over it, that call dequantizes in smaller row slices (down to SLICE_ROWS rows),
# or, where it would take more than MOST_SLICES and the kernel runs for the projection, multiplies with the GEMM that
# reads the 4-bit weight (no dequantized weight at all). Only the calls made while memory is short pay: at 4x7B, the
# end of the backward pass, when every LoRA gradient exists, or the last layers' forward, when every checkpointed
# input does
MEMORY_LIMIT_BYTES: int | None = None
# every slice re-reads the call's input: past this many, a call short of memory reads the 4-bit weight in the GEMM
# instead, where that kernel runs (4x7B, 8-bit AdamW, one H200: at 15.0 GB, slices cost 0.65 ms a call with
# --offload-activations and 2.4 ms without, where the room left is smaller; the NF4 GEMM 1.1-1.7 ms)
MOST_SLICES = 8
# under a limit: how the calls dequantized, "whole", "sliced" or not at all ("nf4_gemm"), Python calls (not replays)
limited_calls: Counter = Counter()


def _dequantization(storage: ExpertStorage, reference: torch.Tensor, grouped: bool, whole_bytes: int, sliced_bytes: int, extra_row_bytes: int = 0):
    """How a call multiplies by `storage`: None, with the GEMM that reads the stored weight (`--nf4-gemm`, or a call
    short of memory); else the row slices to dequantize. The call allocates, besides any dequantized weight,
    `whole_bytes` if it runs whole, or `sliced_bytes` plus `extra_row_bytes` per row of a slice if in slices."""
    if grouped and storage.multiplies_grouped(reference):
        return None
    slices = row_slices(storage, reference.dtype)
    if MEMORY_LIMIT_BYTES is None or reference.device.type != "cuda" or not storage.materializes:
        return slices
    # the allocator's count, no synchronisation; under CUDA graph capture, the capture's (replays reuse its memory)
    headroom = MEMORY_LIMIT_BYTES - torch.cuda.memory_allocated(reference.device)
    experts, out_features, in_features = storage.shape
    if len(slices) == 1 and experts * out_features * in_features * reference.element_size() + whole_bytes <= headroom:
        limited_calls["whole"] += 1
        return slices
    slices = row_slices(storage, reference.dtype, min(DEQUANTIZED_SLICE_BYTES, headroom - sliced_bytes), extra_row_bytes)
    if len(slices) > MOST_SLICES and grouped and storage.can_multiply_grouped(reference):
        limited_calls["nf4_gemm"] += 1
        return None
    limited_calls["sliced"] += 1
    return slices


def row_slices(storage: ExpertStorage, dtype: torch.dtype, budget: int | None = None, extra_row_bytes: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] rows of the (experts, out, in) projection dequantized at a time: each slice's 16-bit weight, and
    `extra_row_bytes` per row of a slice, within `budget` bytes (never under SLICE_ROWS rows)."""
    budget = DEQUANTIZED_SLICE_BYTES if budget is None else budget
    experts, out_features, in_features = storage.shape
    row_bytes = experts * in_features * torch.finfo(dtype).bits // 8 + extra_row_bytes
    if not storage.materializes or out_features * row_bytes <= budget:
        return [(0, out_features)]
    step = max(SLICE_ROWS, budget // row_bytes // SLICE_ROWS * SLICE_ROWS)
    return [(start, min(start + step, out_features)) for start in range(0, out_features, step)]


def _in_backward_pass() -> bool:
    """True while autograd runs a backward pass. In moekit a forward then is a checkpoint's recomputation of one
    decoder layer, which only rebuilds the layer's saved tensors (non-reentrant) or its graph (reentrant); its outputs'
    values are not used. The same private call gives torch.utils.checkpoint the backward pass its recomputed tensors
    belong to; without it, never true (nothing is skipped)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _is_silu(act_fn: nn.Module) -> bool:
    # torch's module, or transformers' SiLUActivation (ACT2FN["silu"], a plain F.silu)
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _grouped_weight_grad(grad_output: torch.Tensor, inputs: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    """(experts, out, in): per expert e, grad_output_e^T @ inputs_e, the gradient of W_e in inputs @ W_e^T."""
    if grouped:
        return F.grouped_mm(grad_output.t(), inputs, offs=offsets)
    grads, start = [], 0
    for end in offsets.tolist():
        grads.append(grad_output[start:end].t() @ inputs[start:end])
        start = end
    return torch.stack(grads)


def _aligned_or_copied(columns: torch.Tensor) -> torch.Tensor:
    """A column slice of a row-major matrix, for a grouped GEMM's first operand: as it is where its rows start on
    16-byte boundaries (torch's grouped GEMM takes such strides: no copy of the slice), else a contiguous copy."""
    aligned = columns.stride(1) == 1 and (columns.stride(0) * columns.element_size()) % 16 == 0 and columns.data_ptr() % 16 == 0
    return columns if aligned else columns.contiguous()


def _frozen_weight(storage: ExpertStorage, scaled_b: torch.Tensor | None, rows: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W for rows [start, end) of every expert, (experts, end - start, in); with `scaled_b`, [W_e | s B_e]
    (experts, end - start, in + r), W dequantized straight into the first columns."""
    experts, out_features, in_features = storage.shape
    start, end = rows
    rows_or_all = None if (start, end) == (0, out_features) else rows
    if scaled_b is None:
        return storage.dequantize(dtype, rows=rows_or_all)
    weight = torch.empty(experts, end - start, in_features + scaled_b.shape[-1], dtype=dtype, device=scaled_b.device)
    storage.dequantize_into(weight[:, :, :in_features], rows=rows_or_all)
    weight[:, :, in_features:] = scaled_b[:, start:end]
    return weight


class _FrozenExpertLinear(torch.autograd.Function):
    """inputs @ W_e^T per expert group, W frozen: dequantized again in the backward pass instead of kept, in row
    slices (`row_slices`) where the whole projection would be large.

    With `hidden` = x A_e^T and `scaled_b` = alpha / r * B_e, the LoRA up-projection is folded in: one grouped GEMM
    [x | h] @ [W_e | s B_e]^T. The separate LoRA product would write a (rows, out) tensor and add it to the frozen
    one; this copies the (rows, in) input instead, so it pays where out > in (gate_up, fc1).

    Where the storage multiplies by itself (`multiplies_grouped`: the NF4 GEMM of `nf4_grouped_mm`; or, for a call
    short of memory under MEMORY_LIMIT_BYTES, wherever that kernel runs), no weight is dequantized at all, and
    h (s B_e)^T is one more step of that GEMM's accumulation. Forward and backward decide apart, each by the memory
    allocated when it runs.

    `output_needed` False (a checkpoint's recomputation of a product that nothing saves): the product is returned
    uninitialised, without dequantizing or multiplying; what the backward pass needs (offsets, h, s B) is saved as
    in the first forward."""

    @staticmethod
    def forward(ctx, inputs, offsets, storage: ExpertStorage, grouped: bool, output_needed: bool, hidden=None, scaled_b=None):
        # inputs (rows, in); hidden (rows, r); scaled_b (experts, out, r) in the compute dtype
        ctx.storage, ctx.grouped = storage, grouped
        ctx.save_for_backward(offsets, hidden, scaled_b)
        if not output_needed:
            return inputs.new_empty(inputs.shape[0], storage.shape[1])  # (rows, out), never read
        # whole: the product is the output; in slices: the output and each slice's product; both: the stacked input
        row_bytes = inputs.shape[0] * inputs.element_size()
        new_bytes = row_bytes * storage.shape[1] + (0 if hidden is None else row_bytes * (storage.shape[2] + hidden.shape[1]))
        slices = _dequantization(storage, inputs, grouped, new_bytes, new_bytes, extra_row_bytes=row_bytes)
        if slices is None:  # the GEMM reads the quantized weight itself, and adds h (s B_e)^T to its tiles
            return storage.grouped_matmul(inputs, offsets, hidden=hidden, scaled_b=scaled_b)
        stacked = inputs if hidden is None else torch.cat([inputs, hidden], dim=1)  # (rows, in [+ r])
        if len(slices) == 1:
            return _grouped_mm(stacked, _frozen_weight(storage, scaled_b, slices[0], inputs.dtype).transpose(1, 2), offsets, grouped)
        outputs = inputs.new_empty(inputs.shape[0], storage.shape[1])  # (rows, out)
        for rows in slices:
            weight = _frozen_weight(storage, scaled_b, rows, inputs.dtype)  # (experts, end - start, in [+ r])
            outputs[:, rows[0] : rows[1]] = _grouped_mm(stacked, weight.transpose(1, 2), offsets, grouped)
            del weight  # before the next slice is dequantized: one slice at a time
        return outputs

    @staticmethod
    def backward(ctx, grad_output):
        offsets, hidden, scaled_b = ctx.saved_tensors
        needs = (*ctx.needs_input_grad, False, False)  # called without hidden, scaled_b: 5 inputs
        needs_inputs, needs_hidden, needs_scaled_b = needs[0], needs[5], needs[6]
        grad_inputs = grad_hidden = grad_scaled_b = None
        slices = []
        if needs_inputs or needs_hidden:
            grad_bytes = grad_output.shape[0] * (ctx.storage.shape[2] + (0 if hidden is None else hidden.shape[1])) * grad_output.element_size()
            slices = _dequantization(ctx.storage, grad_output, ctx.grouped, grad_bytes, 2 * grad_bytes)  # in slices: the sum and a part
        if slices is None:  # the GEMM reads the quantized weight itself
            if needs_inputs:
                grad_inputs = ctx.storage.grouped_matmul(grad_output.contiguous(), offsets, transposed=True)  # (rows, in)
            if needs_hidden:
                grad_hidden = _grouped_mm(grad_output, scaled_b, offsets, ctx.grouped)  # (rows, r)
        elif slices:
            grad_stacked = None  # (rows, in [+ r]): sum over row slices of grad_output[:, slice] @ [W | s B][:, slice]
            for start, end in slices:
                weight = _frozen_weight(ctx.storage, scaled_b, (start, end), grad_output.dtype)
                part = _grouped_mm(_aligned_or_copied(grad_output[:, start:end]), weight, offsets, ctx.grouped)
                grad_stacked = part if grad_stacked is None else grad_stacked.add_(part)
                del weight, part  # before the next slice is dequantized: one slice at a time
            in_features = ctx.storage.shape[2]
            grad_inputs = grad_stacked[:, :in_features]
            grad_hidden = grad_stacked[:, in_features:].contiguous() if hidden is not None else None
        if needs_scaled_b:
            grad_scaled_b = _grouped_weight_grad(grad_output, hidden, offsets, ctx.grouped)  # (experts, out, r)
        return grad_inputs, None, None, None, None, grad_hidden, grad_scaled_b


class ExpertBlock(nn.Module):
    """All experts of one MoE layer: frozen quantized projections, optional biases, optional stacked LoRA."""

    # None: the grouped path wherever torch has a grouped kernel for the tensors; True / False force one path
    grouped: bool | None = None
    # None: LoRA folded into the frozen GEMM (`_FrozenExpertLinear` with hidden, scaled_b) where that pays; True / False force it
    fold_lora: bool | None = None
    # False: a checkpoint's recomputation computes the second projection too (benchmarks measure what skipping it buys)
    skip_unsaved_recomputation: bool = True

    def __init__(self, family: str, storages: dict[str, ExpertStorage], biases: dict[str, torch.Tensor], act_fn: nn.Module):
        super().__init__()
        if family not in PROJECTIONS:
            raise ValueError(f"unknown expert family {family!r}; known: {', '.join(PROJECTIONS)}")
        self.family = family
        self.projections = PROJECTIONS[family]
        self.gated = GATED[family]
        for name in self.projections:
            self.add_module(name, storages[name])
            if name in biases:
                self.register_parameter(f"{name}_bias", nn.Parameter(biases[name], requires_grad=False))
        self.act_fn = act_fn
        first = storages[self.projections[0]]
        self.num_experts, _, self.hidden_size = first.shape
        self.lora_r: int | None = None
        self.lora_alpha: float | None = None
        self.lora_dropout = 0.0
        self.adapted_experts: list[int] | None = None  # None: no LoRA
        self.path_counts: Counter = Counter()
        self.recomputations_skipped = 0  # second projections a checkpoint's recomputation did not compute

    # --- LoRA ------------------------------------------------------------------------------------

    def add_lora(self, r: int, alpha: float, experts: list[int] | None = None, dropout: float = 0.0) -> None:
        """Stacked LoRA on both projections of the adapted `experts` (default all): A as PEFT initialises it,
        B zero, float32, trainable. Experts left out have no LoRA parameters (their delta is exactly zero)."""
        self.lora_r, self.lora_alpha, self.lora_dropout = r, alpha, dropout
        self.adapted_experts = list(range(self.num_experts)) if experts is None else sorted(set(experts))
        count = len(self.adapted_experts)
        device = self.storage(self.projections[0]).weight.device
        for name in self.projections:
            _, out_features, in_features = self.storage(name).shape
            lora_a = torch.empty(count * r, in_features, device=device)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as PEFT's nn.Linear(in, r * experts)
            self.register_parameter(f"lora_A_{name}", nn.Parameter(lora_a.view(count, r, in_features)))
            self.register_parameter(f"lora_B_{name}", nn.Parameter(torch.zeros(count, out_features, r, device=device)))
        subset = count < self.num_experts
        # a subset is scattered into zero (experts, ...) factors per call: one small op, no per-expert copies
        self.register_buffer("lora_index", torch.tensor(self.adapted_experts, device=device) if subset else None, persistent=False)

    def expand_lora(self, factor: torch.Tensor) -> torch.Tensor:
        """A LoRA parameter (adapted experts, ...) as (experts, ...), zero for the experts not adapted."""
        if self.lora_index is None:
            return factor
        return factor.new_zeros((self.num_experts, *factor.shape[1:])).index_copy(0, self.lora_index.to(factor.device), factor)

    @property
    def has_lora(self) -> bool:
        return self.adapted_experts is not None

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def storage(self, name: str) -> ExpertStorage:
        return getattr(self, name)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r)) of projection `name`, zero for experts not adapted."""
        return self.expand_lora(getattr(self, f"lora_A_{name}")), self.expand_lora(getattr(self, f"lora_B_{name}"))

    # --- forward ---------------------------------------------------------------------------------

    def _grouped_kernel_available(self, inputs: torch.Tensor) -> bool:
        if not hasattr(F, "grouped_mm"):
            return False
        # LoRA ranks are padded in `_project`; the weights must fit as they are
        dims = [size for name in self.projections for size in self.storage(name).shape[1:]]
        capability = torch.cuda.get_device_capability(inputs.device) if inputs.device.type == "cuda" else None
        return runs_grouped(
            dims, inputs.element_size(), inputs.device.type, bf16=inputs.dtype == torch.bfloat16, cuda_capability=capability, torch_version=_torch_version()
        )

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (tokens, hidden); top_k_index / top_k_weights (tokens, top_k)
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)  # (tokens * top_k,)
        # group the (token, slot) pairs by expert with one sort; counts by a scatter-add on the device
        # (bincount would synchronise with the host to size its output)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=flat_experts.device)
        counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (experts,)
        token_index = order // top_k  # (rows,) sorted by expert
        weights = top_k_weights.reshape(-1)[order]  # (rows,)
        row_experts = flat_experts[order] if hasattr(self, f"{self.projections[0]}_bias") else None

        device_type = hidden_states.device.type
        inputs = hidden_states
        if inputs.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
            # every GEMM below would run in the autocast dtype anyway; a float32 input (Phi-2's LayerNorm output
            # under autocast) would otherwise keep the block off the grouped kernels, which take bf16 only
            inputs = inputs.to(torch.get_autocast_dtype(device_type))
        available = self._grouped_kernel_available(inputs)
        if self.grouped and not available:
            raise TrainingError(
                f"the grouped expert path was forced, but torch has no grouped GEMM for {hidden_states.dtype} on {hidden_states.device.type} here"
            )
        grouped = available if self.grouped is None else self.grouped
        self.path_counts[PATHS[0] if grouped else PATHS[1]] += 1

        first, second = self.projections
        expert_inputs = inputs[token_index]  # (rows, hidden)
        intermediate = self._project(first, expert_inputs, offsets, grouped, row_experts)  # (rows, 2I) or (rows, I)
        weighted = self.gated and _is_silu(self.act_fn)
        if weighted:
            # the routing weights before the linear second projection (one launch each way on CUDA): the router's
            # gradient comes from this product, so the second projection's output is never saved
            intermediate = weighted_silu_and_mul(intermediate, weights)  # (rows, I)
        elif self.gated:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = self.act_fn(gate) * up  # (rows, I)
        else:
            intermediate = self.act_fn(intermediate)
        # an activation that autocast runs in float32 (Phi-2's gelu_new calls pow) would put the second GEMM in float32,
        # off the bf16 grouped kernel and onto torch's fallback, which reads the offsets on the host
        intermediate = intermediate.to(inputs.dtype)
        # recomputed for a checkpoint, the second product (never saved when weighted) is not needed, provided nothing
        # after the block within the checkpointed unit saves it: moekit checkpoints one decoder layer, where Mixtral's
        # layer only adds it to the residual stream (tests/test_finetune_experts.py checks transformers' layer with the
        # skipped product filled with NaN: every gradient bit for bit that of a step without checkpointing)
        skip_second = weighted and self.skip_unsaved_recomputation and _in_backward_pass()
        self.recomputations_skipped += skip_second
        expert_outputs = self._project(second, intermediate, offsets, grouped, row_experts, output_needed=not skip_second)  # (rows, hidden)
        if not weighted:
            expert_outputs = expert_outputs * weights[:, None]
        final = torch.zeros_like(hidden_states)
        return final.index_add_(0, token_index, expert_outputs.to(final.dtype))

    def _folds_lora(self, storage: ExpertStorage, inputs: torch.Tensor, grouped: bool) -> bool:
        if self.fold_lora is not None:
            return self.fold_lora
        if grouped and storage.multiplies_grouped(inputs):
            return True  # the GEMM that reads the quantized weight adds the LoRA term to its tiles: nothing is copied
        # where the (rows, in) input copy is smaller than the (rows, out) product it saves, and the dequantization
        # writes straight into the wider weight
        _, out_features, in_features = storage.shape
        return out_features > in_features and storage.dequantizes_into_strided()

    def _project(self, name: str, inputs: torch.Tensor, offsets: torch.Tensor, grouped: bool, row_experts, output_needed: bool = True) -> torch.Tensor:
        """(rows, out) of projection `name` with its LoRA and bias; output_needed False: the frozen product is left
        uninitialised (see `_FrozenExpertLinear`), everything the backward pass needs is computed and saved."""
        storage = self.storage(name)
        if self.has_lora:
            lora_a, lora_b = self.lora_factors(name)
            # LoRA in the inputs' dtype: the float32 parameters are cast once per call (small), never copied per expert;
            # the scaling goes into the small B rather than over the (rows, out) product
            dtype = inputs.dtype
            lora_a, lora_b = lora_a.to(dtype), (lora_b * self.lora_scaling).to(dtype)
            align = GROUPED_ALIGNMENT_BYTES // inputs.element_size()
            if grouped and self.lora_r % align:
                pad = align - self.lora_r % align  # zero ranks: grouped GEMMs need 16-byte aligned rows
                lora_a, lora_b = F.pad(lora_a, (0, 0, 0, pad)), F.pad(lora_b, (0, pad))
            lora_inputs = F.dropout(inputs, self.lora_dropout) if self.training and self.lora_dropout > 0 else inputs
            hidden = _grouped_mm(lora_inputs, lora_a.transpose(1, 2), offsets, grouped)  # (rows, r)
        if self.has_lora and self._folds_lora(storage, inputs, grouped):
            outputs = _FrozenExpertLinear.apply(inputs, offsets, storage, grouped, output_needed, hidden, lora_b)  # (rows, out)
        else:
            outputs = _FrozenExpertLinear.apply(inputs, offsets, storage, grouped, output_needed)  # (rows, out)
            if self.has_lora:
                # in place: the frozen product is not saved for the backward pass
                outputs = outputs.add_(_grouped_mm(hidden, lora_b.transpose(1, 2), offsets, grouped))
        bias = getattr(self, f"{name}_bias", None)
        if bias is not None:
            outputs = outputs + bias[row_experts].to(outputs.dtype)
        return outputs

    @torch.no_grad()
    def dequantized(self, name: str, dtype: torch.dtype | None = None, merge_lora: bool = False) -> torch.Tensor:
        """The (experts, out, in) weight of projection `name`, with the LoRA delta added if `merge_lora`."""
        weight = self.storage(name).dequantize(dtype)
        if merge_lora and self.has_lora:
            lora_a, lora_b = self.lora_factors(name)
            weight = (weight.float() + self.lora_scaling * torch.bmm(lora_b.float(), lora_a.float())).to(weight.dtype)
        return weight

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the LoRA delta into 16-bit weights and drop the LoRA parameters (for export)."""
        for name in self.projections:
            storage = self.storage(name)
            if storage.bits != 16:
                raise TrainingError("LoRA can only be merged into 16-bit expert weights; load with bits=16 to merge")
            storage.weight.copy_(self.dequantized(name, storage.weight.dtype, merge_lora=True))
        for name in self.projections:
            delattr(self, f"lora_A_{name}")
            delattr(self, f"lora_B_{name}")
        self.lora_index = None
        self.adapted_experts = self.lora_r = self.lora_alpha = None

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_r}, adapted_experts={self.adapted_experts}" if self.has_lora else ""
        return f"family={self.family}, experts={self.num_experts}{lora}"


def _check_shapes(family: str, tensors: dict[str, torch.Tensor]) -> None:
    if family == "mixtral":
        expected = {"gate_up_proj", "down_proj"}
    else:
        expected = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    if set(tensors) != expected:
        raise ValueError(f"{family} expert tensors must be {sorted(expected)}, got {sorted(tensors)}")
    if family == "mixtral":
        experts, double_inter, hidden = tensors["gate_up_proj"].shape
        if tuple(tensors["down_proj"].shape) != (experts, hidden, double_inter // 2) or double_inter % 2:
            raise ValueError(
                f"gate_up_proj {tuple(tensors['gate_up_proj'].shape)} and down_proj {tuple(tensors['down_proj'].shape)} are not (E, 2I, H) and (E, H, I)"
            )
    else:
        experts, inter, hidden = tensors["fc1.weight"].shape
        shapes = {"fc1.bias": (experts, inter), "fc2.weight": (experts, hidden, inter), "fc2.bias": (experts, hidden)}
        wrong = [key for key, shape in shapes.items() if tuple(tensors[key].shape) != shape]
        if wrong:
            raise ValueError(f"phixtral expert tensors do not fit fc1.weight (E, I, H) = {(experts, inter, hidden)}: {', '.join(wrong)}")


def build_expert_block(
    family: str,
    tensors: dict[str, torch.Tensor],
    *,
    bits: int,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype = torch.uint8,
    device: str | torch.device,
    act_fn: nn.Module,
) -> ExpertBlock:
    """The expert block of one layer from its canonical fused tensors (any device, usually the CPU), quantized
    straight onto `device`.

    family "mixtral": `gate_up_proj` (E, 2I, H) (gate rows, then up rows), `down_proj` (E, H, I).
    family "phixtral": `fc1.weight` (E, I, H), `fc1.bias` (E, I), `fc2.weight` (E, H, I), `fc2.bias` (E, H).
    bits 4: NF4 with double-quantized absmax; 8: LLM.int8 row-wise; 16: `compute_dtype`. Biases stay in `compute_dtype`.
    """
    _check_shapes(family, tensors)
    device = torch.device(device)
    storages, biases = {}, {}
    for name in PROJECTIONS[family]:
        weight = tensors[name] if family == "mixtral" else tensors[f"{name}.weight"]
        storages[name] = quantize_tensor(weight, bits=bits, compute_dtype=compute_dtype, quant_storage=quant_storage, device=device)
        if family == "phixtral":
            biases[name] = tensors[f"{name}.bias"].detach().to(device=device, dtype=compute_dtype, copy=True)
    return ExpertBlock(family, storages, biases, act_fn)


def expert_blocks(model: nn.Module) -> dict[str, ExpertBlock]:
    """{module name: block} of every expert block of `model` (any wrapping)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertBlock)}


def recomputations_skipped(model: nn.Module) -> int:
    """How many second expert projections checkpoint recomputations left uncomputed, over all blocks of `model`."""
    return sum(block.recomputations_skipped for block in expert_blocks(model).values())


def path_counts(model: nn.Module) -> dict[str, int]:
    """How many block forwards ran grouped and expert by expert, over all expert blocks of `model`."""
    totals = Counter({path: 0 for path in PATHS})
    for block in expert_blocks(model).values():
        totals.update(block.path_counts)
    return dict(totals)
