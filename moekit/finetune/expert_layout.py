"""The expert block's layout and the rule for when it runs grouped, without torch (so `moekit plan` can ask cheaply).

`experts.ExpertBlock` stores `projection_shapes` and picks its path with `runs_grouped` at every forward;
`moekit plan` asks the same two functions about the GPU it plans for.
"""

from __future__ import annotations

# family -> (first projection, second projection); the first is gated (gate rows, then up rows) for Mixtral
PROJECTIONS = {"mixtral": ("gate_up_proj", "down_proj"), "phixtral": ("fc1", "fc2")}
GATED = {"mixtral": True, "phixtral": False}
BIASED = {"mixtral": False, "phixtral": True}  # Phixtral's fc1/fc2 have biases
# grouped GEMMs (torch.nn.functional.grouped_mm) need rows aligned to 16 bytes
GROUPED_ALIGNMENT_BYTES = 16
# a projection dequantized in row slices: never fewer rows (of every expert) than this; slices start on whole NF4
# blocks and on 16-byte aligned columns of the GEMMs
SLICE_ROWS = 64
# where torch has grouped GEMM kernels: CUDA for bf16 on sm80+, the CPU from torch 2.11
GROUPED_CUDA_CAPABILITY = (8, 0)
GROUPED_CPU_TORCH = (2, 11)


def projection_shapes(family: str, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Projection name -> (out, in) of one expert, as the block stores them: one (experts, out, in) tensor each."""
    first, second = PROJECTIONS[family]
    return {first: ((2 if GATED[family] else 1) * intermediate, hidden), second: (hidden, intermediate)}


def grouped_gemm_fits(dims, element_size: int) -> bool:
    """Whether weights with these (out, in) sizes can run as grouped GEMMs at `element_size` bytes per value
    (LoRA ranks are padded to fit, so they do not count)."""
    align = GROUPED_ALIGNMENT_BYTES // element_size
    return all(size % align == 0 for size in dims)


def runs_grouped(
    dims, element_size: int, device_type: str, *, bf16: bool, cuda_capability: tuple[int, int] | None = None, torch_version: tuple[int, int] = (0, 0)
) -> bool:
    """Whether an expert block whose projections have these (out, in) sizes runs torch's grouped GEMMs (a torch
    that has `grouped_mm`) for inputs of `element_size` bytes (`bf16` or not) on `device_type`; else it runs
    expert by expert. Any --bits: 4-, 8- and 16-bit storage all dequantize a whole projection at once."""
    if not grouped_gemm_fits(dims, element_size):
        return False
    if device_type == "cuda":
        return bf16 and cuda_capability is not None and cuda_capability >= GROUPED_CUDA_CAPABILITY
    return torch_version >= GROUPED_CPU_TORCH
