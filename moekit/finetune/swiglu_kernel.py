"""SiLU(gate) * up * routing weight of a gated expert's fused gate_up output, forward and backward in one GPU launch
each (Triton).

    intermediate = weighted_silu_and_mul(gate_up, weights)  # (rows, 2I) gate columns then up columns, (rows,) -> (rows, I)

The routing weight is applied here, before the (linear) second projection, rather than to that projection's output:
the router's gradient is then the row sum of this product's gradient times SiLU(gate) * up, so the second
projection's output is never saved, and a checkpoint's recomputation need not compute it (`experts`).

In eager torch this is a SiLU and products over strided halves of (rows, 2I), a saved SiLU output, and in the
backward several products, a SiLU backward, a row sum and a concatenation of the two halves' gradients: passes over
(rows, I)-sized tensors in kernels that cannot vectorise the strided halves. Here the forward reads gate_up once and
saves only it and the weights; the backward writes the gradient of gate_up in one (rows, 2I) tensor, and per-block
partial row sums for the weights' gradient (summed in a fixed order: deterministic). In float32 throughout, rounded
once at the end. Elsewhere (CPU, no Triton) the eager version runs.
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
    def forward_kernel(gate_up_ptr, weights_ptr, out_ptr, inter: tl.constexpr, BLOCK: tl.constexpr):
        # program (row, block of BLOCK columns of I)
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = col < inter
        gate = tl.load(gate_up_ptr + row * 2 * inter + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * inter + inter + col, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weights_ptr + row).to(tl.float32)
        silu = gate / (1.0 + tl.exp(-gate))
        tl.store(out_ptr + row * inter + col, (silu * up * weight).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(gate_up_ptr, weights_ptr, grad_out_ptr, grad_gate_up_ptr, grad_weight_parts_ptr, inter: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        col = block * BLOCK + tl.arange(0, BLOCK)
        mask = col < inter
        gate_index = row * 2 * inter + col
        gate = tl.load(gate_up_ptr + gate_index, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + gate_index + inter, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_out_ptr + row * inter + col, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weights_ptr + row).to(tl.float32)
        sigmoid = 1.0 / (1.0 + tl.exp(-gate))
        silu = gate * sigmoid
        # d weight: this block's share of the row sum of grad * SiLU(gate) * up
        tl.store(grad_weight_parts_ptr + row * tl.num_programs(1) + block, tl.sum(grad * silu * up, axis=0))
        grad = grad * weight
        # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        grad_up = grad * silu
        out_type = grad_gate_up_ptr.dtype.element_ty
        tl.store(grad_gate_up_ptr + gate_index, grad_gate.to(out_type), mask=mask)
        tl.store(grad_gate_up_ptr + gate_index + inter, grad_up.to(out_type), mask=mask)


class _WeightedSiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weights):
        gate_up, weights = gate_up.contiguous(), weights.contiguous()
        rows, double_inter = gate_up.shape
        out = gate_up.new_empty(rows, double_inter // 2)
        forward_kernel[(rows, triton.cdiv(double_inter // 2, BLOCK))](gate_up, weights, out, inter=double_inter // 2, BLOCK=BLOCK)
        ctx.save_for_backward(gate_up, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weights = ctx.saved_tensors
        rows, double_inter = gate_up.shape
        grid = (rows, triton.cdiv(double_inter // 2, BLOCK))
        grad_gate_up = torch.empty_like(gate_up)
        grad_weight_parts = torch.empty(grid, dtype=torch.float32, device=gate_up.device)  # (rows, blocks)
        backward_kernel[grid](gate_up, weights, grad_out.contiguous(), grad_gate_up, grad_weight_parts, inter=double_inter // 2, BLOCK=BLOCK)
        grad_weights = grad_weight_parts.sum(dim=1).to(weights.dtype) if ctx.needs_input_grad[1] else None
        return grad_gate_up, grad_weights


def weighted_silu_and_mul(gate_up: torch.Tensor, weights: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """(rows, 2I) gate_up, gate columns first, and (rows,) weights -> (rows, I) SiLU(gate) * up * weight, in the
    dtype of gate_up. fused: None = the Triton kernels where they run (CUDA with Triton), False = eager torch."""
    if fused is None:
        fused = use_triton_kernel and triton is not None and gate_up.is_cuda and gate_up.dim() == 2
    if fused:
        return _WeightedSiluAndMul.apply(gate_up, weights)
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up * weights[:, None]).to(gate_up.dtype)
