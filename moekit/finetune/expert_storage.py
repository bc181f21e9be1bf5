"""Frozen storage of one projection of all experts of a layer: one tensor (experts, out, in) at 4, 8 or 16 bits.

    storage = quantize_tensor(weight, bits=4, compute_dtype=torch.bfloat16, quant_storage=torch.uint8, device="cuda")
    storage.dequantize()  # (experts, out, in) in compute_dtype, one dequantization for all experts
    storage.dequantize(rows=(0, 512))  # (experts, 512, in): the same rows of every expert

4-bit is NF4 with double-quantized absmax (bitsandbytes' functional API on the whole stacked tensor), 8-bit is
LLM.int8's row-wise absmax quantization, 16-bit the tensor itself. The packed tensor is a frozen parameter (so
FSDP shards it, and a bf16 `quant_storage` lets FSDP flatten it with bf16 parameters); the quantization constants
are buffers. Dequantization reads the packed parameter through whatever tensor the module holds right now (under
FSDP with `use_orig_params` a plain view of the flat parameter), never through its class.

These modules never call bitsandbytes' `Linear4bit.forward`, which on a CPU with avx512_bf16 repacks the weight in
place at its first call; the packed bytes here are only ever read by `dequantize_4bit`, so dequantizing after a
forward gives the same weights as before it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.finetune import nf4_grouped_mm, nf4_kernel
from moekit.finetune.nf4_kernel import NF4_BLOCKSIZE


class ExpertStorage(nn.Module):
    """Base: `shape` (experts, out, in) of the stored weight, `dequantize(dtype, rows)` -> that tensor, or rows
    [start, end) of every expert of it."""

    bits: int
    # whether `dequantize` writes a new tensor (quantized storage), rather than returning the weight itself
    materializes = True

    def __init__(self, shape: tuple[int, ...], compute_dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(shape)
        self.compute_dtype = compute_dtype

    def dequantize(self, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_into(self, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Write `dequantize(out.dtype, rows)` into `out`, which may be the first columns of a wider tensor."""
        out.copy_(self.dequantize(out.dtype, rows))

    def dequantizes_into_strided(self) -> bool:
        """Whether `dequantize_into` writes a wider tensor's columns directly (else it dequantizes, then copies)."""
        return False

    def multiplies_grouped(self, inputs: torch.Tensor) -> bool:
        """Whether `grouped_matmul` runs for `inputs` (a GEMM that reads the stored weight itself); else the caller
        dequantizes and uses a grouped GEMM."""
        return False

    def can_multiply_grouped(self, inputs: torch.Tensor) -> bool:
        """Whether `grouped_matmul` could run for `inputs`, asked for or not (a call short of memory asks for it)."""
        return False

    def grouped_matmul(self, inputs: torch.Tensor, offsets: torch.Tensor, transposed: bool = False, hidden=None, scaled_b=None) -> torch.Tensor:
        """Rows of expert e (grouped by `offsets`, cumulative int32) @ W_e^T, or @ W_e if `transposed`; plus the LoRA
        term hidden_e @ scaled_b_e^T where given ((rows, r) and (experts, out, r))."""
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}"


class DenseStorage(ExpertStorage):
    bits = 16
    materializes = False

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, device):
        super().__init__(weight.shape, compute_dtype)
        # a copy: a slice or view of a bigger tensor would otherwise keep it alive
        self.weight = nn.Parameter(weight.detach().to(device=device, dtype=compute_dtype, copy=True), requires_grad=False)

    def dequantize(self, dtype=None, rows=None):
        weight = self.weight.view(self.shape)
        if rows is not None:
            weight = weight[:, rows[0] : rows[1]]
        return weight.to(dtype or self.compute_dtype)


