"""Memory plan of a fine-tune, from the model's config alone: will it fit, and with which settings?

`estimate(config_or_path, options)` counts, for the settings of `moekit finetune` (`TrainingOptions`):

- weights by part (attention, experts, routers, embeddings/lm_head, norms) at the precision the trainer
  loads them in: NF4 with double quantization for every linear layer (experts included, one 4-bit tensor
  per projection of all experts of a layer), int8 for `--bits 8`, bf16 for `--bits 16`; routers, embeddings, lm_head and norms stay
  in higher precision. The 4-bit constants are counted the way bitsandbytes stores them (below);
- trainable parameters (LoRA A/B per targeted module, expert and layer; routers in full), their
  gradients and optimizer states;
- activations: checkpointed layer inputs, one layer's recomputed activations in the backward pass (or
  every layer's without gradient checkpointing), the loss (TRL's chunked LM head: one tile of logits at a
  time rather than batch * seq * vocab fp32 logits) and the router buffers of the load-balancing loss.

The predicted peak is the largest of three moments of a training step: the loss (forward end and loss
backward), the backward pass through the last layer, and the optimizer step. It predicts what
`torch.cuda.max_memory_allocated()` reports; the memory a GPU needs adds the CUDA context and the
allocator's slack. `benchmarks/plan_accuracy.py` checks the prediction against measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import PlanError, SourceError
from moekit.finetune.options import TrainingOptions
from moekit.units import format_count, format_size

# --- bitsandbytes storage (bitsandbytes 0.50, functional.quantize_4bit / quantize_blockwise) -------------
NF4_BLOCKSIZE = 64  # values per absmax of the 4-bit weights
NESTED_BLOCKSIZE = 256  # 8-bit absmax values per fp32 absmax of the double quantization
# per 4-bit tensor besides the packed values and absmax: the 8-bit code of the nested state (256 fp32),
# its mean offset (1 fp32) and the NF4 code (16 fp32), each its own tensor
NF4_FIXED_BYTES = 256 * 4 + 4 + 16 * 4
ADAM8BIT_BLOCKSIZE = 256  # values per fp32 absmax of bitsandbytes' blockwise 8-bit optimizer states
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep fp32 states (min_8bit_size)
PAGED_MIN_SIZE = 100_000  # paged optimizers page only tensors at least this large (get_state_buffer)

# --- what the moekit trainer does ------------------------------------------------------------------------
COMPUTE_BYTES = 2  # bf16 compute; embeddings, lm_head, norms and routers stay in bf16 (quantize_moe)
ROUTER_BYTES = COMPUTE_BYTES  # routers are not quantized and are trained in full in the compute dtype
LORA_BYTES = 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype); the trainer keeps them so
# TRL's SFTTrainer scores tokens with a chunked ("fused") LM head: the (tokens, vocab) logits never exist
# whole, only one bf16 tile of LOSS_TOKEN_CHUNK tokens x LOSS_VOCAB_CHUNK vocabulary entries at a time
LOSS_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
LOSS_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
LOSS_PER_TOKEN_BYTES = 40  # fp32 running max, sums, target logit, log-probs, entropy per scored token

# --- constants outside the arithmetic (benchmarks/plan_accuracy.py, H100, torch 2.11) ----------------------
# set before the first GPU run; measured there: memory allocated between steps exceeds weights + adapters +
# optimizer states by 64.5 MiB in every configuration (cuBLAS workspaces and small buffers)
ALLOCATOR_OVERHEAD_BYTES = 64 * 2**20
RESERVED_FACTOR = 1.10  # calibrated: max_memory_reserved / max_memory_allocated was 1.01-1.10 for 4-bit Mixtral there
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context and kernels, outside the allocator (an assumption, not measured)

DENSE_TYPES = ("llama", "mistral", "phi", "phi3")
MOE_TYPES = ("mixtral", "phixtral")
KNOWN_TYPES = MOE_TYPES + DENSE_TYPES
# A config.json without these would be filled in from transformers' defaults (Mixtral's 8 experts x 32 layers x 4096):
# a plan, or an evaluation, of a model that is not the one on disk.
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
MOE_REQUIRED_FIELDS = ("num_local_experts", "num_experts_per_tok")


def missing_fields(config_dict: dict, model_type: str | None) -> list[str]:
    """The required fields a config.json (as a dict) leaves out, for a known architecture."""
    required = REQUIRED_FIELDS + (MOE_REQUIRED_FIELDS if model_type in MOE_TYPES else ())
    return [key for key in required if config_dict.get(key) is None]
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer (per expert for experts)."""

    name: str
    kind: str  # attn, experts, mlp (the dense MLP)
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a transformers config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int  # 0 for a dense model
    top_k: int
    tied_embeddings: bool
    max_positions: int
    attention: tuple[Linear, ...]
    expert_mlp: tuple[Linear, ...]  # one expert's (or the dense MLP's) linears
    gated_mlp: bool  # SwiGLU (3 matrices) rather than fc1/gelu/fc2
    norm_numel_per_layer: int
    final_norm_numel: int
    lm_head_bias: bool
    rope_scaling: dict | None

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _linear_numel(linears) -> int:
    return sum(lin.weight_numel + (lin.out_features if lin.bias else 0) for lin in linears)


