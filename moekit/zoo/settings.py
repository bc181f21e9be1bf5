"""How the zoo is made. Every field is part of the zoo's cache key, so changing one rebuilds it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Bump when the recipe changes in a way the settings below do not capture (corpora, training loop).
ZOO_VERSION = 4  # 4: a validation split, taken out of the training documents


class ZooSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(default=2048, description="Size of the byte-level BPE vocabulary learned from the domains.")
    hidden_size: int = Field(default=96, description="Hidden size of the tiny Llama models.")
    intermediate_size: int = Field(default=384, description="MLP width (the part that becomes each MoE expert).")
    num_layers: int = Field(default=3, description="Decoder layers.")
    num_heads: int = Field(default=4, description="Attention heads (no grouped-query attention).")
    seq_len: int = Field(default=128, description="Training and evaluation sequence length in tokens.")
    batch_size: int = Field(default=16, description="Sequences per training step, an equal share from each domain for the base.")
    base_steps: int = Field(default=150, description="Pretraining steps of the base model on the mixture of all domains.")
    base_learning_rate: float = Field(default=3e-3, description="Peak learning rate of pretraining.")
    expert_steps: int = Field(default=300, description="Fine-tuning steps of each expert (MLP weights only) on its own domain.")
    expert_learning_rate: float = Field(default=3e-3, description="Peak learning rate of expert fine-tuning.")
    expert_replay: float = Field(
        default=0.125, ge=0, lt=1, description="Share of each expert batch drawn from the other domains, so experts do not forget them."
    )
    heldout_blocks: int = Field(default=32, description="Held-out sequences kept per domain for evaluation.")
    seed: int = Field(default=0, description="Seed of the generated corpora, initialisation and data order.")


PRESETS: dict[str, ZooSettings] = {
    # The demo's zoo: about 5 minutes on 2 CPU cores.
    "standard": ZooSettings(),
    # A smaller, faster zoo for tests and CI; it shows the same effects less strongly.
    "quick": ZooSettings(
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        vocab_size=1024,
        seq_len=64,
        base_steps=150,
        expert_steps=300,
        expert_replay=0.25,
        heldout_blocks=32,
    ),
}
PresetName = Literal["standard", "quick"]
