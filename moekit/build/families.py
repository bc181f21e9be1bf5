"""Input families: how to read the tensors of a dense checkpoint of one architecture.

A family names the checkpoint's tensors in a common vocabulary that output architectures use:
per layer `attention` (q/k/v/o projections and the norms, Llama names) and `mlp` (gate/up/down).
Adding an input architecture means adding a family here; output architectures do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.build.sources import SourceModel


@dataclass(frozen=True)
class DenseFamily:
    """A Llama-like decoder: embeddings, per-layer attention + gated MLP, final norm, LM head."""

    name: str
    architectures: tuple[str, ...]

    def layer_attention(self, source: SourceModel, layer: int) -> dict[str, torch.Tensor]:
        """Attention and norm tensors of one layer, named relative to the layer (Llama names)."""
        prefix = f"model.layers.{layer}."
        names = [
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ]
        return {name: source.tensor(prefix + name) for name in names}

    def layer_mlp(self, source: SourceModel, layer: int) -> dict[str, torch.Tensor]:
        """The MLP of one layer as {'gate_proj', 'up_proj', 'down_proj'} weights."""
        prefix = f"model.layers.{layer}.mlp."
        return {name: source.tensor(f"{prefix}{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")}

    def global_tensors(self, source: SourceModel, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
        tensors = {name: source.tensor(name) for name in ("model.embed_tokens.weight", "model.norm.weight")}
        if not tie_word_embeddings:
            tensors["lm_head.weight"] = source.tensor("lm_head.weight") if source.has_tensor("lm_head.weight") else tensors["model.embed_tokens.weight"]
        return tensors

    def unsupported_setting(self, config) -> str | None:
        """A setting of this family's config that the common vocabulary above cannot carry, or None."""
        return None


@dataclass(frozen=True)
class Phi3Family(DenseFamily):
    """Phi-3 / Phi-3.5-mini / Phi-4(-mini): Llama-like with fused `qkv_proj` and `gate_up_proj`, split here."""

    def layer_attention(self, source: SourceModel, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}."
        config = source.config
        head_dim = config.hidden_size // config.num_attention_heads  # Phi3Attention's head size
        q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        # rows of qkv_proj: queries, then keys, then values (Phi3Attention slices them so)
        q, k, v = source.tensor(prefix + "self_attn.qkv_proj.weight").split([q_dim, kv_dim, kv_dim], dim=0)
        tensors = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v}
        for name in ("self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            tensors[name] = source.tensor(prefix + name)
        return tensors

    def layer_mlp(self, source: SourceModel, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}.mlp."
        # Phi3MLP: gate, up = gate_up_proj(x).chunk(2); down_proj(up * act(gate))
        gate, up = source.tensor(prefix + "gate_up_proj.weight").chunk(2, dim=0)
        return {"gate_proj": gate, "up_proj": up, "down_proj": source.tensor(prefix + "down_proj.weight")}

    def unsupported_setting(self, config) -> str | None:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        partial = rope.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            return f"its rotary embedding covers only part of each head (partial_rotary_factor={partial}, as in Phi-4-mini), while Mixtral rotates whole heads"
        rope_type = rope.get("rope_type", "default")
        if rope_type == "longrope":
            return (
                "its rope_type is 'longrope' (as in Phi-3-128k and Phi-3.5-mini): once a generation passes "
                f"original_max_position_embeddings={rope.get('original_max_position_embeddings')}, Phi-3 recomputes the "
                "KV cache with the long factors and Mixtral does not, so cached generation would differ from the base"
            )
        if rope_type != "default":
            return f"its rope_type is {rope_type!r}; Phi-3 defines only 'default' and 'longrope'"
        for key in ("resid_pdrop", "embd_pdrop"):
            if getattr(config, key, 0.0):
                return f"it uses {key}={getattr(config, key)} (dropout during training) where Mixtral has no dropout"
        return None


LLAMA = DenseFamily("llama", ("LlamaForCausalLM",))
MISTRAL = DenseFamily("mistral", ("MistralForCausalLM",))
PHI3 = Phi3Family("phi3", ("Phi3ForCausalLM",))

FAMILIES: list[DenseFamily] = [LLAMA, MISTRAL, PHI3]


def family_of(source: SourceModel) -> DenseFamily | None:
    for family in FAMILIES:
        if source.architecture in family.architectures:
            return family
    return None
