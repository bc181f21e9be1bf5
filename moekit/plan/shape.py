"""What memory depends on, read from a transformers config: layer sizes and each decoder layer's linears."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import PlanError
from moekit.finetune.expert_layout import BIASED, projection_shapes
from moekit.plan.config import CAUSAL_LM_SUFFIXES, KNOWN_TYPES, MOE_TYPES


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
        raise PlanError(
            f"the model is not a causal language model (architectures: {', '.join(architectures)})",
            hint="moekit fine-tunes *ForCausalLM checkpoints such as the Mixtral or Phixtral models `moekit build` writes",
        )
    if model_type not in KNOWN_TYPES:
        raise PlanError(f"moekit plan does not know the architecture '{model_type}'", hint=f"known: {', '.join(KNOWN_TYPES)}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    inter = config.intermediate_size
    if model_type in ("phi", "phixtral"):
        attention = (
            Linear("q_proj", "attn", hidden, q_dim, True),
            Linear("k_proj", "attn", hidden, kv_dim, True),
            Linear("v_proj", "attn", hidden, kv_dim, True),
            Linear("dense", "attn", q_dim, hidden, True),
        )
        if getattr(config, "qk_layernorm", False):
            raise PlanError("Phi models with qk_layernorm are not supported by moekit plan")
        expert_mlp = (Linear("fc1", "mlp", hidden, inter, True), Linear("fc2", "mlp", inter, hidden, True))
        gated, norms, final_norm, lm_head_bias = False, 2 * hidden, 2 * hidden, True
    else:
        bias = bool(getattr(config, "attention_bias", False))
        if model_type == "phi3":
            attention = (Linear("qkv_proj", "attn", hidden, q_dim + 2 * kv_dim, bias), Linear("o_proj", "attn", q_dim, hidden, bias))
            expert_mlp = (Linear("gate_up_proj", "mlp", hidden, 2 * inter, False), Linear("down_proj", "mlp", inter, hidden, False))
        else:
            attention = (
                Linear("q_proj", "attn", hidden, q_dim, bias),
                Linear("k_proj", "attn", hidden, kv_dim, bias),
                Linear("v_proj", "attn", hidden, kv_dim, bias),
                Linear("o_proj", "attn", q_dim, hidden, bias),
            )
            mlp_bias = bool(getattr(config, "mlp_bias", False))
            expert_mlp = (
                Linear("gate_proj", "mlp", hidden, inter, mlp_bias),
                Linear("up_proj", "mlp", hidden, inter, mlp_bias),
                Linear("down_proj", "mlp", inter, hidden, mlp_bias),
            )
        gated, norms, final_norm, lm_head_bias = True, 2 * hidden, hidden, False
    is_moe = model_type in MOE_TYPES
    if is_moe:  # one expert's projections as moekit's expert block stores them (Mixtral's gate and up as one)
        expert_mlp = tuple(
            Linear(name, "experts", in_features, out_features, BIASED[model_type])
            for name, (out_features, in_features) in projection_shapes(model_type, hidden, inter).items()
        )
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=inter,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        experts=config.num_local_experts if is_moe else 0,
        top_k=config.num_experts_per_tok if is_moe else 1,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=getattr(config, "max_position_embeddings", None) or 0,
        attention=attention,
        expert_mlp=expert_mlp,
        gated_mlp=gated,
        norm_numel_per_layer=norms,
        final_norm_numel=final_norm,
        lm_head_bias=lm_head_bias,
        rope_scaling=_rope_scaling(config),
    )


def _rope_scaling(config) -> dict | None:
    """The config's rope scaling (transformers 5 `rope_parameters`, or the older `rope_scaling`), None if plain RoPE."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
        return rope
    return None


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
