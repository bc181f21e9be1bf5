"""The expert block's layout and when it runs grouped, without torch (so `moekit plan` can ask cheaply).

`experts.ExpertBlock` uses these; `plan.grouped_experts` predicts from them what the block will do on a GPU.
"""

from __future__ import annotations

# family -> (first projection, second projection); the first is gated (gate rows, then up rows) for Mixtral
PROJECTIONS = {"mixtral": ("gate_up_proj", "down_proj"), "phixtral": ("fc1", "fc2")}
GATED = {"mixtral": True, "phixtral": False}
# grouped GEMMs (torch.nn.functional.grouped_mm) need rows aligned to 16 bytes
GROUPED_ALIGNMENT_BYTES = 16


def grouped_gemm_fits(dims, element_size: int) -> bool:
    """Whether weights with these (out, in) sizes can run as grouped GEMMs at `element_size` bytes per value
    (LoRA ranks are padded to fit, so they do not count)."""
    align = GROUPED_ALIGNMENT_BYTES // element_size
    return all(size % align == 0 for size in dims)


def grouped_on_gpu(family: str | None, dims, bits: int) -> bool:
    """What an `ExpertBlock` of `family` does on a CUDA GPU (sm80+, bf16 compute) at any --bits: grouped
    GEMMs when the projection sizes are aligned. `family` None (no expert block) is never grouped."""
    del bits  # 4-, 8- and 16-bit storage all dequantize the whole projection at once
    return family in PROJECTIONS and grouped_gemm_fits(dims, element_size=2)
