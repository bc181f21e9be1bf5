"""moekit's Triton kernels compiled for the GPUs moekit trains on (sm80, sm90) without one: CI has no GPU, and Triton's
interpreter never lowers a kernel, so errors of layout or shared memory and register spills would otherwise show only
on a GPU. Pointers and integer arguments are specialised as the JIT specialises them at run time (16-byte aligned,
multiples of 16), with the 4x7B shapes."""

from __future__ import annotations

import re

import pytest

SHAPE = (4, 28672, 4096)  # the 4x7B gate_up_proj
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # bytes a block may use


def compile_kernel(kernel, signature: dict[str, str], constants: dict, capability: int, num_warps: int, num_stages: int = 3):
    import triton
    from triton.backends.compiler import GPUTarget

    signature = signature | dict.fromkeys(constants, "constexpr")
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values()) if kind != "constexpr" and kind != "fp32"}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def check(compiled, capability: int) -> None:
    ptx = compiled.asm["ptx"]
    assert not re.search(r"\b(ld|st)\.local\b", ptx), "registers spill to local memory"
    assert compiled.metadata.shared <= SHARED_MEMORY[capability], compiled.metadata.shared


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("transposed, lora_rank", [(False, 0), (False, 16), (True, 0)], ids=["x@W^T", "x@W^T+LoRA", "dy@W"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["x-first", "weight-first"])
def test_the_nf4_grouped_gemm_compiles_without_spills_within_shared_memory(capability, transposed, lora_rank, swap_ab):
    from moekit.finetune.nf4_grouped_mm import CONFIGS, nf4_grouped_mm_kernel

    pointers = ["inputs", "packed", "absmax", "nested_absmax", "nested_code", "offset", "code", "offsets", "hidden", "scaled_b", "out"]
    types = ["*bf16", "*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*i32", "*bf16", "*bf16", "*bf16"]
    signature = {f"{name}_ptr": kind for name, kind in zip(pointers, types)}
    signature |= dict.fromkeys(["inputs_row_stride", "hidden_row_stride", "out_row_stride"], "i32")
    config = CONFIGS[transposed]
    constants = dict(
        EXPERTS=SHAPE[0], OUT_FEATURES=SHAPE[1], IN_FEATURES=SHAPE[2], TRANSPOSED=transposed, LORA_RANK=lora_rank, NESTED_BLOCKSIZE=256,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWAP_AB=swap_ab, ROWS_FIRST=config.rows_first,
    )  # fmt: skip
    compiled = compile_kernel(nf4_grouped_mm_kernel, signature, constants, capability, config.num_warps, config.num_stages)
    check(compiled, capability)
    # tensor cores: wgmma on Hopper, mma.sync on Ampere
    assert ("wgmma.mma_async" if capability == 90 else "mma.sync.aligned") in compiled.asm["ptx"]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("strided", [False, True], ids=["whole", "into-wider"])
def test_the_nf4_dequantization_kernel_compiles(capability, strided):
    from moekit.finetune.nf4_kernel import BYTES_PER_PROGRAM, dequantize_nf4_kernel

    pointers = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32"}
    pointers |= {"code_ptr": "*fp32", "out_ptr": "*bf16"}
    sizes = dict.fromkeys(["slice_bytes", "expert_bytes", "start_bytes", "programs_per_slice", "out_row_stride"], "i32")
    constants = dict(BLOCK=BYTES_PER_PROGRAM, BYTES_PER_ABSMAX=32, NESTED_BLOCKSIZE=256, IN_FEATURES=SHAPE[2], STRIDED=strided)
    check(compile_kernel(dequantize_nf4_kernel, pointers | sizes, constants, capability, num_warps=4), capability)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_swiglu_kernels_compile(capability, direction):
    from moekit.finetune import swiglu_kernel

    if direction == "forward":
        kernel, signature = swiglu_kernel.forward_kernel, {"gate_up_ptr": "*bf16", "weights_ptr": "*fp32", "out_ptr": "*bf16"}
    else:
        pointers = ["gate_up_ptr", "weights_ptr", "grad_out_ptr", "grad_gate_up_ptr", "grad_weight_parts_ptr"]
        kernel, signature = swiglu_kernel.backward_kernel, dict(zip(pointers, ["*bf16", "*fp32", "*bf16", "*bf16", "*fp32"]))
    constants = {"inter": SHAPE[1] // 2, "BLOCK": swiglu_kernel.BLOCK}
    check(compile_kernel(kernel, signature, constants, capability, num_warps=4), capability)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_rms_norm_kernels_compile(capability, direction):
    from moekit.finetune import rmsnorm_kernel

    if direction == "forward":
        kernel = rmsnorm_kernel.rms_norm_forward_kernel
        signature = {"x_ptr": "*bf16", "weight_ptr": "*fp32", "out_ptr": "*bf16", "rstd_ptr": "*fp32", "columns": "i32", "eps": "fp32"}
    else:
        kernel = rmsnorm_kernel.rms_norm_backward_kernel
        signature = {"grad_out_ptr": "*bf16", "x_ptr": "*bf16", "weight_ptr": "*fp32", "rstd_ptr": "*fp32", "grad_x_ptr": "*bf16", "columns": "i32"}
    block, warps = rmsnorm_kernel._launch_config(SHAPE[2])
    check(compile_kernel(kernel, signature, {"BLOCK": block}, capability, num_warps=warps), capability)
