"""A grouped GEMM that reads the experts' NF4 weights itself (Triton): no dequantized copy of a projection is written.

    outputs = nf4_grouped_mm(inputs, storage, offsets)                    # (rows, out): rows of expert e @ W_e^T
    outputs = nf4_grouped_mm(inputs, storage, offsets, hidden=h, scaled_b=sb)     # + h_e @ sB_e^T (LoRA, folded in)
    grad_inputs = nf4_grouped_mm(grad_outputs, storage, offsets, transposed=True)  # (rows, in): rows of e @ W_e

The dequantize-then-GEMM path writes each (experts, out, in) projection in 16 bits three times a step (forward,
recomputation, backward) and reads it back in the GEMM: about 50 ms of a 4x7B step, and up to a GiB held while it
runs. Here each program computes one (BLOCK_M, BLOCK_N) tile of one expert's rows: it loads the packed bytes of the
weight tiles it needs, dequantizes them in registers with bitsandbytes' products (the same weights, bit for bit, as
`nf4_kernel`), and accumulates in float32 on the tensor cores. A LoRA up-projection is one more step of the same
accumulation (h = x A_e^T (rows, r) against alpha / r * B_e (out, r)), so its (rows, out) product is never written.

Rows are grouped by expert as for `torch.nn.functional.grouped_mm`: `offsets` holds each expert's cumulative end
row (int32, on the device). The launch grid has a fixed size (every expert's tiles fit in cdiv(rows, BLOCK_M) +
experts row tiles), so nothing is read on the host and a CUDA graph can replay it; a program past the last
expert's tiles returns at once.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from moekit.finetune.nf4_kernel import NF4_BLOCKSIZE, triton

if triton is not None:
    import triton.language as tl

    from moekit.finetune.nf4_kernel import _mul_rn


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # compute out^T = W @ x^T: the dequantized weight is the tensor cores' first operand, which sm90 reads from
    # registers, instead of the second, which it reads from shared memory
    swap_ab: bool = False
    # launch the row tiles of one column of the output next to each other, so that the programs running together
    # share weight tiles (read once from memory, then from L2) instead of row tiles
    rows_first: bool = False


# per direction, the fastest of benchmarks/nf4_grouped_mm.py's sweep on an H200 (4x7B projections, 4,096 rows). The
# weight goes first in both: sm90 then reads the dequantized tile from registers rather than from shared memory
# (x @ W^T: 435 against 339 TFLOP/s; 444 with the row tiles launched first). For dy @ W a 64-row weight tile on 4
# warps leaves room for two programs per SM, one dequantizing while the other multiplies (331 against 304 TFLOP/s
# for the best weight-second tile)
CONFIGS = {
    False: KernelConfig(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, swap_ab=True, rows_first=True),  # x @ W^T
    True: KernelConfig(block_m=256, block_n=64, block_k=64, num_warps=4, num_stages=3, swap_ab=True),  # dy @ W
}
# calls per direction from Python (a replayed CUDA graph repeats its launches without counting them): which GEMMs ran
launches: Counter = Counter()


if triton is not None:

    @triton.jit
    def _dequantize_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codes, first_weight, rows, col_start,
                         ROWS: tl.constexpr, COLS: tl.constexpr, IN_FEATURES: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
        # weights [rows, col_start : col_start + COLS) of one expert's (out, in) matrix, `first_weight` its flat
        # index: (ROWS, COLS) float32. COLS is whole absmax blocks of 64 weights = 32 bytes, col_start on one
        start = first_weight + rows.to(tl.int64)[:, None] * IN_FEATURES + col_start  # (ROWS, 1) first weight of each row
        row_bytes = start // 2 + tl.arange(0, COLS // 2)[None, :]  # (ROWS, COLS / 2), contiguous: vector loads
        packed = tl.reshape(tl.load(packed_ptr + row_bytes), [ROWS, COLS // 64, 32]).to(tl.int32)  # (ROWS, COLS / 64, 32)
        block = start // 64 + tl.arange(0, COLS // 64)[None, :]  # (ROWS, COLS / 64)
        absmax = _mul_rn(tl.load(nested_code_ptr + tl.load(absmax_ptr + block).to(tl.int32)), tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE))
        absmax = tl.broadcast_to(tl.reshape(absmax + offset, [ROWS, COLS // 64, 1]), [ROWS, COLS // 64, 32])
        # codes: the 16 float32 NF4 values in registers; tl.gather looks them up through shared memory (one load per
        # weight; a gather from global memory took three instructions: address, async copy, shared load)
        flat = tl.reshape(packed, [ROWS * COLS // 2])
        high = _mul_rn(tl.reshape(tl.gather(codes, flat >> 4, 0), [ROWS, COLS // 64, 32]), absmax)
        low = _mul_rn(tl.reshape(tl.gather(codes, flat & 15, 0), [ROWS, COLS // 64, 32]), absmax)
        return tl.reshape(tl.join(high, low), [ROWS, COLS])  # high, low, high, low, ... along each row

    @triton.jit
    def nf4_grouped_mm_kernel(inputs_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, offsets_ptr,
                              hidden_ptr, scaled_b_ptr, out_ptr, inputs_row_stride, hidden_row_stride, out_row_stride,
                              EXPERTS: tl.constexpr, OUT_FEATURES: tl.constexpr, IN_FEATURES: tl.constexpr, TRANSPOSED: tl.constexpr,
                              LORA_RANK: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, SWAP_AB: tl.constexpr, ROWS_FIRST: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # not TRANSPOSED: out = inputs @ W_e^T, reducing over IN_FEATURES; TRANSPOSED: out = inputs @ W_e, over OUT_FEATURES
        tile_n = tl.program_id(1 if ROWS_FIRST else 0)
        tile_m = tl.program_id(0 if ROWS_FIRST else 1)
        # which expert's rows this row tile covers: experts' tiles follow each other, each expert's start on a tile
        expert, row_start, row_end = -1, 0, 0
        tiles_before, start = 0, 0
        for candidate in tl.static_range(EXPERTS):
            end = tl.load(offsets_ptr + candidate)
            tiles = tl.cdiv(end - start, BLOCK_M)
            mine = (tile_m >= tiles_before) & (tile_m < tiles_before + tiles)
            expert = tl.where(mine, candidate, expert)
            row_start = tl.where(mine, start + (tile_m - tiles_before) * BLOCK_M, row_start)
            row_end = tl.where(mine, end, row_end)
            tiles_before += tiles
            start = end
        if expert < 0:  # the grid's spare row tiles
            return
        reduced: tl.constexpr = OUT_FEATURES if TRANSPOSED else IN_FEATURES
        produced: tl.constexpr = IN_FEATURES if TRANSPOSED else OUT_FEATURES
        first_weight = expert.to(tl.int64) * OUT_FEATURES * IN_FEATURES
        offset = tl.load(offset_ptr)
        codes = tl.load(code_ptr + tl.arange(0, 16))  # (16,) the NF4 code book
        rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_mask = rows < row_end
        columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) of the output
        # (BLOCK_M, BLOCK_N), or its transpose with SWAP_AB
        accumulator = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, reduced, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            inputs = tl.load(inputs_ptr + rows.to(tl.int64)[:, None] * inputs_row_stride + ks[None, :], mask=row_mask[:, None], other=0.0)
            if TRANSPOSED:  # weight rows ks (out), columns of this tile (in): (BLOCK_K, BLOCK_N)
                weight = _dequantize_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codes, first_weight, ks,
                                          tile_n * BLOCK_N, BLOCK_K, BLOCK_N, IN_FEATURES, NESTED_BLOCKSIZE)  # fmt: skip
                weight_t = tl.trans(weight.to(inputs.dtype))  # (BLOCK_N, BLOCK_K)
            else:  # weight rows of this tile (out), columns ks (in): (BLOCK_N, BLOCK_K)
                weight_t = _dequantize_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codes, first_weight,
                                            columns, k, BLOCK_N, BLOCK_K, IN_FEATURES, NESTED_BLOCKSIZE).to(inputs.dtype)  # fmt: skip
            if SWAP_AB:
                accumulator = tl.dot(weight_t, tl.trans(inputs), accumulator)
            else:
                accumulator = tl.dot(inputs, tl.trans(weight_t), accumulator)
        if LORA_RANK > 0:  # + h_e @ (s B_e)^T: hidden (rows, r), scaled_b (experts, out, r)
            ranks = tl.arange(0, LORA_RANK)
            hidden = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * hidden_row_stride + ranks[None, :], mask=row_mask[:, None], other=0.0)
            scaled_b = tl.load(scaled_b_ptr + (expert.to(tl.int64) * OUT_FEATURES + columns)[:, None] * LORA_RANK + ranks[None, :])
            if SWAP_AB:
                accumulator = tl.dot(scaled_b, tl.trans(hidden), accumulator)  # (BLOCK_N, BLOCK_M)
            else:
                accumulator = tl.dot(hidden, tl.trans(scaled_b), accumulator)  # (BLOCK_M, BLOCK_N)
        mask = row_mask[:, None] & (columns < produced)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + columns[None, :]
        if SWAP_AB:
            tl.store(tl.trans(out), accumulator.to(out_ptr.dtype.element_ty), mask=tl.trans(mask))
        else:
            tl.store(out, accumulator.to(out_ptr.dtype.element_ty), mask=mask)


def supports(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernel runs for an (experts, out, in) NF4 projection and inputs of `dtype` on `device`: CUDA (or
    Triton's interpreter), 16-bit inputs on CUDA, and dimensions in whole tiles both ways."""
    if triton is None or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return False
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        return False
    return all(fits(shape, transposed, config) for transposed, config in CONFIGS.items())


