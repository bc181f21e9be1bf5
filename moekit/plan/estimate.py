"""`estimate()`: the memory plan of a fine-tune from a model reference or config, fitted to a GPU if given."""

from __future__ import annotations

from pathlib import Path

from moekit.errors import PlanError
from moekit.finetune.options import TrainingOptions
from moekit.plan.config import load_config
from moekit.plan.fit import fit
from moekit.plan.memory import MemoryPlan, plan_memory
from moekit.plan.shape import shape_from_config


def estimate(config_or_path, options: TrainingOptions | None = None, *, gpu_memory: int | None = None) -> MemoryPlan:
    """Memory plan of fine-tuning the model of `config_or_path` with `options`, from its config only.

    `config_or_path`: a transformers config, a config dict, a model directory, a config.json, a Hub id or
    zoo:NAME. With `gpu_memory` (bytes), the plan says whether it fits, the largest batch size and
    sequence length that fit, and which setting to change first.
    """
    options = options or TrainingOptions()
    config = load_config(config_or_path)
    name = config_or_path if isinstance(config_or_path, (str, Path)) else getattr(config, "_name_or_path", "") or config.model_type
    shape = shape_from_config(config)
    capped = shape.max_positions and options.max_seq_len > shape.max_positions and "max_seq_len" not in options.model_fields_set
    if capped:  # the default length, not the user's: plan for the longest the model takes rather than refuse
        default = options.max_seq_len
        options = options.model_copy(update={"max_seq_len": shape.max_positions})
    plan = plan_memory(shape, options, str(name))
    if capped:
        plan.notes.insert(
            0,
            f"sequence length capped at the model's max_position_embeddings ({shape.max_positions}; the default "
            f"--max-seq-len is {default}): pass --max-seq-len {shape.max_positions} to moekit finetune as well",
        )
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise PlanError(f"GPU memory must be positive, got {gpu_memory} bytes")
        fit(plan, gpu_memory)
    return plan
