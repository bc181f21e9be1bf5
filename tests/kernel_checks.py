"""moekit's Triton kernels against their references, on the CPU through Triton's interpreter.

Run by tests/test_kernels_interpreted.py, each check in a fresh process with TRITON_INTERPRET=1 (Triton reads it when
the kernels are defined, at import). The interpreter computes with numpy: it rounds float32 to bfloat16 by truncation,
so the checks use float32 and float16 outputs, which it rounds as the GPU does; bfloat16 rounding is checked by the
GPU tests (`pytest -m gpu`).
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"


def nf4() -> None:
    """The NF4 kernel equals bitsandbytes' dequantization bit for bit: whole tensors, row ranges, and written into
    the first columns of a wider tensor (the folded LoRA weight)."""
    from moekit.finetune.expert_storage import NF4Storage

    torch.manual_seed(0)
    for shape, dtype in [((4, 192, 64), torch.float32), ((3, 200, 4096 + 64), torch.float32), ((2, 192, 128), torch.float16)]:
        storage = NF4Storage(torch.randn(shape) * torch.rand(shape[0], 1, 1) * 3, dtype, torch.uint8, "cpu")
        reference = storage.dequantize(dtype)  # bitsandbytes (not CUDA)
        packed = storage._packed()
        assert torch.equal(storage._kernel(packed, None, dtype), reference), (shape, dtype, "whole")
        assert torch.equal(storage._kernel(packed, (64, 192), dtype), reference[:, 64:192]), (shape, dtype, "rows")
        wide = torch.full((shape[0], 128, shape[2] + 16), 7.0, dtype=dtype)
        storage._kernel(packed, (64, 192), dtype, wide[:, :, : shape[2]])
        assert torch.equal(wide[:, :, : shape[2]], reference[:, 64:192]), (shape, dtype, "strided")
        assert bool((wide[:, :, shape[2] :] == 7).all()), (shape, dtype, "columns beyond the weight written")


def swiglu() -> None:
    """SiLU(gate) * up * routing weight and its gradients (gate_up and the weights) equal eager torch's."""
    from moekit.finetune.swiglu_kernel import _WeightedSiluAndMul

    torch.manual_seed(0)
    for rows, inter in [(37, 96), (5, 1000), (3, 2500)]:
        gate_up = (torch.randn(rows, 2 * inter) * 3).requires_grad_(True)
        weights = torch.rand(rows).requires_grad_(True)
        grad = torch.randn(rows, inter)
        fused = _WeightedSiluAndMul.apply(gate_up, weights)
        fused_grads = torch.autograd.grad(fused, [gate_up, weights], grad)
        gate, up = gate_up.chunk(2, dim=-1)
        eager = F.silu(gate) * up * weights[:, None]
        eager_grads = torch.autograd.grad(eager, [gate_up, weights], grad)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        for fused_grad, eager_grad in zip(fused_grads, eager_grads):
            torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-5)


