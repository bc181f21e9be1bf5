"""Fine-tuning settings, defined once and shared by `moekit finetune` and `moekit plan`.

`TrainingOptions` holds what shapes memory and what is trained; `moekit plan` takes exactly these.
`FinetuneOptions` adds what only a real run needs (data, schedule, distillation, logging).
Both commands generate their flags from these fields (`moekit.commands.options`), so they cannot drift.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moekit.units import parse_size

TargetKind = Literal["attn", "experts", "gate"]
TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)


def parse_int_list(value: str | list[int] | None) -> list[int] | None:
    """'0,2,5' or '0-3' or a list -> sorted unique ints; None or '' -> None."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list):
        return sorted(set(int(v) for v in value))
    out: set[int] = set()
    for part in str(value).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return sorted(out)


class TrainingOptions(BaseModel):
    """What is trained and how the batch is shaped: everything that decides memory."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8, 16] = Field(
        default=4, description="Weight precision while training: 4 (NF4 QLoRA, experts included), 8 (LLM.int8) or 16 (plain LoRA on bf16 weights)."
    )
    target: list[TargetKind] = Field(
        default=["attn", "experts", "gate"], description="Comma list of what to adapt: attn, experts, gate (routers, trained in full), or all."
    )
    experts: list[int] | None = Field(default=None, description="Comma list or range of expert indices whose adapters are trained (default: all experts).")
    layers: list[int] | None = Field(default=None, description="Comma list or range of layer indices to adapt (default: all layers).")
    lora_r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input (0, as Unsloth: on the experts it costs a "
        "copy of every expert input per step, and the adapter format stores 0).",
    )
    batch_size: int = Field(default=2, ge=1, description="Sequences per device per step.")
    max_seq_len: int = Field(default=1024, ge=8, description="Longest training sequence in tokens; longer examples are truncated.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in the backward pass to save memory.")
    offload_activations: bool = Field(
        default=False,
        description="With --gradient-checkpointing on a GPU: keep each layer's input in pinned CPU memory until the backward "
        "pass recomputes the layer (layers x batch x seq x hidden x 2 bytes less GPU memory, for one copy back per layer).",
    )
    nf4_gemm: bool = Field(
        default=False,
        description="With --bits 4 on a CUDA GPU: the expert GEMMs read the 4-bit weights themselves (Triton) instead of "
        "dequantizing each projection first, so no 16-bit copy of a projection is held (0.6 GB less at 4x7B) for "
        "slower steps (about 1.4x). For GPUs that the default does not fit.",
    )
    memory_limit: int | None = Field(
        default=None,
        description="GPU memory a step may allocate (16GB, 15.5GiB): where dequantizing a whole expert projection would go "
        "over it, that call dequantizes it in row slices (or, past 8 slices, reads the 4-bit weight in the GEMM), so only "
        "the calls made while memory is short pay (4x7B at 15GB: 7% slower with --offload-activations, 12% without). It "
        "bounds the dequantized weights, not the activations. With --bits 4 or 8 on a GPU; off by default.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field(
        default="adamw_torch",
        description="Optimizer: adamw_torch is torch's fused AdamW (one kernel per step); the 8-bit ones keep their states in 8 bits (bitsandbytes).",
    )
    packing: bool = Field(default=False, description="Pack several short examples into each max-seq-len sequence.")

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("--offload-activations moves the checkpointed layers' inputs: it needs --gradient-checkpointing")
        if self.nf4_gemm and self.bits != 4:
            raise ValueError(f"--nf4-gemm multiplies by NF4 weights: it needs --bits 4, not --bits {self.bits}")
        return self

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _parse_memory_limit(cls, value):
        if value is None:
            return None
        size = parse_size(value)
        if size <= 0:
            raise ValueError(f"must be a positive size such as 16GB, got {value!r}")
        return size

    @field_validator("target", mode="before")
    @classmethod
    def _parse_target(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if "all" in value:
            return list(TARGET_KINDS)
        unknown = [v for v in value if v not in TARGET_KINDS]
        if unknown:
            raise ValueError(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGET_KINDS)} or all")
        if not value:
            raise ValueError("--target is empty; choose from attn, experts, gate or all")
        return sorted(set(value), key=TARGET_KINDS.index)

    @field_validator("experts", "layers", mode="before")
    @classmethod
    def _parse_indices(cls, value):
        try:
            indices = parse_int_list(value)
        except ValueError:
            raise ValueError(f"expected a comma list of indices such as 0,2 or a range such as 0-3, got {value!r}") from None
        if indices and min(indices) < 0:
            raise ValueError("indices must be >= 0")
        return indices


class FinetuneOptions(TrainingOptions):
    """Everything `moekit finetune` takes besides MODEL and OUT."""

    data: str = Field(
        description="Training data: a local JSON/JSONL/Parquet file or directory, or a Hub dataset "
        "id (`name[:split]`), with `messages` or `prompt`/`completion` columns."
    )
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps (overrides --epochs).")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate (LoRA and routers).")
    grad_accum: int = Field(default=1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    router_aux_loss_coef: float = Field(
        default=0.02, ge=0, description="Coefficient of the router load-balancing loss (0 turns it off); logged apart from the LM loss."
    )
    teacher: str | None = Field(default=None, description="Teacher model for logit distillation (KL to its next-token distribution), loaded in 4-bit.")
    kd_alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the distillation term: loss = (1-a)*CE + a*KL.")
    kd_temperature: float = Field(default=2.0, gt=0, description="Softmax temperature of the distillation term.")
    cuda_graphs: bool = Field(
        default=True,
        description="With --packing on GPUs: capture each training step once as a CUDA graph and replay it, which takes "
        "the host's kernel launches out of the step; with --ddp the trainer then averages the gradients itself "
        "(off with --fsdp, a teacher, or dropout; says why when off).",
    )
    save_steps: int = Field(default=200, ge=1, description="Save a checkpoint every N steps.")
    resume: bool = Field(default=False, description="Resume from the newest checkpoint in OUT.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(default="none", description="Where to log metrics besides the local log.")
    seed: int = Field(default=0, description="Random seed for data order and adapter initialisation.")
    trust_remote_code: bool = Field(default=False, description="Allow model code from the checkpoint (needed for Phixtral builds without moekit installed).")
