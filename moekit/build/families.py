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


LLAMA = DenseFamily("llama", ("LlamaForCausalLM",))
MISTRAL = DenseFamily("mistral", ("MistralForCausalLM",))

FAMILIES: list[DenseFamily] = [LLAMA, MISTRAL]


def family_of(source: SourceModel) -> DenseFamily | None:
    for family in FAMILIES:
        if source.architecture in family.architectures:
            return family
    return None


def supported_input_architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.architectures]
