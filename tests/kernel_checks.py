"""moekit's Triton kernels against their references, on the CPU through Triton's interpreter.

Run by tests/test_kernels_interpreted.py, each check in a fresh process with TRITON_INTERPRET=1 (Triton reads it when
the kernels are defined, at import). The interpreter computes with numpy: it rounds float32 to bfloat16 by truncation,
so the checks use float32 and float16 outputs, which it rounds as the GPU does; bfloat16 rounding is checked by the
GPU tests (`pytest -m gpu`).
"""

from __future__ import annotations

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
    """SiLU(gate) * up and its gradient equal eager torch's."""
    from moekit.finetune.swiglu_kernel import _SiluAndMul

    torch.manual_seed(0)
    for rows, inter in [(37, 96), (5, 1000)]:
        gate_up = (torch.randn(rows, 2 * inter) * 3).requires_grad_(True)
        grad = torch.randn(rows, inter)
        fused = _SiluAndMul.apply(gate_up)
        (fused_grad,) = torch.autograd.grad(fused, gate_up, grad)
        gate, up = gate_up.chunk(2, dim=-1)
        eager = F.silu(gate) * up
        (eager_grad,) = torch.autograd.grad(eager, gate_up, grad)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-6)


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
