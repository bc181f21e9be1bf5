"""The plan itself: weights, training state and activations as rows, the moments of a step, and the peak."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.errors import PlanError
from moekit.finetune.options import TrainingOptions
from moekit.plan.activations import activations
from moekit.plan.shape import Linear, ModelShape, parameter_counts
from moekit.plan.storage import COMPUTE_BYTES, LORA_BYTES, ROUTER_BYTES, optimizer_state_bytes, weight_bytes
from moekit.plan.trainable import trainable_parameters
from moekit.units import format_count, format_size

# --- constants outside the arithmetic (benchmarks/plan_accuracy.py, H100, torch 2.11) ----------------------
# set before the first GPU run; measured there: memory allocated between steps exceeds weights + adapters +
# optimizer states by 64.5 MiB in every configuration (cuBLAS workspaces and small buffers)
ALLOCATOR_OVERHEAD_BYTES = 64 * 2**20
RESERVED_FACTOR = 1.10  # calibrated: max_memory_reserved / max_memory_allocated was 1.01-1.10 for 4-bit Mixtral there
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context and kernels, outside the allocator (an assumption, not measured)


@dataclass
class Row:
    """One line of the breakdown: a group (weights, training, activations, peak), a name and bytes."""

    group: str
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """Predicted memory of a fine-tune; `render()` prints it, `to_dict()` is the `--json` output."""

    model: str
    shape: ModelShape
    options: TrainingOptions
    parameters_total: int
    parameters_active: int
    checkpoint_bytes: int
    trainable: dict[str, int]  # kind -> trainable parameters
    rows: list[Row]
    phases: dict[str, int]  # moment of the step -> allocated bytes then
    peak_bytes: int  # predicted torch.cuda.max_memory_allocated()
    gpu_bytes_needed: int  # peak reserved + CUDA context: what the card must have
    gpu_memory: int | None = None
    fits: bool | None = None
    largest_batch_size: int | None = None  # at options.max_seq_len
    largest_seq_len: int | None = None  # at options.batch_size
    advice: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def part(self, group: str, name: str) -> int:
        return sum(row.bytes for row in self.rows if row.group == group and row.name == name)

    def group_bytes(self, group: str) -> int:
        return sum(row.bytes for row in self.rows if row.group == group)

    def to_dict(self) -> dict:
        shape = self.shape
        return {
            "model": self.model,
            "architecture": shape.model_type,
            "shape": {
                "layers": shape.layers,
                "hidden": shape.hidden,
                "intermediate": shape.intermediate,
                "heads": shape.heads,
                "kv_heads": shape.kv_heads,
                "vocab": shape.vocab,
                "experts": shape.experts,
                "experts_per_token": shape.top_k,
            },
            "options": self.options.model_dump(),
            "parameters": {
                "total": self.parameters_total,
                "active": self.parameters_active,
                "trainable": sum(self.trainable.values()),
                "trainable_by_kind": self.trainable,
            },
            "checkpoint_bytes": self.checkpoint_bytes,
            "breakdown": [{"group": r.group, "name": r.name, "bytes": r.bytes, "note": r.note} for r in self.rows],
            "phases": self.phases,
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "gpu_bytes_needed": self.gpu_bytes_needed,
            "gpu_memory": self.gpu_memory,
            "fits": self.fits,
            "largest_batch_size": self.largest_batch_size,
            "largest_seq_len": self.largest_seq_len,
            "advice": self.advice,
            "notes": self.notes,
        }

    def render(self) -> str:
        shape, opts = self.shape, self.options
        moe = f"{shape.experts} experts, top-{shape.top_k}, " if shape.is_moe else "dense, "
        lines = [
            f"memory plan: {self.model} ({shape.model_type}: {moe}{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab})",
            (
                f"settings:    {opts.bits}-bit weights, target {','.join(opts.target)}, LoRA "
                f"r={opts.lora_r}, batch {opts.batch_size} x {opts.max_seq_len} tokens, "
                f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}, {opts.optimizer}"
            ),
            (
                f"parameters:  {format_count(self.parameters_total)} total, {format_count(self.parameters_active)} active per token, "
                f"{format_count(sum(self.trainable.values()))} trainable; checkpoint on disk (bf16 safetensors): {format_size(self.checkpoint_bytes)}"
            ),
            "",
        ]
        width = max(len(r.name) for r in self.rows) + 2
        current = None
        for row in self.rows:
            if row.group != current:
                current = row.group
                if current == "activations":
                    lines.append("activations  (each at its own moment of the step; the peak below adds the ones alive together)")
                else:
                    lines.append(f"{current}  (total {format_size(self.group_bytes(current))})" if current != "peak" else "peak")
            note = f"  {row.note}" if row.note else ""
            lines.append(f"  {row.name:<{width}}{format_size(row.bytes):>10}{note}")
        lines.append("")
        lines.append(
            f"predicted peak: {format_size(self.peak_bytes)} allocated (at the {self.peak_phase}); "
            f"the GPU needs about {format_size(self.gpu_bytes_needed)} with the CUDA context and allocator slack"
        )
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"on a {format_size(self.gpu_memory)} GPU: {verdict}; largest batch size at {opts.max_seq_len} tokens: "
                f"{self.largest_batch_size or 'none'}; longest sequence at batch {opts.batch_size}: {self.largest_seq_len or 'none'}"
            )
            if self.advice:
                lines.append(f"turn first: {self.advice}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _check_options(shape: ModelShape, options: TrainingOptions) -> None:
    if options.batch_size < 1:
        raise PlanError("batch size must be at least 1")
    if shape.max_positions and options.max_seq_len > shape.max_positions:
        scaling = f" (it already uses {shape.rope_scaling.get('rope_type', shape.rope_scaling.get('type'))} rope scaling)" if shape.rope_scaling else ""
        raise PlanError(
            f"--max-seq-len {options.max_seq_len} is beyond the model's max_position_embeddings ({shape.max_positions}){scaling}",
            hint=f"pass --max-seq-len {shape.max_positions} or less; longer contexts need rope scaling (e.g. rope_scaling "
            "{'rope_type': 'linear' or 'yarn', 'factor': N}) set in the model's config.json first",
        )


def plan_memory(shape: ModelShape, options: TrainingOptions, model_name: str) -> MemoryPlan:
    _check_options(shape, options)
    bits = options.bits
    h, layers, vocab = shape.hidden, shape.layers, shape.vocab
    experts = max(shape.experts, 1)
    targets = trainable_parameters(shape, options)

    # weights
    attn_values, attn_consts = (sum(x) for x in zip(*(weight_bytes(lin, bits) for lin in shape.attention)))
    # MoE experts are stored one tensor per projection for all experts of a layer (finetune/experts.py), so the
    # 4-bit constants are those of the stacked tensor; values per layer below cover all experts
    stacked = [Linear(lin.name, lin.kind, lin.in_features, lin.out_features * experts, lin.bias) for lin in shape.expert_mlp]
    expert_values, expert_consts = (sum(x) for x in zip(*(weight_bytes(lin, bits) for lin in stacked)))
    router_numel = shape.experts * h
    embed_numel = vocab * h
    lm_head_numel = 0 if shape.tied_embeddings else vocab * h
    rows = [
        Row("weights", "attention", layers * attn_values, f"{bits}-bit" if bits < 16 else "bf16"),
        Row(
            "weights",
            "experts" if shape.is_moe else "mlp",
            layers * expert_values,
            f"{bits}-bit, {layers} layers x {experts} experts" if shape.is_moe else f"{bits}-bit" if bits < 16 else "bf16",
        ),
    ]
    if shape.is_moe:
        rows.append(Row("weights", "routers", layers * router_numel * ROUTER_BYTES, "bf16, not quantized"))
    rows += [
        Row(
            "weights",
            "embeddings + lm_head",
            (embed_numel + lm_head_numel + (vocab if shape.lm_head_bias else 0)) * COMPUTE_BYTES,
            "bf16, not quantized" + (", tied" if shape.tied_embeddings else ""),
        ),
        Row("weights", "norms", (layers * shape.norm_numel_per_layer + shape.final_norm_numel) * COMPUTE_BYTES, "bf16"),
    ]
    if bits < 16:
        rows.append(
            Row(
                "weights",
                "quantization constants",
                layers * (attn_consts + expert_consts),
                "NF4 absmax, double-quantized (8-bit per 64 values + fp32 per 256 blocks)" if bits == 4 else "int8 row scales (fp32)",
            )
        )
    weights = sum(r.bytes for r in rows)

    # trainable parameters, gradients, optimizer states
    lora_params = sum(targets.lora_numels) * LORA_BYTES
    router_params = sum(targets.router_numels) * ROUTER_BYTES
    # routers trained in full are already counted among the weights; LoRA matrices are new
    lora_states, lora_paged = optimizer_state_bytes(targets.lora_numels, LORA_BYTES, options.optimizer)
    router_states, router_paged = optimizer_state_bytes(targets.router_numels, ROUTER_BYTES, options.optimizer)
    gradients = lora_params + router_params
    states = lora_states + router_states
    paged = lora_paged + router_paged
    rows += [
        Row("training", "LoRA adapters", lora_params, f"fp32, r={options.lora_r}"),
        Row("training", "gradients", gradients, "same dtype as the parameters (LoRA fp32, routers bf16)"),
        Row("training", "optimizer states", states, options.optimizer + (f"; {format_size(paged)} more paged to CPU when short" if paged else "")),
    ]
    # autocast keeps a bf16 copy of every fp32 LoRA weight until the forward pass ends
    autocast_cache = sum(targets.lora_numels) * COMPUTE_BYTES

    act = activations(shape, options, options.batch_size, options.max_seq_len, targets)
    if options.gradient_checkpointing:
        rows += [
            Row(
                "activations",
                "checkpointed layer inputs",
                act["checkpoints"],
                "one in flight; the others in pinned CPU memory (--offload-activations)"
                if options.offload_activations
                else f"{layers} x batch x seq x hidden, bf16",
            ),
            Row("activations", "one layer recomputed", act["layer"] + act["backward_transient"], "backward pass, with its transient gradients"),
        ]
    else:
        rows.append(Row("activations", "all layers", act["all_layers"], "kept for the backward pass (no gradient checkpointing)"))
    rows += [
        Row("activations", "final norm + loss", act["loss_backward"], "chunked LM head: one bf16 logits tile, fp32 hidden-state gradient"),
        Row("activations", "routing buffers", act["routing"], "router logits for the load-balancing loss") if shape.is_moe else None,
        Row("activations", "int8 layer inputs", act["int8_inputs"], "kept by bitsandbytes outside checkpointing (not validated on a GPU)")
        if options.bits == 8
        else None,
    ]
    rows = [r for r in rows if r is not None]

    resident = weights + lora_params + states  # from the second step on (states exist after the first)
    kept = (act["checkpoints"] if options.gradient_checkpointing else act["all_layers"]) + act["int8_inputs"]
    per_layer_grads = gradients // max(len(options.layers or range(layers)), 1)
    phases = {
        "loss forward": resident + autocast_cache + kept + act["routing"] + act["loss_forward"],
        "loss backward": resident + kept + act["routing"] + act["loss_backward"],
        "backward of the last layer": resident
        + act["routing"]
        + act["backward_transient"]
        + (kept + per_layer_grads + act["layer"] if options.gradient_checkpointing else kept + per_layer_grads),
        "optimizer step": resident + gradients,  # adamw_torch is torch's fused AdamW: no per-parameter temporaries
    }
    if options.gradient_checkpointing:
        # at the first layers, the checkpoints are gone but every gradient exists
        phases["backward of the first layer"] = resident + act["checkpoint_input"] + gradients + act["layer"] + act["backward_transient"] + act["routing"]
    phases = {name: value + ALLOCATOR_OVERHEAD_BYTES for name, value in phases.items()}
    peak = max(phases.values())
    rows.append(Row("peak", "allocator overhead", ALLOCATOR_OVERHEAD_BYTES, "cuBLAS workspaces, small buffers (measured on an H100)"))
    rows.append(Row("peak", "predicted peak", peak, f"at the {max(phases, key=phases.get)}"))

    total, active = parameter_counts(shape)
    notes = []
    if not options.packing:
        notes.append("sequences are assumed full length (max_seq_len); batches of shorter examples use less")
    if paged:
        notes.append("paged optimizer states live in CUDA managed memory, outside the predicted peak")
    return MemoryPlan(
        model=model_name,
        shape=shape,
        options=options,
        parameters_total=total,
        parameters_active=active,
        checkpoint_bytes=total * 2,
        trainable=dict(targets.by_kind),
        rows=rows,
        phases=phases,
        peak_bytes=peak,
        gpu_bytes_needed=int(peak * RESERVED_FACTOR) + CUDA_CONTEXT_BYTES,
        notes=notes,
    )