class NF4Storage(ExpertStorage):
    bits = 4
    # on CUDA with Triton installed: one fused launch per dequantization (`nf4_kernel`), bit-identical to bitsandbytes
    use_triton_kernel = True
    # the grouped GEMM reads the packed weight itself (`nf4_grouped_mm`): no dequantized projection is written. Off by
    # default: about 440 TFLOP/s against torch's grouped GEMM's 610 on dequantized weights (H200), so it trades speed
    # for memory; `moekit finetune --nf4-gemm` turns it on per storage (`read_nf4_in_gemms`)
    use_grouped_mm_kernel = False

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, quant_storage: torch.dtype, device):
        import bitsandbytes as bnb

        super().__init__(weight.shape, compute_dtype)
        # quantized on `device` (bitsandbytes' kernel there), one tensor for all experts
        packed, state = bnb.functional.quantize_4bit(
            weight.detach().to(device=device, dtype=compute_dtype), blocksize=NF4_BLOCKSIZE,
            compress_statistics=True, quant_type="nf4", quant_storage=quant_storage,
        )  # fmt: skip
        self.weight = nn.Parameter(packed, requires_grad=False)  # (numel / 2 / bytes per storage element, 1)
        self.register_buffer("absmax", state.absmax, persistent=False)  # uint8, one per block of 64
        self.register_buffer("code", state.code, persistent=False)
        self.register_buffer("offset", state.offset, persistent=False)
        self.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
        self.register_buffer("nested_code", state.state2.code, persistent=False)
        self.nested_blocksize = state.state2.blocksize

    def quant_state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        nested = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize, dtype=torch.float32)
        return QuantState(
            absmax=self.absmax, shape=torch.Size([self.numel]), code=self.code, blocksize=NF4_BLOCKSIZE,
            quant_type="nf4", dtype=dtype, offset=self.offset, state2=nested,
        )  # fmt: skip

    def _packed(self) -> torch.Tensor:
        # whatever tensor holds the bytes now (a Parameter, or FSDP's view of its flat parameter), read as bytes
        return self.weight.reshape(-1).view(torch.uint8).unsqueeze(1)  # (bytes, 1), bitsandbytes' own layout

    def _kernel(self, packed: torch.Tensor, rows, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return nf4_kernel.dequantize_nf4(
            packed, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.code, blocksize=NF4_BLOCKSIZE,
            nested_blocksize=self.nested_blocksize, shape=self.shape, rows=rows, dtype=dtype, out=out,
        )  # fmt: skip

    def dequantizes_into_strided(self):  # where the fused kernel runs
        return self.use_triton_kernel and nf4_kernel.available(self.weight)

    def multiplies_grouped(self, inputs):
        return self.use_grouped_mm_kernel and self.can_multiply_grouped(inputs)

    def can_multiply_grouped(self, inputs):
        return nf4_grouped_mm.supports(self.shape, inputs.dtype, inputs.device)

    def grouped_matmul(self, inputs, offsets, transposed=False, hidden=None, scaled_b=None):
        return nf4_grouped_mm.nf4_grouped_mm(inputs, self, offsets, transposed, hidden=hidden, scaled_b=scaled_b)

    def dequantize_into(self, out, rows=None):
        if self.dequantizes_into_strided():
            self._kernel(self._packed(), rows, out.dtype, out)  # straight into the strided rows, no copy
        else:
            super().dequantize_into(out, rows)

    def dequantize(self, dtype=None, rows=None):
        import bitsandbytes as bnb

        dtype = dtype or self.compute_dtype
        packed = self._packed()
        if self.dequantizes_into_strided():  # the fused kernel
            return self._kernel(packed, rows, dtype)
        # flat: bitsandbytes 0.50's CPU kernel reads a 2-D/3-D shape whose last dimension is not a multiple of the
        # block size wrongly (the packed bytes are the same either way); a row range is cut from the whole
        weight = bnb.functional.dequantize_4bit(packed, self.quant_state(dtype)).view(self.shape)
        return weight if rows is None else weight[:, rows[0] : rows[1]].contiguous()


class Int8Storage(ExpertStorage):
    bits = 8

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, device):
        import bitsandbytes as bnb

        super().__init__(weight.shape, compute_dtype)
        # float16 rows, as bitsandbytes' Int8Params quantizes them: its CUDA kernel takes no other dtype
        rows = weight.detach().to(device=device, dtype=torch.float16).reshape(-1, weight.shape[-1])  # (experts * out, in)
        quantized, row_absmax, _ = bnb.functional.int8_vectorwise_quant(rows)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.register_buffer("row_absmax", row_absmax, persistent=False)

    def dequantize(self, dtype=None, rows=None):
        # q * absmax / 127 per row (bitsandbytes' int8_vectorwise_dequant), straight in the compute dtype and in
        # place: no float32 copy of the whole projection
        experts, out_features, in_features = self.shape
        start, end = rows or (0, out_features)
        codes = self.weight.reshape(experts, out_features, in_features)[:, start:end].view(torch.int8)
        scales = (self.row_absmax.view(experts, out_features)[:, start:end] / 127)[..., None]  # (experts, rows, 1)
        weight = codes.to(dtype or self.compute_dtype)
        return weight.mul_(scales.to(weight.dtype))


def read_nf4_in_gemms(model: nn.Module) -> int:
    """Makes every NF4 expert projection of `model` multiply through `nf4_grouped_mm` where the kernel runs (CUDA,
    dimensions in whole tiles); returns how many projections were switched."""
    storages = [module for module in model.modules() if isinstance(module, NF4Storage)]
    for storage in storages:
        storage.use_grouped_mm_kernel = True
    return len(storages)


def quantize_tensor(weight: torch.Tensor, *, bits: int, compute_dtype: torch.dtype, quant_storage: torch.dtype, device) -> ExpertStorage:
    """`weight` (experts, out, in), any device, stored at `bits` on `device`."""
    if bits == 4:
        return NF4Storage(weight, compute_dtype, quant_storage, device)
    if bits == 8:
        return Int8Storage(weight, compute_dtype, device)
    if bits == 16:
        return DenseStorage(weight, compute_dtype, device)
    raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
