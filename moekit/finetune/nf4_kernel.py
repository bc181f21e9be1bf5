"""NF4 dequantization of a whole expert projection in one GPU launch (Triton).

bitsandbytes' `dequantize_4bit` on a double-quantized tensor launches three kernels (the nested absmax, its
offset, the 4-bit codes) and writes a float32 absmax tensor in between. Here one kernel reads the packed bytes,
the 8-bit absmax and its nested statistics, and writes the dequantized weights, with the same float32 products
in the same order as bitsandbytes (products rounded before the offset is added), so the result is bit-identical.

A row range of every expert (`rows=(start, end)` of an (experts, out, in) weight) is dequantized the same way into
(experts, end - start, in): the training step dequantizes a large projection in such slices, so that no more than a
slice is ever held in 16 bits.

`available(tensor)` says whether the kernel can run (CUDA and Triton present); elsewhere moekit uses bitsandbytes.
"""

from __future__ import annotations

import os

import torch

NF4_BLOCKSIZE = 64  # weights per absmax, as moekit quantizes them
BYTES_PER_PROGRAM = 2048  # 4,096 weights per program


try:  # module-level kernels: torch.compile re-compiles user Triton kernels and must find what they call
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":

    @triton.jit
    def _mul_rn(a, b):
        return a * b  # Triton's CPU interpreter (the CI's kernel tests) computes with numpy, which never contracts

elif triton is not None:

    @triton.jit
    def _mul_rn(a, b):
        # an explicit round-to-nearest product: the compiler may not contract it with the following add into an
        # FMA, which would round differently from bitsandbytes' separate kernels
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


if triton is not None:

    @triton.jit
    def dequantize_nf4_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                              slice_bytes, expert_bytes, start_bytes, programs_per_slice, out_row_stride,
                              BLOCK: tl.constexpr, BYTES_PER_ABSMAX: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                              IN_FEATURES: tl.constexpr, STRIDED: tl.constexpr):  # fmt: skip
        # the same slice of every expert: output bytes [e * slice, (e + 1) * slice) come from expert e's bytes
        # [start, start + slice); a whole tensor is one slice of one expert. Each program stays inside one slice,
        # so the mapping is scalar arithmetic, not a 64-bit division per byte
        program = tl.program_id(0).to(tl.int64)
        expert = program // programs_per_slice
        first = (program - expert * programs_per_slice) * BLOCK  # the program's first byte within the slice
        local = first + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = local < slice_bytes
        byte_index = expert * expert_bytes + start_bytes + local
        packed = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
        block = byte_index // BYTES_PER_ABSMAX  # one absmax per 64 weights = 32 bytes
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = _mul_rn(tl.load(nested_code_ptr + absmax_code), nested) + tl.load(offset_ptr)
        high = _mul_rn(tl.load(code_ptr + (packed >> 4)), absmax)  # the first weight of a byte is its high nibble
        low = _mul_rn(tl.load(code_ptr + (packed & 15)), absmax)
        values = tl.reshape(tl.join(high, low), [2 * BLOCK])  # (2 * BLOCK,): high, low, high, low, ...
        out_local = 2 * first + tl.arange(0, 2 * BLOCK)  # (2 * BLOCK,) weights of the slice
        if STRIDED:  # rows of IN_FEATURES weights, out_row_stride apart (the first columns of a wider tensor)
            row = expert * (2 * slice_bytes // IN_FEATURES) + out_local // IN_FEATURES
            out_index = row * out_row_stride + out_local % IN_FEATURES
        else:
            out_index = 2 * expert * slice_bytes + out_local
        tl.store(out_ptr + out_index, values.to(out_ptr.dtype.element_ty), mask=out_local < 2 * slice_bytes)


def available(packed: torch.Tensor) -> bool:
    return packed.device.type == "cuda" and triton is not None


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                   offset: torch.Tensor, code: torch.Tensor, *, blocksize: int, nested_blocksize: int,
                   shape: tuple[int, int, int], rows: tuple[int, int] | None = None, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The (experts, out, in) weight `shape` in `dtype` from bitsandbytes' NF4 bytes `packed` (numel / 2 uint8) with
    double-quantized absmax; only rows [start, end) of every expert if `rows` is given: (experts, end - start, in).
    `out`: write into this (experts, end - start, in) tensor instead, whose rows may be further apart than `in`
    (the first `in` columns of a wider tensor)."""
    experts, out_features, in_features = shape
    start, end = rows or (0, out_features)
    if not 0 <= start < end <= out_features or (start * in_features) % blocksize:
        raise ValueError(f"rows {start}:{end} of {shape} do not start on a block of {blocksize} weights")
    if out is None:
        out = torch.empty((experts, end - start, in_features), dtype=dtype, device=packed.device)
    elif out.shape != (experts, end - start, in_features) or out.stride(2) != 1 or out.stride(0) != (end - start) * out.stride(1):
        raise ValueError(f"out {tuple(out.shape)} with strides {out.stride()} is not (experts, rows, in) rows of a (experts, rows, any) tensor")
    strided = out.stride(1) != in_features
    if rows is None:  # all of it: one slice of one expert
        slices, slice_bytes, expert_bytes = 1, out.numel() // 2, 0
    else:
        slices, slice_bytes, expert_bytes = experts, (end - start) * in_features // 2, out_features * in_features // 2
    programs_per_slice = triton.cdiv(slice_bytes, BYTES_PER_PROGRAM)
    dequantize_nf4_kernel[(slices * programs_per_slice,)](
        packed, absmax, nested_absmax, nested_code, offset.reshape(1).float(), code, out,
        slice_bytes, expert_bytes, start * in_features // 2, programs_per_slice, out.stride(1),
        BLOCK=BYTES_PER_PROGRAM, BYTES_PER_ABSMAX=blocksize // 2, NESTED_BLOCKSIZE=nested_blocksize,
        IN_FEATURES=in_features, STRIDED=strided,
    )  # fmt: skip
    return out
