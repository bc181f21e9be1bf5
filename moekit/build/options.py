"""`BuildOptions`: the settings of `moekit build` besides the recipe and OUT (no torch: `moekit build --help` reads them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moekit.units import parse_size

DEFAULT_GATE_BATCH_SIZE = 8  # prompts per batch: with the layer's weights, one batch's activations set the pass's peak memory


class BuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device for the gate forward passes (auto: cuda when available).")
    gate_batch_size: int = Field(
        default=DEFAULT_GATE_BATCH_SIZE,
        ge=1,
        description="Prompts (or calibration chunks) run through the base model together in the gate pass; lower it if memory is short.",
    )
    gate_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="Dtype of the gate pass's forward through the base model. Router maths "
        "is float32 either way; float32 gives the same routers on CPU and GPU.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="Output dtype [default: the recipe's, else the base model's].")
    shard_size: int = Field(default=2 * 10**9, description="Largest safetensors shard, e.g. 2GB or 500MB [default: 2GB].")
    allow_same_experts: bool = Field(default=False, description="Allow every expert to be the same model (only useful before training).")
    allow_pickle: bool = Field(default=False, description="Read checkpoints that exist only as pickle .bin files (pickles can run code).")
    trust_remote_code: bool = Field(default=False, description="Allow custom model code from the sources' repositories.")
    overwrite: bool = Field(default=False, description="Replace OUT if it exists and is not empty.")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_shard_size(cls, value):
        return parse_size(value)
