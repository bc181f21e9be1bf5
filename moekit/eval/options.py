"""`EvalOptions`: the settings of `moekit eval` besides MODEL and the report directory."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    against: list[str] | None = Field(default=None, description="Source model to compare with (repeatable) [default: base and experts from MODEL/moekit.json].")
    data: dict[str, str] = Field(
        default_factory=dict,
        description="Evaluation set (repeatable): text file (blank-line separated documents), .jsonl (text or messages) or hf:dataset[:split] / "
        "hf:dataset:config:split [default: each expert's positive prompts].",
    )
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task (repeatable; needs `pip install 'moekit[lm-eval]'`).")
    include_path: list[str] = Field(default_factory=list, description="Directory with local lm-eval task YAML files (repeatable).")
    adapter: str | None = Field(default=None, description="Also evaluate MODEL fine-tuned by `moekit finetune` (adapter + routers).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device to evaluate on (auto: cuda when available).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weights dtype (auto: the checkpoint's on cuda, float32 on cpu)."
    )
    load_in_4bit: bool = Field(default=False, description="Load every model with bitsandbytes NF4 weights.")
    batch_size: int = Field(default=8, ge=1, description="Documents per forward pass (and lm-eval batch size).")
    max_length: int = Field(default=1024, ge=2, description="Longest scored document in tokens (longer ones are truncated, and counted in the report).")
    limit: int | None = Field(default=None, ge=1, description="At most this many documents per set / examples per task.")
    trust_remote_code: bool = Field(default=False, description="Allow custom model code from the models' repositories.")
    overwrite: bool = Field(default=False, description="Replace REPORT_DIR if it exists and is not empty.")
