"""What fits on a GPU of a given size: the largest batch and sequence, and the first setting to change."""

from __future__ import annotations

from moekit.finetune.options import TrainingOptions
from moekit.plan.activations import grouped_experts, nf4_gemm_runs_for
from moekit.plan.memory import MemoryPlan, plan_memory
from moekit.plan.shape import ModelShape
from moekit.units import format_size


def _needed(shape: ModelShape, options: TrainingOptions, **changes) -> int:
    return plan_memory(shape, options.model_copy(update=changes), "").gpu_bytes_needed


def fit(plan: MemoryPlan, gpu_memory: int) -> None:
    shape, options = plan.shape, plan.options
    plan.gpu_memory = gpu_memory
    plan.fits = plan.gpu_bytes_needed <= gpu_memory
    plan.largest_batch_size = _largest(lambda b: _needed(shape, options, batch_size=b) <= gpu_memory, 1, 4096)
    max_seq = shape.max_positions or 1_048_576
    plan.largest_seq_len = _largest(lambda s: _needed(shape, options, max_seq_len=s) <= gpu_memory, 8, max_seq)
    if plan.largest_seq_len and plan.largest_seq_len >= 64:
        plan.largest_seq_len -= plan.largest_seq_len % 64  # round down to a multiple of 64
    plan.advice = _advice(plan, gpu_memory)


def _largest(fits, low: int, high: int) -> int | None:
    """Largest value in [low, high] for which the monotone predicate `fits` holds, or None."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _advice(plan: MemoryPlan, gpu_memory: int) -> str:
    shape, options = plan.shape, plan.options
    if plan.fits:
        headroom = gpu_memory - plan.gpu_bytes_needed
        if plan.largest_batch_size and plan.largest_batch_size > options.batch_size:
            return f"nothing needed ({format_size(headroom)} spare); batch size up to {plan.largest_batch_size} fits at {options.max_seq_len} tokens"
        return f"nothing needed ({format_size(headroom)} spare)"
    # changes in the order that costs the least quality or speed, each checked alone
    candidates: list[tuple[str, dict]] = []
    if not options.gradient_checkpointing:
        candidates.append(("--gradient-checkpointing (recompute activations in the backward pass)", {"gradient_checkpointing": True}))
    if plan.largest_batch_size and plan.largest_batch_size < options.batch_size:
        # a divisor of the batch size, so that gradient accumulation keeps the sequences per optimizer step
        b = max(d for d in range(1, plan.largest_batch_size + 1) if options.batch_size % d == 0)
        candidates.append((f"--batch-size {b} with --grad-accum {options.batch_size // b} (same sequences per optimizer step)", {"batch_size": b}))
    if options.optimizer == "adamw_torch":
        candidates.append(("--optimizer adamw_8bit (8-bit optimizer states)", {"optimizer": "adamw_8bit"}))
    if options.gradient_checkpointing and not options.offload_activations:
        candidates.append(("--offload-activations (checkpointed layer inputs in CPU memory)", {"offload_activations": True}))
    if options.bits < 16 and options.memory_limit is None and not options.nf4_gemm and grouped_experts(shape):
        limit = f"{gpu_memory / 1e9:.2f}GB"
        text = f"--memory-limit {limit} (expert projections dequantized in row slices where a whole one would not fit; slower steps)"
        candidates.append((text, {"memory_limit": gpu_memory}))
    if options.bits == 4 and not options.nf4_gemm and grouped_experts(shape) and nf4_gemm_runs_for(shape):
        candidates.append(("--nf4-gemm (expert GEMMs read the 4-bit weights: no dequantized projection; slower steps)", {"nf4_gemm": True}))
    if options.bits > 4:
        candidates.append(("--bits 4 (NF4 weights, experts included)", {"bits": 4}))
    if options.lora_r > 8:
        candidates.append(("--lora-r 8", {"lora_r": 8}))
    if plan.largest_seq_len and plan.largest_seq_len >= options.max_seq_len // 2:  # shorter: first the changes below
        candidates.append((f"--max-seq-len {plan.largest_seq_len}", {"max_seq_len": plan.largest_seq_len}))
    for text, change in candidates:
        if _needed(shape, options, **change) <= gpu_memory:
            return text
    # no single change is enough: add the memory-only changes one by one, each time with the largest batch that fits;
    # only when all of them are not enough, shorten the sequence (which changes what is trained on)
    steps: list[str] = []
    changes: dict = {}
    current = options
    for text, change in [("", {})] + candidates:
        if "batch_size" in change or "max_seq_len" in change:
            continue
        changes.update(change)
        if text:
            steps.append(text.split(" (")[0])
        current = options.model_copy(update=changes)
        batch = _largest(lambda b, current=current: _needed(shape, current, batch_size=b) <= gpu_memory, 1, options.batch_size)
        if batch:
            return ", then ".join(steps + ([f"--batch-size {batch}"] if batch < options.batch_size else []))
    seq = _largest(lambda s: _needed(shape, current, batch_size=1, max_seq_len=s) <= gpu_memory, 8, options.max_seq_len)
    if seq:
        return ", then ".join(steps + ["--batch-size 1", f"--max-seq-len {seq - seq % 64 if seq >= 64 else seq}"])
    return "no setting fits, even batch 1 at 8 tokens with 8-bit optimizer states: use a larger GPU, or train fewer targets (--target gate, --layers)"
