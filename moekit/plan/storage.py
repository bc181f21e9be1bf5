"""Bytes of what is stored: weights as the trainer quantizes them, and optimizer states (bitsandbytes 0.50,
`functional.quantize_4bit` / `quantize_blockwise`, and its 8-bit optimizers)."""

from __future__ import annotations

from moekit.plan.shape import Linear

NF4_BLOCKSIZE = 64  # values per absmax of the 4-bit weights
NESTED_BLOCKSIZE = 256  # 8-bit absmax values per fp32 absmax of the double quantization
# per 4-bit tensor besides the packed values and absmax: the 8-bit code of the nested state (256 fp32),
# its mean offset (1 fp32) and the NF4 code (16 fp32), each its own tensor
NF4_FIXED_BYTES = 256 * 4 + 4 + 16 * 4
ADAM8BIT_BLOCKSIZE = 256  # values per fp32 absmax of bitsandbytes' blockwise 8-bit optimizer states
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep fp32 states (min_8bit_size)
PAGED_MIN_SIZE = 100_000  # paged optimizers page only tensors at least this large (get_state_buffer)

# --- what the moekit trainer does ------------------------------------------------------------------------
COMPUTE_BYTES = 2  # bf16 compute; embeddings, lm_head, norms and routers stay in bf16 (quantize_moe)
ROUTER_BYTES = COMPUTE_BYTES  # routers are not quantized and are trained in full in the compute dtype
LORA_BYTES = 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype); the trainer keeps them so


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes allocates for one NF4 tensor with double quantization (uint8 storage)."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return (numel + 1) // 2 + blocks + 4 * nested_blocks + NF4_FIXED_BYTES


def weight_bytes(linear: Linear, bits: int) -> tuple[int, int]:
    """(bytes of the stored values, bytes of the quantization constants) of one linear layer's weight + bias."""
    bias = linear.out_features * COMPUTE_BYTES if linear.bias else 0
    if bits == 4:
        packed = (linear.weight_numel + 1) // 2
        return packed + bias, nf4_bytes(linear.weight_numel) - packed
    if bits == 8:
        return linear.weight_numel + bias, 4 * linear.out_features
    return linear.weight_numel * COMPUTE_BYTES + bias, 0


def optimizer_state_bytes(numels: list[int], param_bytes: int, optimizer: str) -> tuple[int, int]:
    """(state bytes in the allocator, paged state bytes) of the optimizer for tensors of these sizes."""
    if optimizer == "sgd":
        return 0, 0
    if optimizer == "adamw_torch":
        return sum(2 * n * param_bytes for n in numels), 0
    allocated = paged = 0
    for n in numels:
        if n < ADAM8BIT_MIN_SIZE:
            state = 2 * 4 * n
        else:
            state = 2 * n + 2 * 4 * -(-n // ADAM8BIT_BLOCKSIZE)
        if optimizer == "paged_adamw_8bit" and n >= PAGED_MIN_SIZE:
            paged += 2 * n  # the 8-bit values are paged; their absmax stay in the allocator
            allocated += state - 2 * n
        else:
            allocated += state
    return allocated, paged
