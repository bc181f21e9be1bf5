"""What an output architecture is: a small base class, one subclass per file (cf. mergekit's moe/arch.py).

Unlike mergekit, `supports` returns the reason an input cannot be built (or None), and problems
raise typed errors instead of logging and exiting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.build.families import DenseFamily
from moekit.build.sources import SourceModel
from moekit.recipe import Recipe


@dataclass
class BuildInputs:
    recipe: Recipe
    base: SourceModel
    experts: list[SourceModel]  # in recipe order
    family: DenseFamily | None  # None when no known family reads the base
    dtype: torch.dtype
    shared_experts: list[SourceModel] = field(default_factory=list)  # in recipe order


@dataclass
class PlannedTensor:
    """One output tensor: its name and shape, where it comes from, and how to make it."""

    name: str
    shape: tuple[int, ...]
    source: str  # e.g. "base", "expert 2 (org/model)", "router (calibrated)"
    load: Callable[[], torch.Tensor]


def decoder_config_fields(base) -> dict:
    """The fields a Llama-like output config copies from the dense base config (attention, norms, rope, tokens)."""
    return dict(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=getattr(base, "num_key_value_heads", None) or base.num_attention_heads,
        hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings,
        initializer_range=getattr(base, "initializer_range", 0.02),
        rms_norm_eps=base.rms_norm_eps,
        pad_token_id=base.pad_token_id,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
        attention_dropout=getattr(base, "attention_dropout", 0.0) or 0.0,
        rope_parameters=dict(base.rope_parameters) if getattr(base, "rope_parameters", None) else None,
    )


class OutputArchitecture(ABC):
    name: str

    @property
    @abstractmethod
    def input_architectures(self) -> tuple[str, ...]:
        """The transformers architectures this output can be built from (for error messages)."""

    @abstractmethod
    def supports(self, inputs: BuildInputs) -> str | None:
        """None if these inputs can be written exactly in this architecture, else the reason why not."""

    @abstractmethod
    def output_config(self, inputs: BuildInputs):
        """The transformers config of the output model."""

    @abstractmethod
    def tensors(self, inputs: BuildInputs, routers: Callable[[int], torch.Tensor]) -> Iterator[PlannedTensor]:
        """Every output tensor, in write order; `routers(layer)` gives that layer's (experts, hidden) router,
        followed by one row per shared expert where the recipe has them."""

    def write_extra_files(self, out: Path) -> None:
        """Files besides config and weights (model code, for architectures transformers lacks)."""

    def active_parameters(self, config) -> tuple[int, int]:
        """(total, active per token) parameter counts of the output model, from its config alone."""
        raise NotImplementedError
