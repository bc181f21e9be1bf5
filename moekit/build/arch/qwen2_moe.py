"""Qwen2-MoE output: Qwen2 experts plus one shared expert, in the Hub's Qwen1.5-MoE layout (as mergekit-moe writes it).

Every token goes through the shared expert, scaled by `sigmoid(shared_expert_gate(x))`, and through
its top-k routed experts, whose weights are renormalised to sum to one (`norm_topk_prob`). Tensors
are named `mlp.experts.E.{gate,up,down}_proj`, `mlp.gate`, `mlp.shared_expert.*` and
`mlp.shared_expert_gate`; transformers 5 fuses the experts at load time. The routers(layer) rows are
the routed experts' router, then the shared expert's gate row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moekit.build.arch.base import BuildInputs, OutputArchitecture, PlannedTensor, decoder_config_fields

QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Qwen2MoeArchitecture(OutputArchitecture):
    name = "qwen2_moe"
    input_architectures = (f"{QWEN2_ARCHITECTURE} with one shared expert",)

    def supports(self, inputs: BuildInputs) -> str | None:
        shared = inputs.recipe.shared_experts or []
        if len(shared) != 1:
            return f"Qwen2-MoE needs exactly one shared expert (`shared_experts:`), the recipe has {len(shared)}"
        if inputs.base.architecture != QWEN2_ARCHITECTURE:
            return f"Qwen2-MoE is built from Qwen2 ({QWEN2_ARCHITECTURE}) models here, not {inputs.base.architecture}"
        config = inputs.base.config
        if getattr(config, "use_sliding_window", False):
            return "the base model uses sliding-window attention on some layers (use_sliding_window=true), which this output would drop"
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            return f"the base model's MLP activation is {config.hidden_act}; Qwen2-MoE experts use silu"
        return None

    def output_config(self, inputs: BuildInputs):
        from transformers import Qwen2MoeConfig

        base = inputs.base.config
        recipe = inputs.recipe
        config = Qwen2MoeConfig(
            **decoder_config_fields(base),
            moe_intermediate_size=base.intermediate_size,
            shared_expert_intermediate_size=base.intermediate_size,
            use_sliding_window=False,
            decoder_sparse_step=1,
            num_experts=len(recipe.experts),
            num_experts_per_tok=recipe.experts_per_token,
            norm_topk_prob=True,
            router_aux_loss_coef=recipe.moekit.router_aux_loss_coef,
            qkv_bias=True,
        )
        config.architectures = ["Qwen2MoeForCausalLM"]
        config.dtype = inputs.dtype
        return config

    def tensors(self, inputs: BuildInputs, routers: Callable[[int], torch.Tensor]) -> Iterator[PlannedTensor]:
        from mergekit.moe.common import noise_and_scale

        config = self.output_config(inputs)
        base, recipe = inputs.base, inputs.recipe
        hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        head_dim = hidden // config.num_attention_heads
        q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        num_experts = config.num_experts
        cast = lambda t: t.to(inputs.dtype)  # noqa: E731

        def from_base(name, shape):
            return PlannedTensor(name, shape, "base", lambda: cast(base.tensor(name)))

        yield from_base("model.embed_tokens.weight", (vocab, hidden))
        yield from_base("model.norm.weight", (hidden,))
        if not config.tie_word_embeddings:
            head = "lm_head.weight" if base.has_tensor("lm_head.weight") else "model.embed_tokens.weight"
            yield PlannedTensor("lm_head.weight", (vocab, hidden), "base", lambda: cast(base.tensor(head)))

        mlp_shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        attention_shapes = {
            "self_attn.q_proj.weight": (q_dim, hidden),
            "self_attn.q_proj.bias": (q_dim,),
            "self_attn.k_proj.weight": (kv_dim, hidden),
            "self_attn.k_proj.bias": (kv_dim,),
            "self_attn.v_proj.weight": (kv_dim, hidden),
            "self_attn.v_proj.bias": (kv_dim,),
            "self_attn.o_proj.weight": (hidden, q_dim),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
        }
        expert_sources = [
            (f"mlp.experts.{i}.", expert, spec, f"expert {i} ({expert.ref})") for i, (expert, spec) in enumerate(zip(inputs.experts, recipe.experts))
        ]
        shared, shared_spec = inputs.shared_experts[0], recipe.shared_experts[0]
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            for name, shape in attention_shapes.items():
                yield from_base(prefix + name, shape)
            for out_prefix, expert, spec, source in [*expert_sources, ("mlp.shared_expert.", shared, shared_spec, f"shared expert ({shared.ref})")]:
                for projection, shape in mlp_shapes.items():
                    yield PlannedTensor(
                        f"{prefix}{out_prefix}{projection}.weight",
                        shape,
                        source,
                        lambda expert=expert, spec=spec, name=f"{prefix}mlp.{projection}.weight", residual=projection == "down_proj": cast(
                            noise_and_scale(expert.tensor(name), spec, is_residual=residual)
                        ),
                    )
            mode = recipe.gate_mode
            yield PlannedTensor(f"{prefix}mlp.gate.weight", (num_experts, hidden), f"router ({mode})", lambda layer=layer: cast(routers(layer)[:num_experts]))
            yield PlannedTensor(
                f"{prefix}mlp.shared_expert_gate.weight", (1, hidden), f"shared expert gate ({mode})", lambda layer=layer: cast(routers(layer)[num_experts:])
            )

    def active_parameters(self, config) -> tuple[int, int]:
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = hidden // config.num_attention_heads
        q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        attention = hidden * q_dim * 2 + hidden * kv_dim * 2 + q_dim + 2 * kv_dim + 2 * hidden
        gates = (config.num_experts + 1) * hidden
        mlp = 3 * hidden * inter
        embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
        layers = config.num_hidden_layers
        total = embeddings + layers * (attention + gates + (config.num_experts + 1) * mlp)
        active = embeddings + layers * (attention + gates + (config.num_experts_per_tok + 1) * mlp)
        return total, active


def refuse_for(command: str, model: str) -> None:
    """Raise, in one message, when `model` is a local Qwen2-MoE checkpoint, which `moekit COMMAND` cannot take yet."""
    import json
    from pathlib import Path

    from moekit.errors import UnsupportedArchitectureError

    config = Path(model).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # the command's own loading reports an unreadable config
    if model_type == "qwen2_moe":
        raise UnsupportedArchitectureError(
            f"moekit {command} cannot take Qwen2-MoE models (shared-expert builds such as {model}) yet: it handles Mixtral and Phixtral MoEs",
            hint="the checkpoint loads in plain transformers (Qwen2MoeForCausalLM); `moekit eval` compares it with its sources",
        )
