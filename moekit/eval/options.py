"""`EvalOptions`: the settings of `moekit eval` besides MODEL and the report directory."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    against: list[str] | None = Field(default=None, description="Source models to compare with (paths, Hub ids, zoo:NAME); default: the build's base and experts from moekit.json.")
    data: dict[str, str] = Field(default_factory=dict, description="Evaluation sets, name -> text file, .jsonl (text or messages) or hf:dataset[:split]; default: each expert's positive prompts.")
    adapter: str | None = Field(default=None, description="A `moekit finetune` output directory whose fine-tuned MoE is evaluated as an extra model.")
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names (needs the lm-eval extra).")
    include_path: list[str] = Field(default_factory=list, description="Directories (or YAML files' folders) with local lm-eval task definitions.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device to evaluate on (auto: cuda when available).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(default="auto", description="Weights dtype (auto: the checkpoint's on cuda, float32 on cpu).")
    load_in_4bit: bool = Field(default=False, description="Load every model with bitsandbytes NF4 weights.")
    batch_size: int = Field(default=8, ge=1, description="Documents per forward pass (and lm-eval batch size).")
    max_length: int = Field(default=1024, ge=2, description="Longest scored document in tokens; longer ones are truncated (and counted in the report).")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many documents per set and examples per lm-eval task.")
    overwrite: bool = Field(default=False, description="Replace OUT if it exists and is not empty.")
    trust_remote_code: bool = Field(default=False, description="Allow custom model code from the models' repositories.")