def rms_norm() -> None:
    """The fused RMSNorm and its input gradient equal transformers' MixtralRMSNorm."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from moekit.finetune.rmsnorm_kernel import _RMSNorm

    torch.manual_seed(0)
    for shape, input_dtype in [((2, 9, 64), torch.float32), ((3, 100), torch.float32), ((4, 7, 48), torch.float16)]:
        norm = MixtralRMSNorm(shape[-1], eps=1e-5).requires_grad_(False)  # float32 weight
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        hidden = (torch.randn(shape) * 3).to(input_dtype).requires_grad_(True)
        grad = torch.randn(shape)
        fused = _RMSNorm.apply(hidden, norm.weight, norm.variance_epsilon)
        (fused_grad,) = torch.autograd.grad(fused, hidden, grad)
        eager = norm(hidden)
        (eager_grad,) = torch.autograd.grad(eager, hidden, grad)
        assert fused.dtype == eager.dtype and fused.shape == eager.shape and fused_grad.dtype == input_dtype
        eps = torch.finfo(input_dtype).eps  # the normalised row is rounded to the input dtype before the product
        torch.testing.assert_close(fused, eager, rtol=2 * eps, atol=1e-6)
        scale = eager_grad.abs().max()
        torch.testing.assert_close(fused_grad / scale, eager_grad / scale, rtol=4 * eps, atol=4 * eps)


def nf4_grouped_mm() -> None:
    """The grouped GEMM that reads NF4 weights itself equals bitsandbytes' dequantized weights times the rows of each
    expert, both ways (x @ W_e^T and dy @ W_e), and with a LoRA term added (rank padded), with the operands in either
    order (`swap_ab`) and either launch order (`rows_first`); an expert without rows and row tiles that end mid-expert included."""
    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.nf4_grouped_mm import KernelConfig, nf4_grouped_mm

    torch.manual_seed(0)
    for shape, counts, dtype in [((3, 128, 192), [21, 0, 16], torch.float32), ((2, 192, 64), [5, 40], torch.float16)]:
        storage = NF4Storage(torch.randn(shape) * torch.rand(shape[0], 1, 1) * 3, torch.float32, torch.uint8, "cpu")
        weight = storage.dequantize(torch.float32)  # (experts, out, in), bitsandbytes
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        groups = list(enumerate(zip([0, *offsets.tolist()[:-1]], offsets.tolist())))
        hidden = torch.randn(sum(counts), 12).to(dtype)
        scaled_b = torch.randn(shape[0], shape[1], 12).to(dtype)
        tolerance = max(2 * torch.finfo(dtype).eps, 1e-5)  # float32: the sums' order; float16: the output's rounding
        for (transposed, lora), swap_ab, rows_first in itertools.product([(False, False), (True, False), (False, True)], (False, True), (False, True)):
            config = KernelConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=2, swap_ab=swap_ab, rows_first=rows_first)
            inputs = torch.randn(sum(counts), shape[1] if transposed else shape[2]).to(dtype)
            extra = {"hidden": hidden, "scaled_b": scaled_b} if lora else {}
            got = nf4_grouped_mm(inputs, storage, offsets, transposed=transposed, config=config, **extra)
            expected = torch.cat([inputs[s:e].float() @ (weight[i] if transposed else weight[i].T) for i, (s, e) in groups])
            if lora:
                expected += torch.cat([hidden[s:e].float() @ scaled_b[i].float().T for i, (s, e) in groups])
            assert got.dtype == dtype, (got.dtype, dtype)
            atol = tolerance * expected.abs().max().item()
            torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=atol, msg=f"{shape} {transposed=} {lora=} {swap_ab=} {rows_first=}")
            strided = inputs.T.contiguous().T  # the same rows, column-major
            assert torch.equal(nf4_grouped_mm(strided, storage, offsets, transposed=transposed, config=config, **extra), got)


def nf4_grouped_mm_in_the_expert_block() -> None:
    """An NF4 expert block whose GEMMs read the quantized weights themselves gives the loss and gradients (input,
    router, LoRA) of the same block that dequantizes first, Mixtral and Phixtral, with LoRA on a subset of experts."""
    from torch import nn

    from moekit.finetune import nf4_grouped_mm as module
    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.experts import build_expert_block

    module.CONFIGS = dict.fromkeys((False, True), module.KernelConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=2))
    experts, hidden_size, inter, top_k, tokens = 4, 64, 128, 2, 40
    for family in ("mixtral", "phixtral"):
        generator = torch.Generator().manual_seed(0)
        shapes = (
            {"gate_up_proj": (experts, 2 * inter, hidden_size), "down_proj": (experts, hidden_size, inter)}
            if family == "mixtral"
            else {
                "fc1.weight": (experts, inter, hidden_size),
                "fc1.bias": (experts, inter),
                "fc2.weight": (experts, hidden_size, inter),
                "fc2.bias": (experts, hidden_size),
            }
        )
        tensors = {name: torch.randn(*shape, generator=generator) * 0.2 for name, shape in shapes.items()}
        act_fn = nn.SiLU() if family == "mixtral" else nn.GELU(approximate="tanh")
        block = build_expert_block(family, tensors, bits=4, compute_dtype=torch.float32, device="cpu", act_fn=act_fn)
        block.add_lora(8, 16, experts=[0, 2, 3])
        with torch.no_grad():
            for name in block.projections:
                getattr(block, f"lora_B_{name}").normal_(0, 0.1, generator=generator)
        hidden = torch.randn(tokens, hidden_size, generator=generator)
        router = torch.randn(hidden_size, experts, generator=generator)
        results = []
        for in_kernel in (False, True):
            NF4Storage.use_grouped_mm_kernel = in_kernel
            module.launches.clear()
            inputs = hidden.clone().requires_grad_(True)
            probs = torch.softmax(inputs @ router, dim=-1)
            top_k_weights, top_k_index = torch.topk(probs, top_k, dim=-1)
            loss = (block(inputs, top_k_index, top_k_weights) ** 2).mean()
            lora = [p for n, p in block.named_parameters() if "lora_" in n]
            grads = torch.autograd.grad(loss, [inputs, *lora])
            assert module.launches == ({"x @ W^T": 2, "dy @ W": 2} if in_kernel else {}), (family, in_kernel, module.launches)
            assert block.path_counts["grouped"] > 0 and block.path_counts["per_expert"] == 0
            results.append((loss, grads))
        (loss, grads), (kernel_loss, kernel_grads) = results
        torch.testing.assert_close(kernel_loss, loss, rtol=1e-5, atol=0, msg=family)
        for grad, kernel_grad in zip(grads, kernel_grads):
            scale = grad.abs().max()
            torch.testing.assert_close(kernel_grad / scale, grad / scale, rtol=1e-5, atol=1e-5, msg=family)
