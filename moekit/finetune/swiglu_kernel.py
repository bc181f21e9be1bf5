"""SiLU(gate) * up of a gated expert's fused gate_up output, forward and backward in one GPU launch each (Triton).

    intermediate = silu_and_mul(gate_up)  # (rows, 2I) gate columns then up columns -> (rows, I)

In eager torch this is a SiLU and a product over strided halves of (rows, 2I), a saved SiLU output, and in the
backward two products, a SiLU backward and a concatenation of the two halves' gradients: seven passes over
(rows, I)-sized tensors, in kernels that cannot vectorise the strided halves. Here the forward reads gate_up once and
saves only it; the backward writes the gradient of gate_up in one (rows, 2I) tensor. In float32 throughout, rounded
once at the end (the eager version rounds SiLU(gate) to the input dtype before the product). Elsewhere (CPU, no
Triton) the eager version runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 1024
use_triton_kernel = True  # False: eager torch everywhere (benchmarks/finetune_memory.py measures the difference)


try:  # module-level kernels, as torch.compile needs them
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def forward_kernel(gate_up_ptr, out_ptr, numel, inter: tl.constexpr, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) over (rows, I)
        mask = index < numel
        row, col = index // inter, index % inter
        gate = tl.load(gate_up_ptr + row * 2 * inter + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * inter + inter + col, mask=mask, other=0.0).to(tl.float32)
        silu = gate / (1.0 + tl.exp(-gate))
        tl.store(out_ptr + index, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(gate_up_ptr, grad_out_ptr, grad_gate_up_ptr, numel, inter: tl.constexpr, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel
        row, col = index // inter, index % inter
        gate_index = row * 2 * inter + col
        gate = tl.load(gate_up_ptr + gate_index, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + gate_index + inter, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_out_ptr + index, mask=mask, other=0.0).to(tl.float32)
        sigmoid = 1.0 / (1.0 + tl.exp(-gate))
        # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        grad_up = grad * gate * sigmoid
        out_type = grad_gate_up_ptr.dtype.element_ty
        tl.store(grad_gate_up_ptr + gate_index, grad_gate.to(out_type), mask=mask)
        tl.store(grad_gate_up_ptr + gate_index + inter, grad_up.to(out_type), mask=mask)


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        rows, double_inter = gate_up.shape
        out = gate_up.new_empty(rows, double_inter // 2)
        forward_kernel[(triton.cdiv(out.numel(), BLOCK),)](gate_up, out, out.numel(), inter=double_inter // 2, BLOCK=BLOCK)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate_up = torch.empty_like(gate_up)
        backward_kernel[(triton.cdiv(grad_out.numel(), BLOCK),)](gate_up, grad_out, grad_gate_up, grad_out.numel(), inter=gate_up.shape[1] // 2, BLOCK=BLOCK)
        return grad_gate_up


def silu_and_mul(gate_up: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """(rows, 2I) gate_up, gate columns first -> (rows, I) SiLU(gate) * up. fused: None = the Triton kernels where
    they run (CUDA with Triton), False = eager torch."""
    if fused is None:
        fused = use_triton_kernel and triton is not None and gate_up.is_cuda and gate_up.dim() == 2
    if fused:
        return _SiluAndMul.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
