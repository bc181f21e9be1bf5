"""The RMSNorm of Mixtral-family models, forward and backward in one GPU launch each (Triton).

    fuse_rms_norms(model)  # every MixtralRMSNorm (Mistral, Llama) of `model` runs through `rms_norm` on CUDA

transformers' RMSNorm upcasts the input to float32, squares it, takes the mean, the rsqrt, the product, rounds it to
the input dtype and multiplies by the weight: about seven kernels forward and more backward, each a pass over
(tokens, hidden), with float32 copies saved for the backward pass. A training step with gradient checkpointing runs
each norm twice forward and once backward. Here one program per row reads the input once and writes the output once,
and only the input (no copy) and one float32 rstd per row are saved. The arithmetic is transformers': float32
inside, the normalised row rounded to the input dtype before the weight product, and in the backward pass the
product of the gradient and the weight rounded to the input dtype as autograd rounds it.

Elsewhere (CPU, no Triton, a trainable norm weight, a weight that is not a plain tensor) the module's own forward runs.
"""

from __future__ import annotations

import types

import torch
from torch import nn

FUSED_CLASSES = ("MixtralRMSNorm", "MistralRMSNorm", "LlamaRMSNorm")  # x / sqrt(mean(x^2) + eps) * weight
use_triton_kernel = True  # False: transformers' forward everywhere (benchmarks/finetune_memory.py measures the difference)
MAX_COLUMNS = 65536  # one row per program, held in registers


try:  # module-level kernels, as torch.compile needs them
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def rms_norm_forward_kernel(x_ptr, weight_ptr, out_ptr, rstd_ptr, columns, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)  # (BLOCK,) columns of one row
        mask = offsets < columns
        x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=0) / columns
        rstd = 1.0 / tl.sqrt(variance + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # hidden_states.to(input_dtype)
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * columns + offsets, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def rms_norm_backward_kernel(grad_out_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, columns, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < columns
        x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        # d normed, rounded to the input dtype (the gradient of the cast back to it), then in float32
        grad_normed = (grad_out * weight).to(x_ptr.dtype.element_ty).to(tl.float32)
        # normed = x * rstd, rstd = (mean(x^2) + eps)^(-1/2): d x = rstd * g - x * rstd^3 / columns * sum(g * x)
        dot = tl.sum(grad_normed * x, axis=0)
        grad_x = rstd * grad_normed - x * (rstd * rstd * rstd / columns) * dot
        tl.store(grad_x_ptr + row * columns + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch_config(columns: int) -> tuple[int, int]:
    block = triton.next_power_of_2(columns)
    return block, min(16, max(4, block // 512))  # (BLOCK, warps): 8 warps for 4,096 columns


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, eps):
        # kept in its own shape (the input itself when contiguous): saved-tensor hooks such as --offload-activations'
        # recognise (batch, seq, hidden) activations by their shape
        x = hidden.contiguous()
        columns, rows = x.shape[-1], x.numel() // x.shape[-1]
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, hidden.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _launch_config(columns)
        rms_norm_forward_kernel[(rows,)](x, weight, out, rstd, columns, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        block, warps = _launch_config(x.shape[-1])
        rms_norm_backward_kernel[(rstd.shape[0],)](grad_out, x, weight, rstd, grad_x, x.shape[-1], BLOCK=block, num_warps=warps)
        return grad_x, None, None


def _fusable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        use_triton_kernel
        and triton is not None
        and hidden.is_cuda
        and not weight.requires_grad  # the kernels give no weight gradient; moekit never trains norms
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor shard
        and weight.is_contiguous()
        and hidden.shape[-1] == weight.shape[0] <= MAX_COLUMNS
    )


def rms_norm(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`module`'s RMSNorm of `hidden_states`: the fused kernels where they run, else the module's own forward."""
    if _fusable(hidden_states, module.weight):
        return _RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)
    return type(module).forward(module, hidden_states)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route every RMSNorm of `model` of the classes in FUSED_CLASSES through `rms_norm`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_CLASSES:
            module.forward = types.MethodType(rms_norm, module)
            count += 1
    return count