def shape_from_config(config) -> ModelShape:
    """ModelShape of a transformers config of a known architecture; PlanError otherwise."""
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        raise PlanError(f"the model is not a causal language model (architectures: {', '.join(architectures)})",
                        hint="moekit fine-tunes *ForCausalLM checkpoints such as the Mixtral or Phixtral models `moekit build` writes")
    if model_type not in KNOWN_TYPES:
        raise PlanError(f"moekit plan does not know the architecture '{model_type}'",
                        hint=f"known: {', '.join(KNOWN_TYPES)}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    inter = config.intermediate_size
    if model_type in ("phi", "phixtral"):
        attention = (Linear("q_proj", "attn", hidden, q_dim, True), Linear("k_proj", "attn", hidden, kv_dim, True),
                     Linear("v_proj", "attn", hidden, kv_dim, True), Linear("dense", "attn", q_dim, hidden, True))
        if getattr(config, "qk_layernorm", False):
            raise PlanError("Phi models with qk_layernorm are not supported by moekit plan")
        mlp_kind = "experts" if model_type == "phixtral" else "mlp"
        expert_mlp = (Linear("fc1", mlp_kind, hidden, inter, True), Linear("fc2", mlp_kind, inter, hidden, True))
        gated, norms, final_norm, lm_head_bias = False, 2 * hidden, 2 * hidden, True
    else:
        bias = bool(getattr(config, "attention_bias", False))
        if model_type == "phi3":
            attention = (Linear("qkv_proj", "attn", hidden, q_dim + 2 * kv_dim, bias), Linear("o_proj", "attn", q_dim, hidden, bias))
            expert_mlp = (Linear("gate_up_proj", "mlp", hidden, 2 * inter, False), Linear("down_proj", "mlp", inter, hidden, False))
        else:
            attention = (Linear("q_proj", "attn", hidden, q_dim, bias), Linear("k_proj", "attn", hidden, kv_dim, bias),
                         Linear("v_proj", "attn", hidden, kv_dim, bias), Linear("o_proj", "attn", q_dim, hidden, bias))
            if model_type == "mixtral":
                # as moekit's expert block holds them (finetune/experts.py): gate and up fused, as in transformers 5
                expert_mlp = (Linear("gate_up_proj", "experts", hidden, 2 * inter, False), Linear("down_proj", "experts", inter, hidden, False))
            else:
                mlp_bias = bool(getattr(config, "mlp_bias", False))
                expert_mlp = (Linear("gate_proj", "mlp", hidden, inter, mlp_bias), Linear("up_proj", "mlp", hidden, inter, mlp_bias),
                              Linear("down_proj", "mlp", inter, hidden, mlp_bias))
        gated, norms, final_norm, lm_head_bias = True, 2 * hidden, hidden, False
    is_moe = model_type in MOE_TYPES
    return ModelShape(
        model_type=model_type, hidden=hidden, intermediate=inter, layers=config.num_hidden_layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=config.vocab_size,
        experts=config.num_local_experts if is_moe else 0, top_k=config.num_experts_per_tok if is_moe else 1,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=getattr(config, "max_position_embeddings", None) or 0,
        attention=attention, expert_mlp=expert_mlp, gated_mlp=gated, norm_numel_per_layer=norms,
        final_norm_numel=final_norm, lm_head_bias=lm_head_bias, rope_scaling=_rope_scaling(config),
    )


def _rope_scaling(config) -> dict | None:
    """The config's rope scaling (transformers 5 `rope_parameters`, or the older `rope_scaling`), None if plain RoPE."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
        return rope
    return None


# --- reading the config ----------------------------------------------------------------------------------

def load_config(config_or_path):
    """A transformers config from a config object, a dict, a directory, a config.json, a Hub id or zoo:NAME.

    Only config.json is read (fetched alone for Hub ids): no weights.
    """
    from transformers import AutoConfig, PretrainedConfig

    from moekit.models import register_phixtral_config

    register_phixtral_config()

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    if isinstance(config_or_path, dict):
        config_dict, name = dict(config_or_path), "config"
    else:
        config_file = _config_file(str(config_or_path))
        try:
            config_dict = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot read {config_file}: {err}") from None
        name = str(config_or_path)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{name} has no model_type: not a transformers model config")
    if model_type not in KNOWN_TYPES:
        architectures = config_dict.get("architectures") or []
        if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
            raise PlanError(f"the model is not a causal language model (architectures: {', '.join(architectures)})")
        raise PlanError(f"moekit plan does not know the architecture '{model_type}'", hint=f"known: {', '.join(KNOWN_TYPES)}")
    missing = missing_fields(config_dict, model_type)
    if missing:
        raise PlanError(f"{name} lacks required config fields: {', '.join(missing)}",
                        hint="transformers would fill them in with its defaults, which are not this model's; add them to config.json")
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, TypeError) as err:
        raise PlanError(f"invalid {model_type} config in {name}: {err}") from None


def _config_file(ref: str) -> Path:
    local = Path(ref).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"{local} has no config.json: not a model directory")
        return local / "config.json"
    from moekit.build.sources import reference_scheme, resolve_model

    if reference_scheme(ref) is not None:
        try:
            return _config_file(str(resolve_model(ref)))
        except SourceError as err:
            raise PlanError(err.message, hint=err.hint) from None
    return _hub_config(ref)


def _hub_config(ref: str) -> Path:
    """config.json of a Hub model, alone (no weights); honours HF_HUB_OFFLINE and the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from moekit.build.sources import HUB_ID, split_revision

    repo_id, revision = split_revision(ref)
    if not HUB_ID.match(repo_id) or repo_id.startswith((".", "/", "~")) or "/" not in repo_id:
        raise PlanError(f"model '{ref}' is not a directory and not a Hub id (org/name[@revision])")
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except LocalEntryNotFoundError:
        raise PlanError(f"model '{ref}' is not a local directory and its config.json is not in the Hugging Face cache (offline or unreachable Hub)",
                        hint=f"check the name, or fetch it once with `hf download {repo_id} config.json`") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise PlanError(f"model '{ref}' was not found on the Hub ({type(err).__name__})") from None
    except (HfHubHTTPError, OSError) as err:
        raise PlanError(f"cannot fetch the config of '{ref}' from the Hub: {err}") from None


# --- the plan --------------------------------------------------------------------------------------------

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
            "shape": {"layers": shape.layers, "hidden": shape.hidden, "intermediate": shape.intermediate,
                      "heads": shape.heads, "kv_heads": shape.kv_heads, "vocab": shape.vocab,
                      "experts": shape.experts, "experts_per_token": shape.top_k},
            "options": self.options.model_dump(),
            "parameters": {"total": self.parameters_total, "active": self.parameters_active,
                           "trainable": sum(self.trainable.values()), "trainable_by_kind": self.trainable},
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
            (f"settings:    {opts.bits}-bit weights, target {','.join(opts.target)}, LoRA r={opts.lora_r}, batch {opts.batch_size} x {opts.max_seq_len} tokens, "
            f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}, {opts.optimizer}"),
            (f"parameters:  {format_count(self.parameters_total)} total, {format_count(self.parameters_active)} active per token, "
            f"{format_count(sum(self.trainable.values()))} trainable; checkpoint on disk (bf16 safetensors): {format_size(self.checkpoint_bytes)}"),
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
        lines.append(f"predicted peak: {format_size(self.peak_bytes)} allocated (at the {self.peak_phase}); "
                     f"the GPU needs about {format_size(self.gpu_bytes_needed)} with the CUDA context and allocator slack")
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"on a {format_size(self.gpu_memory)} GPU: {verdict}; largest batch size at {opts.max_seq_len} tokens: "
                         f"{self.largest_batch_size or 'none'}; longest sequence at batch {opts.batch_size}: {self.largest_seq_len or 'none'}")
            if self.advice:
                lines.append(f"turn first: {self.advice}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes allocates for one NF4 tensor with double quantization (uint8 storage)."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return (numel + 1) // 2 + blocks + 4 * nested_blocks + NF4_FIXED_BYTES


def int8_bytes(linear: Linear) -> int:
    """LLM.int8 weight: int8 values and one fp32 scale per output row."""
    return linear.weight_numel + 4 * linear.out_features


def _weight_bytes(linear: Linear, bits: int) -> tuple[int, int]:
    """(bytes of the stored values, bytes of the quantization constants) of one linear layer's weight + bias."""
    bias = linear.out_features * COMPUTE_BYTES if linear.bias else 0
    if bits == 4:
        packed = (linear.weight_numel + 1) // 2
        return packed + bias, nf4_bytes(linear.weight_numel) - packed
    if bits == 8:
        return linear.weight_numel + bias, 4 * linear.out_features
    return linear.weight_numel * COMPUTE_BYTES + bias, 0


def _optimizer_state_bytes(numels: list[int], param_bytes: int, optimizer: str) -> tuple[int, int]:
    """(state bytes in the allocator, paged state bytes) of the optimizer for tensors of these sizes."""
    if optimizer == "sgd":
        return 0, 0
    if optimizer == "adamw_torch":
        return sum(2 * n * param_bytes for n in numels), 0
    allocated = paged = 0
    for n in numels:
        if n < ADAM8BIT_MIN_SIZE:
            state = 2 * 4 * n
        else:
            state = 2 * n + 2 * 4 * -(-n // ADAM8BIT_BLOCKSIZE)
        if optimizer == "paged_adamw_8bit" and n >= PAGED_MIN_SIZE:
            paged += 2 * n  # the 8-bit values are paged; their absmax stay in the allocator
            allocated += state - 2 * n
        else:
            allocated += state
    return allocated, paged


@dataclass
class _Trainable:
    lora_numels: list[int]  # one entry per LoRA A or B matrix
    router_numels: list[int]
    by_kind: dict[str, int]
    lora_inputs_per_token: dict[str, int]  # kind -> input features of the targeted linears (dropout copies)


def _trainable(shape: ModelShape, options: TrainingOptions) -> _Trainable:
    layers = options.layers if options.layers is not None else list(range(shape.layers))
    if layers and max(layers) >= shape.layers:
        raise PlanError(f"layer index {max(layers)} is out of range: the model has {shape.layers} layers (0-{shape.layers - 1})")
    if not shape.is_moe and {"experts", "gate"} & set(options.target):
        raise PlanError(f"--target {','.join(t for t in options.target if t != 'attn')} needs an MoE, but this {shape.model_type} model is dense",
                        hint="use --target attn, or plan the MoE that `moekit build` makes from it")
    experts = options.experts if options.experts is not None else list(range(shape.experts))
    if shape.is_moe and experts and max(experts) >= shape.experts:
        raise PlanError(f"expert index {max(experts)} is out of range: the model has {shape.experts} experts (0-{shape.experts - 1})")
    r = options.lora_r
    lora: list[int] = []
    by_kind = {kind: 0 for kind in options.target}
    inputs: dict[str, int] = {"attn": 0, "experts": 0}
    for _layer in layers:
        if "attn" in options.target:
            for lin in shape.attention:
                lora += [r * lin.in_features, r * lin.out_features]
        if "experts" in options.target:
            for _expert in experts:
                for lin in shape.expert_mlp:
                    lora += [r * lin.in_features, r * lin.out_features]
    if "attn" in options.target:
        by_kind["attn"] = len(layers) * sum(r * (lin.in_features + lin.out_features) for lin in shape.attention)
        inputs["attn"] = sum(lin.in_features for lin in shape.attention)
    if "experts" in options.target:
        by_kind["experts"] = len(layers) * len(experts) * sum(r * (lin.in_features + lin.out_features) for lin in shape.expert_mlp)
        inputs["experts"] = sum(lin.in_features for lin in shape.expert_mlp)
    routers = [shape.experts * shape.hidden] * len(layers) if "gate" in options.target else []
    if routers:
        by_kind["gate"] = sum(routers)
    return _Trainable(lora, routers, by_kind, inputs)


def _layer_activation_bytes(shape: ModelShape, options: TrainingOptions, tokens: int, targets: _Trainable) -> int:
    """Bytes one decoder layer keeps for its backward pass (bf16 compute, autocast), for `tokens` tokens."""
    h, inter, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    dropout = 3 if options.lora_dropout > 0 else 0  # a bf16 copy of the LoRA input and its bool mask
    norm = 10 * h  # the norm's fp32 input and normalized values and its bf16 output
    # attention: q/k/v outputs, rotated q/k, attention output (+ softmax stats), o output, residual
    attention = norm + 2 * (q + 2 * kv) + 4 * (q + kv) + 2 * q + 4 * h + dropout * targets.lora_inputs_per_token["attn"]
    per_token = attention
    if shape.is_moe:
        per_token += norm + shape.experts * 10  # router logits (bf16), fp32 softmax, routing weights
        experts_targeted = targets.lora_inputs_per_token["experts"] > 0
        if shape.gated_mlp:
            # per routed token: silu input, silu output, up output (kept by the product), weighted output
            routed = 6 * inter + 2 * h
            if experts_targeted:
                routed += (2 * 3 * h + 3 * inter) if dropout else (2 * h + 2 * inter)
        else:
            # fc1 output, gelu_new's intermediates, weighted fc2 output
            routed = 12 * inter + 2 * h
            if experts_targeted:
                routed += (3 * h + 3 * inter) if dropout else (2 * h + 2 * inter)
        per_token += shape.top_k * routed
    else:
        per_token += norm + (6 * inter + 2 * h if shape.gated_mlp else 12 * inter + 2 * h)
    return tokens * per_token


def grouped_experts(shape: ModelShape, options: TrainingOptions) -> bool:
    """Whether the experts run as grouped GEMMs on the GPU: what `experts.ExpertBlock` decides from its own
    storage (`expert_layout.grouped_on_gpu`), for every --bits and --experts choice."""
    from moekit.finetune.expert_layout import grouped_on_gpu

    family = shape.model_type if shape.is_moe else None
    dims = [size for lin in shape.expert_mlp for size in (lin.out_features, lin.in_features)]
    return grouped_on_gpu(family, dims, options.bits)


def _activations(shape: ModelShape, options: TrainingOptions, batch: int, seq: int, targets: _Trainable) -> dict[str, int]:
    tokens = batch * seq
    h = shape.hidden
    layer = _layer_activation_bytes(shape, options, tokens, targets)
    checkpoint_input = tokens * h * COMPUTE_BYTES
    # the loss: TRL's chunked LM head over the scored tokens (every position but each sequence's last)
    scored = batch * (seq - 1)
    tile = min(scored, LOSS_TOKEN_CHUNK) * min(shape.vocab, LOSS_VOCAB_CHUNK) * COMPUTE_BYTES
    final_hidden = tokens * h * (8 + COMPUTE_BYTES)  # final norm (fp32 input, bf16 output) and its output
    loss_forward = final_hidden + tile + scored * (h * COMPUTE_BYTES + LOSS_PER_TOKEN_BYTES)
    # backward: the fp32 hidden-state gradient, its bf16 copy, the saved scored hidden states, the tile
    loss_backward = final_hidden + tile + scored * (h * (4 + 2 * COMPUTE_BYTES) + LOSS_PER_TOKEN_BYTES) + tokens * h * COMPUTE_BYTES
    # load-balancing loss: every layer's router logits (kept), concatenated, fp32 softmax, top-k one-hot (int64)
    routing = 0
    if shape.is_moe:
        routing = shape.layers * tokens * shape.experts * (2 * COMPUTE_BYTES + 2 * 4 + shape.top_k * 8)
    # transient in a layer's backward: dequantized frozen weights and the gradients of the intermediate
    # activations. Grouped experts re-materialise one projection of every expert at once and take the
    # gradients of all routed tokens together; otherwise one linear layer and one expert at a time.
    largest = max(lin.weight_numel for lin in shape.attention + shape.expert_mlp)
    if grouped_experts(shape, options):  # bf16 expert weights are used as they are
        weights_at_once, rows_at_once = (shape.experts * largest if options.bits < 16 else 0), tokens * shape.top_k
    else:
        weights_at_once = largest if options.bits < 16 else 0  # bf16 weights are used as they are
        rows_at_once = -(-tokens * shape.top_k // max(shape.experts, 1))
    backward_transient = (weights_at_once + 3 * rows_at_once * shape.intermediate) * COMPUTE_BYTES
    # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.tensors), not as a saved
    # tensor, so gradient checkpointing cannot drop it: every int8 layer's inputs stay for the whole step
    int8_inputs = 0
    if options.bits == 8:
        # MoE experts are int8 tensors of the expert block, whose backward keeps only the row offsets
        mlp_inputs = 0 if shape.is_moe else 2 * h + 2 * shape.intermediate  # the MLP's input and the down input
        int8_inputs = shape.layers * tokens * (2 * h + 2 * shape.q_dim + shape.top_k * mlp_inputs)
    return {
        "int8_inputs": int8_inputs,
        "checkpoints": shape.layers * checkpoint_input if options.gradient_checkpointing else 0,
        "layer": layer,
        "all_layers": shape.layers * layer,
        "loss_forward": loss_forward,
        "loss_backward": loss_backward,
        "routing": routing,
        "backward_transient": backward_transient,
        "checkpoint_input": checkpoint_input,
    }


def _check_options(shape: ModelShape, options: TrainingOptions) -> None:
    if options.batch_size < 1:
        raise PlanError("batch size must be at least 1")
    if shape.max_positions and options.max_seq_len > shape.max_positions:
        scaling = f" (it already uses {shape.rope_scaling.get('rope_type', shape.rope_scaling.get('type'))} rope scaling)" if shape.rope_scaling else ""
        raise PlanError(f"--max-seq-len {options.max_seq_len} is beyond the model's max_position_embeddings ({shape.max_positions}){scaling}",
                        hint=f"pass --max-seq-len {shape.max_positions} or less; longer contexts need rope scaling (e.g. rope_scaling "
                             "{'rope_type': 'linear' or 'yarn', 'factor': N}) set in the model's config.json first")


def _plan(shape: ModelShape, options: TrainingOptions, model_name: str) -> MemoryPlan:
    _check_options(shape, options)
    bits = options.bits
    h, layers, vocab = shape.hidden, shape.layers, shape.vocab
    experts = max(shape.experts, 1)
    targets = _trainable(shape, options)

    # weights
    attn_values, attn_consts = (sum(x) for x in zip(*(_weight_bytes(lin, bits) for lin in shape.attention)))
    # MoE experts are stored one tensor per projection for all experts of a layer (finetune/experts.py), so the
    # 4-bit constants are those of the stacked tensor; values per layer below cover all experts
    stacked = [Linear(lin.name, lin.kind, lin.in_features, lin.out_features * experts, lin.bias) for lin in shape.expert_mlp]
    expert_values, expert_consts = (sum(x) for x in zip(*(_weight_bytes(lin, bits) for lin in stacked)))
    router_numel = shape.experts * h
    embed_numel = vocab * h
    lm_head_numel = 0 if shape.tied_embeddings else vocab * h
    rows = [
        Row("weights", "attention", layers * attn_values, f"{bits}-bit" if bits < 16 else "bf16"),
        Row("weights", "experts" if shape.is_moe else "mlp", layers * expert_values,
            f"{bits}-bit, {layers} layers x {experts} experts" if shape.is_moe else f"{bits}-bit" if bits < 16 else "bf16"),
    ]
    if shape.is_moe:
        rows.append(Row("weights", "routers", layers * router_numel * ROUTER_BYTES, "bf16, not quantized"))
    rows += [
        Row("weights", "embeddings + lm_head", (embed_numel + lm_head_numel + (vocab if shape.lm_head_bias else 0)) * COMPUTE_BYTES,
            "bf16, not quantized" + (", tied" if shape.tied_embeddings else "")),
        Row("weights", "norms", (layers * shape.norm_numel_per_layer + shape.final_norm_numel) * COMPUTE_BYTES, "bf16"),
    ]
    if bits < 16:
        rows.append(Row("weights", "quantization constants", layers * (attn_consts + expert_consts),
                        "NF4 absmax, double-quantized (8-bit per 64 values + fp32 per 256 blocks)" if bits == 4 else "int8 row scales (fp32)"))
    weights = sum(r.bytes for r in rows)

    # trainable parameters, gradients, optimizer states
    lora_params = sum(targets.lora_numels) * LORA_BYTES
    router_params = sum(targets.router_numels) * ROUTER_BYTES
    # routers trained in full are already counted among the weights; LoRA matrices are new
    lora_states, lora_paged = _optimizer_state_bytes(targets.lora_numels, LORA_BYTES, options.optimizer)
    router_states, router_paged = _optimizer_state_bytes(targets.router_numels, ROUTER_BYTES, options.optimizer)
    gradients = lora_params + router_params
    states = lora_states + router_states
    paged = lora_paged + router_paged
    rows += [
        Row("training", "LoRA adapters", lora_params, f"fp32, r={options.lora_r}"),
        Row("training", "gradients", gradients, "same dtype as the parameters (LoRA fp32, routers bf16)"),
        Row("training", "optimizer states", states, options.optimizer + (f"; {format_size(paged)} more paged to CPU when short" if paged else "")),
    ]
    # the optimizer step's temporaries: torch's foreach AdamW takes one sqrt(exp_avg_sq) per parameter
    step_temporary = gradients if options.optimizer == "adamw_torch" else 0
    # autocast keeps a bf16 copy of every fp32 LoRA weight until the forward pass ends
    autocast_cache = sum(targets.lora_numels) * COMPUTE_BYTES

    act = _activations(shape, options, options.batch_size, options.max_seq_len, targets)
    if options.gradient_checkpointing:
        rows += [
            Row("activations", "checkpointed layer inputs", act["checkpoints"], f"{layers} x batch x seq x hidden, bf16"),
            Row("activations", "one layer recomputed", act["layer"] + act["backward_transient"], "backward pass, with its transient gradients"),
        ]
    else:
        rows.append(Row("activations", "all layers", act["all_layers"], "kept for the backward pass (no gradient checkpointing)"))
    rows += [
        Row("activations", "final norm + loss", act["loss_backward"], "chunked LM head: one bf16 logits tile, fp32 hidden-state gradient"),
        Row("activations", "routing buffers", act["routing"], "router logits for the load-balancing loss") if shape.is_moe else None,
        Row("activations", "int8 layer inputs", act["int8_inputs"], "kept by bitsandbytes outside checkpointing (not validated on a GPU)") if options.bits == 8 else None,
    ]
    rows = [r for r in rows if r is not None]

    resident = weights + lora_params + states  # from the second step on (states exist after the first)
    kept = (act["checkpoints"] if options.gradient_checkpointing else act["all_layers"]) + act["int8_inputs"]
    per_layer_grads = gradients // max(len(options.layers or range(layers)), 1)
    phases = {
        "loss forward": resident + autocast_cache + kept + act["routing"] + act["loss_forward"],
        "loss backward": resident + kept + act["routing"] + act["loss_backward"],
        "backward of the last layer": resident + act["routing"] + act["backward_transient"] + (
            kept + per_layer_grads + act["layer"] if options.gradient_checkpointing else kept + per_layer_grads),
        "optimizer step": resident + gradients + step_temporary,
    }
    if options.gradient_checkpointing:
        # at the first layers, the checkpoints are gone but every gradient exists
        phases["backward of the first layer"] = (resident + act["checkpoint_input"] + gradients + act["layer"]
                                                 + act["backward_transient"] + act["routing"])
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
        model=model_name, shape=shape, options=options, parameters_total=total, parameters_active=active,
        checkpoint_bytes=total * 2, trainable=dict(targets.by_kind), rows=rows, phases=phases, peak_bytes=peak,
        gpu_bytes_needed=int(peak * RESERVED_FACTOR) + CUDA_CONTEXT_BYTES, notes=notes,
    )


def parameter_counts(shape: ModelShape) -> tuple[int, int]:
    """(total, active per token) parameters: the experts not chosen for a token are not active."""
    experts = max(shape.experts, 1)
    attention = _linear_numel(shape.attention)
    expert = _linear_numel(shape.expert_mlp)
    router = shape.experts * shape.hidden
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) + (shape.vocab if shape.lm_head_bias else 0)
    shared = shape.layers * (attention + router + shape.norm_numel_per_layer) + embeddings + shape.final_norm_numel
    total = shared + shape.layers * experts * expert
    active = shared + shape.layers * (shape.top_k if shape.is_moe else 1) * expert
    return total, active


def estimate(config_or_path, options: TrainingOptions | None = None, *, gpu_memory: int | None = None) -> MemoryPlan:
    """Memory plan of fine-tuning the model of `config_or_path` with `options`, from its config only.

    `config_or_path`: a transformers config, a config dict, a model directory, a config.json, a Hub id or
    zoo:NAME. With `gpu_memory` (bytes), the plan says whether it fits, the largest batch size and
    sequence length that fit, and which setting to change first.
    """
    options = options or TrainingOptions()
    config = load_config(config_or_path)
    name = config_or_path if isinstance(config_or_path, (str, Path)) else getattr(config, "_name_or_path", "") or config.model_type
    shape = shape_from_config(config)
    capped = shape.max_positions and options.max_seq_len > shape.max_positions and "max_seq_len" not in options.model_fields_set
    if capped:  # the default length, not the user's: plan for the longest the model takes rather than refuse
        default = options.max_seq_len
        options = options.model_copy(update={"max_seq_len": shape.max_positions})
    plan = _plan(shape, options, str(name))
    if capped:
        plan.notes.insert(0, f"sequence length capped at the model's max_position_embeddings ({shape.max_positions}; the default "
                             f"--max-seq-len is {default}): pass --max-seq-len {shape.max_positions} to moekit finetune as well")
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise PlanError(f"GPU memory must be positive, got {gpu_memory} bytes")
        _fit(plan, gpu_memory)
    return plan


def _needed(shape: ModelShape, options: TrainingOptions, **changes) -> int:
    return _plan(shape, options.model_copy(update=changes), "").gpu_bytes_needed


def _fit(plan: MemoryPlan, gpu_memory: int) -> None:
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
    if options.bits > 4:
        candidates.append(("--bits 4 (NF4 weights, experts included)", {"bits": 4}))
    if options.lora_r > 8:
        candidates.append(("--lora-r 8", {"lora_r": 8}))
    if plan.largest_seq_len:
        candidates.append((f"--max-seq-len {plan.largest_seq_len}", {"max_seq_len": plan.largest_seq_len}))
    for text, change in candidates:
        if _needed(shape, options, **change) <= gpu_memory:
            return text
    # no single change is enough: add the memory-only changes one by one, then shrink the batch, then the sequence
    steps: list[str] = []
    changes: dict = {}
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
        seq = _largest(lambda s, current=current: _needed(shape, current, batch_size=1, max_seq_len=s) <= gpu_memory, 8, options.max_seq_len)
        if seq:
            return ", then ".join(steps + ["--batch-size 1", f"--max-seq-len {seq - seq % 64 if seq >= 64 else seq}"])
    return "no setting fits, even batch 1 at 8 tokens with 8-bit optimizer states: use a larger GPU, or train fewer targets (--target gate, --layers)"
