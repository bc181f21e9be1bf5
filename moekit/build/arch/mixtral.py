"""Mixtral output: Llama/Mistral-family experts in the Hub's standard Mixtral layout.

Tensors are named as the Hub's Mixtral checkpoints and transformers' `save_pretrained` write them
(`block_sparse_moe.experts.E.w1/w2/w3`, `block_sparse_moe.gate`), which every loader and converter
reads; transformers 5 fuses them into `mlp.experts.gate_up_proj`/`down_proj` at load time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moekit.build.arch.base import BuildInputs, OutputArchitecture, PlannedTensor, decoder_config_fields

# Config keys of Llama-like models that Mixtral cannot express; a model using them is refused.
UNSUPPORTED_SETTINGS = {
    "attention_bias": "biases on the attention projections",
    "mlp_bias": "biases on the MLP projections",
}


class MixtralArchitecture(OutputArchitecture):
    name = "mixtral"

    @property
    def input_architectures(self) -> tuple[str, ...]:
        from moekit.build.families import FAMILIES

        return tuple(arch for family in FAMILIES for arch in family.architectures)

    def supports(self, inputs: BuildInputs) -> str | None:
        if inputs.recipe.shared_experts:
            return "Mixtral has no shared experts"
        if inputs.family is None:
            return f"{inputs.base.architecture} is not a Llama-like family that Mixtral can hold"
        for key, what in UNSUPPORTED_SETTINGS.items():
            if getattr(inputs.base.config, key, False):
                return f"the base model uses {what} ({key}=true), which Mixtral has no place for"
        if getattr(inputs.base.config, "hidden_act", "silu") not in ("silu", "swish"):
            return f"the base model's MLP activation is {inputs.base.config.hidden_act}; Mixtral experts use silu"
        if (reason := inputs.family.unsupported_setting(inputs.base.config)) is not None:
            return f"the base model ({inputs.base.architecture}) cannot be written exactly as Mixtral: {reason}"
        return None

    def output_config(self, inputs: BuildInputs):
        from transformers import MixtralConfig

        base = inputs.base.config
        recipe = inputs.recipe
        config = MixtralConfig(
            **decoder_config_fields(base),
            head_dim=getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
            sliding_window=getattr(base, "sliding_window", None),
            num_local_experts=len(recipe.experts),
            num_experts_per_tok=recipe.experts_per_token,
            router_aux_loss_coef=recipe.moekit.router_aux_loss_coef,
            router_jitter_noise=recipe.moekit.router_jitter_noise,
        )
        config.architectures = ["MixtralForCausalLM"]
        config.dtype = inputs.dtype
        return config

    def tensors(self, inputs: BuildInputs, routers: Callable[[int], torch.Tensor]) -> Iterator[PlannedTensor]:
        config = self.output_config(inputs)
        family, base = inputs.family, inputs.base
        hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        q_dim = config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim
        cast = lambda t: t.to(inputs.dtype)  # noqa: E731

        global_shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
        if not config.tie_word_embeddings:
            global_shapes["lm_head.weight"] = (vocab, hidden)
        take_global = _hand_out_once(lambda: family.global_tensors(base, config.tie_word_embeddings))
        for name, shape in global_shapes.items():
            yield PlannedTensor(name, shape, "base", lambda name=name: cast(take_global(name)))

        attention_shapes = {
            "self_attn.q_proj.weight": (q_dim, hidden),
            "self_attn.k_proj.weight": (kv_dim, hidden),
            "self_attn.v_proj.weight": (kv_dim, hidden),
            "self_attn.o_proj.weight": (hidden, q_dim),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
        }
        expert_shapes = {"w1": ((inter, hidden), "gate_proj"), "w2": ((hidden, inter), "down_proj"), "w3": ((inter, hidden), "up_proj")}
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            take_attention = _hand_out_once(lambda layer=layer: family.layer_attention(base, layer))
            for name, shape in attention_shapes.items():
                yield PlannedTensor(prefix + name, shape, "base", lambda name=name, take=take_attention: cast(take(name)))
            yield PlannedTensor(
                prefix + "block_sparse_moe.gate.weight",
                (len(inputs.experts), hidden),
                f"router ({inputs.recipe.gate_mode})",
                lambda layer=layer: cast(routers(layer)),
            )
            for index, (expert, spec) in enumerate(zip(inputs.experts, inputs.recipe.experts)):
                take_mlp = _hand_out_once(lambda expert=expert, layer=layer, spec=spec: _expert_mlp(family, expert, layer, spec))
                for out_name, (shape, source_name) in expert_shapes.items():
                    yield PlannedTensor(
                        f"{prefix}block_sparse_moe.experts.{index}.{out_name}.weight",
                        shape,
                        f"expert {index} ({expert.ref})",
                        lambda source_name=source_name, take=take_mlp: cast(take(source_name)),
                    )

    def active_parameters(self, config) -> tuple[int, int]:
        hidden, inter = config.hidden_size, config.intermediate_size
        q_dim = config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim
        per_layer_shared = hidden * q_dim * 2 + hidden * kv_dim * 2 + 2 * hidden + config.num_local_experts * hidden
        expert = 3 * hidden * inter
        embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
        layers = config.num_hidden_layers
        total = embeddings + layers * (per_layer_shared + config.num_local_experts * expert)
        active = embeddings + layers * (per_layer_shared + config.num_experts_per_tok * expert)
        return total, active


def _expert_mlp(family, expert, layer, spec) -> dict[str, torch.Tensor]:
    """An expert's MLP for one layer, with the recipe's noise and residual scale (mergekit's code)."""
    from mergekit.moe.common import noise_and_scale

    mlp = family.layer_mlp(expert, layer)
    return {name: noise_and_scale(tensor, spec, is_residual=name == "down_proj") for name, tensor in mlp.items()}


def _hand_out_once(make):
    """`take(name)`: call `make()` (a dict of tensors) on first use and hand each tensor out once,
    dropping it from the cache, so that no tensor stays in memory after it has been written."""
    cache = {}

    def take(name: str) -> torch.Tensor:
        if "tensors" not in cache:
            cache["tensors"] = make()
        tensors = cache["tensors"]
        tensor = tensors.pop(name)
        if not tensors:
            del cache["tensors"]
        return tensor

    return take