def fits(shape: tuple[int, int, int], transposed: bool, config: KernelConfig) -> bool:
    """Whether `config` tiles the projection without tails: the reduction in whole BLOCK_K steps, the output in
    whole BLOCK_N columns, and the weight tiles (BLOCK_K or BLOCK_N along `in`) in whole absmax blocks."""
    _, out_features, in_features = shape
    reduced, produced = (out_features, in_features) if transposed else (in_features, out_features)
    along_in = config.block_n if transposed else config.block_k
    return reduced % config.block_k == 0 and produced % config.block_n == 0 and along_in % NF4_BLOCKSIZE == 0


def nf4_grouped_mm(inputs: torch.Tensor, storage, offsets: torch.Tensor, transposed: bool = False, config: KernelConfig | None = None,
                   hidden: torch.Tensor | None = None, scaled_b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(rows, in) -> (rows, out) = rows of expert e @ W_e^T [+ hidden rows of e @ scaled_b_e^T, with hidden (rows, r)
    and scaled_b (experts, out, r)]; `transposed`: (rows, out) -> (rows, in) = rows of e @ W_e. `storage` is an
    `NF4Storage` (experts, out, in); rows beyond offsets[-1] are left unwritten."""
    experts, out_features, in_features = storage.shape
    config = config or CONFIGS[transposed]
    rows = inputs.shape[0]
    reduced, produced = (out_features, in_features) if transposed else (in_features, out_features)
    inputs = inputs if inputs.stride(1) == 1 else inputs.contiguous()  # rows may be apart; their elements may not
    if inputs.shape[1] != reduced or not fits(storage.shape, transposed, config):
        raise ValueError(f"inputs {tuple(inputs.shape)} or tiles {config} do not fit the projection {storage.shape} (transposed={transposed})")
    rank = 0
    if hidden is not None:
        if transposed:
            raise ValueError("the LoRA term is added to x @ W^T only")
        # a power of two of at least 16 (tl.dot's smallest reduction), zero ranks added
        rank = max(16, triton.next_power_of_2(hidden.shape[1]))
        hidden = torch.nn.functional.pad(hidden, (0, rank - hidden.shape[1])) if rank != hidden.shape[1] else hidden.contiguous()
        scaled_b = torch.nn.functional.pad(scaled_b, (0, rank - scaled_b.shape[2])) if rank != scaled_b.shape[2] else scaled_b.contiguous()
    out = inputs.new_empty(rows, produced)
    launches["dy @ W" if transposed else "x @ W^T"] += 1
    grid = (triton.cdiv(produced, config.block_n), triton.cdiv(rows, config.block_m) + experts)
    grid = grid[::-1] if config.rows_first else grid
    nf4_grouped_mm_kernel[grid](
        inputs, storage._packed(), storage.absmax, storage.nested_absmax, storage.nested_code, storage.offset.reshape(1).float(), storage.code,
        offsets, hidden if hidden is not None else inputs, scaled_b if scaled_b is not None else inputs, out,
        inputs.stride(0), hidden.stride(0) if hidden is not None else 0, out.stride(0),
        EXPERTS=experts, OUT_FEATURES=out_features, IN_FEATURES=in_features, TRANSPOSED=transposed, LORA_RANK=rank,
        NESTED_BLOCKSIZE=storage.nested_blocksize, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SWAP_AB=config.swap_ab, ROWS_FIRST=config.rows_first, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
