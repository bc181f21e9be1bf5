"""NF4 dequantization of a whole expert projection in one GPU launch (Triton).

bitsandbytes' `dequantize_4bit` on a double-quantized tensor launches three kernels (the nested absmax, its
offset, the 4-bit codes) and writes a float32 absmax tensor in between. Here one kernel reads the packed bytes,
the 8-bit absmax and its nested statistics, and writes the dequantized weights, with the same float32 products
in the same order as bitsandbytes (products rounded before the offset is added), so the result is bit-identical.

`available(tensor)` says whether the kernel can run (CUDA and Triton present); elsewhere moekit uses bitsandbytes.
"""

from __future__ import annotations

import functools

import torch

BYTES_PER_PROGRAM = 2048  # 4,096 weights per program


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _mul_rn(a, b):
        # an explicit round-to-nearest product: the compiler may not contract it with the following add into an
        # FMA, which would round differently from bitsandbytes' separate kernels
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def dequantize_nf4(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr, num_bytes,
                       BLOCK: tl.constexpr, BYTES_PER_ABSMAX: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
        byte_index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = byte_index < num_bytes
        packed = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
        block = byte_index // BYTES_PER_ABSMAX  # one absmax per 64 weights = 32 bytes
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = _mul_rn(tl.load(nested_code_ptr + absmax_code), nested) + tl.load(offset_ptr)
        high = _mul_rn(tl.load(code_ptr + (packed >> 4)), absmax)  # the first weight of a byte is its high nibble
        low = _mul_rn(tl.load(code_ptr + (packed & 15)), absmax)
        values = tl.reshape(tl.join(high, low), [2 * BLOCK])  # (2 * BLOCK,): high, low, high, low, ...
        out_index = 2 * tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_index, values.to(out_ptr.dtype.element_ty), mask=out_index < 2 * num_bytes)

    return triton, dequantize_nf4


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(packed: torch.Tensor) -> bool:
    return packed.device.type == "cuda" and _triton_installed()


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                   offset: torch.Tensor, code: torch.Tensor, *, blocksize: int, nested_blocksize: int, numel: int,
                   dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """(numel,) weights in `dtype` from bitsandbytes' NF4 bytes `packed` (numel / 2 uint8) with double-quantized absmax."""
    triton, kernel = _kernel()
    num_bytes = numel // 2
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(num_bytes, BYTES_PER_PROGRAM),)
    kernel[grid](packed, absmax, nested_absmax, nested_code, offset.reshape(1).float(), code, out, num_bytes,
                 BLOCK=BYTES_PER_PROGRAM, BYTES_PER_ABSMAX=blocksize // 2, NESTED_BLOCKSIZE=nested_blocksize)  # fmt: skip
    return out
