"""The grouped GEMM that reads NF4 weights, compiled for the GPUs moekit trains on (sm80, sm90) without one: CI has
no GPU, and Triton's interpreter never lowers a kernel, so errors of layout or shared memory and register spills
would otherwise show only on a GPU. Pointers and row strides are specialised as the JIT specialises them at run time
(16-byte aligned, strides multiples of 16)."""

from __future__ import annotations

import re

import pytest

SHAPE = (4, 28672, 4096)  # the 4x7B gate_up_proj


def compile_grouped_mm(capability: int, transposed: bool, lora_rank: int, config):
    import triton
    from triton.backends.compiler import GPUTarget

    from moekit.finetune.nf4_grouped_mm import nf4_grouped_mm_kernel

    pointers = ["inputs", "packed", "absmax", "nested_absmax", "nested_code", "offset", "code", "offsets", "hidden", "scaled_b", "out"]
    types = ["*bf16", "*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*i32", "*bf16", "*bf16", "*bf16"]
    signature = {f"{name}_ptr": kind for name, kind in zip(pointers, types)}
    signature |= dict.fromkeys(["inputs_row_stride", "hidden_row_stride", "out_row_stride"], "i32")
    constants = dict(
        EXPERTS=SHAPE[0], OUT_FEATURES=SHAPE[1], IN_FEATURES=SHAPE[2], TRANSPOSED=transposed, LORA_RANK=lora_rank, NESTED_BLOCKSIZE=256,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )  # fmt: skip
    signature |= dict.fromkeys(constants, "constexpr")
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(signature) if name.endswith(("_ptr", "_stride"))}
    source = triton.compiler.ASTSource(fn=nf4_grouped_mm_kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("transposed, lora_rank", [(False, 0), (False, 16), (True, 0)], ids=["x@W^T", "x@W^T+LoRA", "dy@W"])
def test_the_nf4_grouped_gemm_compiles_without_spills_within_shared_memory(capability, transposed, lora_rank):
    from moekit.finetune.nf4_grouped_mm import CONFIGS

    config = CONFIGS[transposed]
    compiled = compile_grouped_mm(capability, transposed, lora_rank, config)
    ptx = compiled.asm["ptx"]
    assert not re.search(r"\b(ld|st)\.local\b", ptx), "registers spill to local memory"
    assert compiled.metadata.shared <= {80: 163 * 1024, 90: 227 * 1024}[capability], compiled.metadata.shared
    # tensor cores: wgmma on Hopper, mma.sync on Ampere
    assert ("wgmma.mma_async" if capability == 90 else "mma.sync.aligned") in ptx
