"""`moekit plan`: the memory plan of a fine-tune, from the model's config alone: will it fit, and with which settings?

`estimate(config_or_path, options)` counts, for the settings of `moekit finetune` (`TrainingOptions`):

- weights by part (attention, experts, routers, embeddings/lm_head, norms) at the precision the trainer
  loads them in: NF4 with double quantization for every linear layer (experts included, one 4-bit tensor
  per projection of all experts of a layer), int8 for `--bits 8`, bf16 for `--bits 16`; routers, embeddings, lm_head and norms stay
  in higher precision. The 4-bit constants are counted the way bitsandbytes stores them (below);
- trainable parameters (LoRA A/B per targeted module, expert and layer; routers in full), their
  gradients and optimizer states;
- activations: checkpointed layer inputs, one layer's recomputed activations in the backward pass (or
  every layer's without gradient checkpointing), the loss (TRL's chunked LM head: one tile of logits at a
  time rather than batch * seq * vocab fp32 logits) and the router buffers of the load-balancing loss.

The predicted peak is the largest of three moments of a training step: the loss (forward end and loss
backward), the backward pass through the last layer, and the optimizer step. It predicts what
`torch.cuda.max_memory_allocated()` reports; the memory a GPU needs adds the CUDA context and the
allocator's slack. `benchmarks/plan_accuracy.py` checks the prediction against measured peaks.

Modules: `config` (reading the model config), `shape` (ModelShape, parameter counts), `storage` (bytes per
stored tensor and optimizer state), `trainable` (the parameters a fine-tune trains), `activations`, `memory`
(the phases of a step and the peak: MemoryPlan), `fit` (what fits on a given GPU), `estimate` (all of it).
"""

from moekit.plan.config import DENSE_TYPES, KNOWN_TYPES, MOE_TYPES, load_config, missing_fields
from moekit.plan.estimate import estimate
from moekit.plan.memory import MemoryPlan, Row
from moekit.plan.shape import ModelShape, parameter_counts, shape_from_config
from moekit.plan.storage import nf4_bytes

__all__ = [
    "DENSE_TYPES",
    "KNOWN_TYPES",
    "MOE_TYPES",
    "MemoryPlan",
    "ModelShape",
    "Row",
    "estimate",
    "load_config",
    "missing_fields",
    "nf4_bytes",
    "parameter_counts",
    "shape_from_config",
]
