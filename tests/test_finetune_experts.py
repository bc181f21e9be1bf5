"""The expert block: grouped forward and backward equal a per-expert reference, on CPU and (marked gpu) on CUDA."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.finetune import experts as experts_module
from moekit.finetune.experts import build_expert_block, path_counts, row_slices

EXPERTS, HIDDEN, INTER, TOP_K, TOKENS, RANK = 4, 64, 96, 2, 40, 4

DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu"),
    pytest.param("cuda", torch.bfloat16, id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def canonical_tensors(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    if family == "mixtral":
        return {"gate_up_proj": rand(EXPERTS, 2 * INTER, HIDDEN), "down_proj": rand(EXPERTS, HIDDEN, INTER)}
    return {
        "fc1.weight": rand(EXPERTS, INTER, HIDDEN),
        "fc1.bias": rand(EXPERTS, INTER),
        "fc2.weight": rand(EXPERTS, HIDDEN, INTER),
        "fc2.bias": rand(EXPERTS, HIDDEN),
    }


def make_block(family, bits, device, dtype, experts=None):
    act_fn = nn.SiLU() if family == "mixtral" else nn.GELU(approximate="tanh")
    block = build_expert_block(family, canonical_tensors(family), bits=bits, compute_dtype=dtype, device=device, act_fn=act_fn)
    block.add_lora(RANK, 8, experts=experts)
    with torch.no_grad():  # B starts at zero; make the LoRA branch count
        for name in block.projections:
            getattr(block, f"lora_B_{name}").normal_(0, 0.1)
    return block


def reference_forward(block, hidden, top_k_index, top_k_weights):
    """Transformers' own per-expert loop (MixtralExperts.forward) on the dequantized weights plus LoRA deltas."""
    first, second = block.projections
    weights = {name: block.dequantized(name, torch.float32) for name in block.projections}
    output = torch.zeros_like(hidden)
    for expert in range(block.num_experts):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx].float()

        def project(name, inputs):
            lora_a, lora_b = block.lora_factors(name)
            out = inputs @ weights[name][expert].T + block.lora_scaling * (inputs @ lora_a[expert].float().T) @ lora_b[expert].float().T
            bias = getattr(block, f"{name}_bias", None)
            return out if bias is None else out + bias[expert].float()

        h = project(first, x)
        h = block.act_fn(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if block.gated else block.act_fn(h)
        out = project(second, h) * top_k_weights[token_idx, slot, None].float()
        output.index_add_(0, token_idx, out.to(output.dtype))
    return output


def run(block, router, hidden, forward):
    """(loss, grads of hidden, router and every LoRA parameter) of one forward+backward through `forward`."""
    hidden = hidden.detach().clone().requires_grad_(True)
    logits = router(hidden)
    probs = F.softmax(logits.float(), dim=-1)
    top_k_weights, top_k_index = torch.topk(probs, TOP_K, dim=-1)
    top_k_weights = (top_k_weights / top_k_weights.sum(-1, keepdim=True)).to(hidden.dtype)
    out = forward(block, hidden, top_k_index, top_k_weights)
    loss = (out.float() ** 2).mean()
    params = [router.weight] + [p for n, p in block.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(loss, [hidden] + params)
    return loss.detach(), grads


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize("family", ["mixtral", "phixtral"])
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "row-slices"])
@pytest.mark.parametrize("fold", [False, True], ids=["lora-apart", "lora-folded"])
def test_grouped_forward_and_backward_equal_the_per_expert_reference(device, dtype, family, bits, sliced, fold, monkeypatch):
    if sliced:  # every quantized projection dequantized 64 rows at a time
        monkeypatch.setattr(experts_module, "DEQUANTIZED_SLICE_BYTES", 1)
    folded = []  # projections that ran as one GEMM with their LoRA
    monkeypatch.setattr(experts_module._FrozenExpertLinear, "forward", _recording(experts_module._FrozenExpertLinear.forward, folded))
    torch.manual_seed(0)
    block = make_block(family, bits, device, dtype, experts=[0, 2, 3])
    block.fold_lora = fold
    first = block.storage(block.projections[0])
    assert len(row_slices(first, dtype)) == (first.shape[1] // 64 + (first.shape[1] % 64 > 0) if sliced and bits != 16 else 1)
    router = nn.Linear(HIDDEN, EXPERTS, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype)

    block.path_counts.clear()
    loss, grads = run(block, router, hidden, lambda b, *args: b(*args))
    assert path_counts(block) == {"grouped": 1, "per_expert": 0}, "the grouped path did not run"
    assert len(folded) == (2 if fold else 0)
    ref_loss, ref_grads = run(block, router, hidden, reference_forward)
    # bf16: outputs and gradients rounded to 8 bits of mantissa (grouped GEMMs accumulate in fp32); a wrong
    # expert, offset or LoRA slice gives differences of order 1
    # bf16: gradients compared relative to their largest entry; one router entry of 256 was seen at 1.1e-2 on an H200
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 2e-2}
    torch.testing.assert_close(loss, ref_loss, **tol)
    names = ["hidden", "router"] + [n for n, p in block.named_parameters() if "lora_" in n]
    for name, grad, ref in zip(names, grads, ref_grads):
        scale = ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grad.float() / scale, ref.float() / scale, **tol, msg=lambda m, name=name: f"{name}: {m}")
    # an expert left out of --experts has no LoRA parameters; every adapted one gets a gradient
    lora_b_grad = grads[names.index(f"lora_B_{block.projections[0]}")]
    assert lora_b_grad.shape[0] == 3 and all(torch.count_nonzero(lora_b_grad[i]) > 0 for i in range(3))
    assert torch.count_nonzero(block.lora_factors(block.projections[0])[1][1]) == 0  # expert 1: zero delta

    # the expert-by-expert fallback computes the same
    block.grouped = False
    fallback_loss, fallback_grads = run(block, router, hidden, lambda b, *args: b(*args))
    assert block.path_counts["per_expert"] == 1
    torch.testing.assert_close(fallback_loss, loss, **tol)


def _recording(forward, calls: list):
    def recorded(ctx, inputs, offsets, storage, grouped, output_needed, hidden=None, scaled_b=None):
        if hidden is not None:  # LoRA folded in
            calls.append(storage)
        return forward(ctx, inputs, offsets, storage, grouped, output_needed, hidden, scaled_b)

    return staticmethod(recorded)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-expert"])
def test_folded_lora_gives_an_expert_without_tokens_zero_gradients(grouped):
    """A LoRA folded into the frozen GEMM gets its B gradient from a grouped weight-gradient GEMM: an expert that no
    token chose must get exactly zero there, and the rest what the separate LoRA product gives."""
    torch.manual_seed(0)
    block = make_block("mixtral", 4, "cpu", torch.float32)
    block.grouped = grouped
    hidden = torch.randn(TOKENS, HIDDEN)
    top_k_index = torch.stack([torch.randint(0, 2, (TOKENS,)), torch.full((TOKENS,), 2)], dim=1)  # expert 3 never chosen
    top_k_weights = torch.full((TOKENS, TOP_K), 0.5)
    grads = {}
    for fold in (False, True):
        block.fold_lora = fold
        x = hidden.clone().requires_grad_(True)
        loss = (block(x, top_k_index, top_k_weights) ** 2).mean()
        params = [x] + [p for n, p in block.named_parameters() if "lora_" in n]
        grads[fold] = torch.autograd.grad(loss, params)
    grad_b = grads[True][[n for n, p in block.named_parameters() if "lora_" in n].index("lora_B_gate_up_proj") + 1]
    assert torch.count_nonzero(grad_b[3]) == 0 and torch.count_nonzero(grad_b[0]) > 0
    for apart, folded in zip(grads[False], grads[True]):
        torch.testing.assert_close(folded, apart, rtol=1e-4, atol=1e-6)


def test_a_gradient_slice_reaches_the_grouped_gemm_without_a_copy_where_its_rows_are_aligned():
    from moekit.finetune.experts import _aligned_or_copied

    grad = torch.randn(8, 192, dtype=torch.bfloat16)
    for start, end in [(0, 64), (64, 192)]:  # row slices start on 64 rows: 128-byte aligned columns
        view = _aligned_or_copied(grad[:, start:end])
        assert view.data_ptr() == grad[:, start:].data_ptr() and torch.equal(view, grad[:, start:end])
    odd = _aligned_or_copied(grad[:, 3:67])  # 6 bytes in: copied, so the GEMM gets what it can read
    assert odd.is_contiguous() and torch.equal(odd, grad[:, 3:67])


@pytest.mark.parametrize("fold", [True, False], ids=["lora-folded", "lora-apart"])
def test_a_sliced_projection_holds_one_dequantized_slice_at_a_time(fold, monkeypatch):
    """Slices bound the memory of a dequantized projection only if each is freed before the next is dequantized
    (a loop variable still holding the previous slice kept two alive: the 4x7B peak did not move)."""
    monkeypatch.setattr(experts_module, "DEQUANTIZED_SLICE_BYTES", 1)
    alive, alive_at_each_call = [], []
    dequantize = experts_module._frozen_weight

    def observed(*args):
        alive[:] = [ref for ref in alive if ref() is not None]
        alive_at_each_call.append(len(alive))
        weight = dequantize(*args)
        alive.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(experts_module, "_frozen_weight", observed)
    torch.manual_seed(0)
    block = make_block("mixtral", 4, "cpu", torch.float32)
    block.fold_lora = fold
    router = nn.Linear(HIDDEN, EXPERTS, bias=False)
    run(block, router, torch.randn(TOKENS, HIDDEN), lambda b, *args: b(*args))
    # gate_up (192 rows) in 3 slices and down (64 rows) in 1, forward and backward
    assert len(alive_at_each_call) == 8
    assert alive_at_each_call == [0] * 8


def test_row_slices_cover_the_projection_in_aligned_pieces_within_the_budget():
    block = make_block("mixtral", 4, "cpu", torch.float32)
    storage = block.storage("gate_up_proj")  # (4, 192, 64): 1,024 bytes a row of all experts in float32
    assert row_slices(storage, torch.float32) == [(0, 192)]  # under the default budget: one piece
    assert row_slices(storage, torch.float32, budget=1) == [(0, 64), (64, 128), (128, 192)]  # never under 64 rows
    assert row_slices(storage, torch.float32, budget=128 * 1024 + 5) == [(0, 128), (128, 192)]
    assert row_slices(storage, torch.bfloat16, budget=192 * 512) == [(0, 192)]  # 2 bytes a weight: all fits
    dense = make_block("mixtral", 16, "cpu", torch.float32).storage("gate_up_proj")
    assert row_slices(dense, torch.float32, budget=1) == [(0, 192)]  # 16-bit storage is used as it is, never copied


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_range_dequantizes_to_the_same_rows_of_the_whole(bits):
    block = make_block("mixtral", bits, "cpu", torch.float32)
    storage = block.storage("gate_up_proj")
    whole = storage.dequantize()
    torch.testing.assert_close(storage.dequantize(rows=(64, 192)), whole[:, 64:192], rtol=0, atol=0)


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_dequantized_weights_do_not_change_with_a_forward(device, dtype):
    """The block never runs bitsandbytes' Linear4bit forward (which repacks CPU weights in place)."""
    block = make_block("mixtral", 4, device, dtype)
    before = {name: block.dequantized(name).clone() for name in block.projections}
    hidden = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype)
    index = torch.randint(0, EXPERTS, (TOKENS, TOP_K), device=device)
    block(hidden, index, torch.full((TOKENS, TOP_K), 0.5, device=device, dtype=dtype)).sum().backward()
    for name in block.projections:
        assert torch.equal(block.dequantized(name), before[name])
    # and the 4-bit weights are close to the tensors they were built from
    original = canonical_tensors("mixtral")["gate_up_proj"].to(device)
    relative = (before["gate_up_proj"].float() - original).norm() / original.norm()
    assert 0 < relative < 0.15


@pytest.mark.parametrize("bits", [4, 16])
def test_identical_experts_equal_one_dense_mlp(bits):
    """A block whose experts are all the same MLP computes that MLP, whatever the routing (weights sum to 1)."""
    torch.manual_seed(0)
    gate_up = torch.randn(2 * INTER, HIDDEN) * 0.2
    down = torch.randn(HIDDEN, INTER) * 0.2
    tensors = {"gate_up_proj": gate_up.expand(EXPERTS, -1, -1).clone(), "down_proj": down.expand(EXPERTS, -1, -1).clone()}
    block = build_expert_block("mixtral", tensors, bits=bits, compute_dtype=torch.float32, device="cpu", act_fn=nn.SiLU())
    hidden = torch.randn(TOKENS, HIDDEN)
    weights = F.softmax(torch.randn(TOKENS, TOP_K), -1)
    index = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(TOKENS)])
    w_gate_up, w_down = block.dequantized("gate_up_proj")[0], block.dequantized("down_proj")[0]
    gate, up = (hidden @ w_gate_up.T).chunk(2, -1)
    dense = (F.silu(gate) * up) @ w_down.T
    torch.testing.assert_close(block(hidden, index, weights), dense, rtol=1e-5, atol=1e-5)


def test_factory_refuses_wrong_tensors():
    tensors = canonical_tensors("mixtral")
    with pytest.raises(ValueError, match="down_proj"):
        build_expert_block(
            "mixtral", {**tensors, "down_proj": tensors["down_proj"][:, :, :5]}, bits=16, compute_dtype=torch.float32, device="cpu", act_fn=nn.SiLU()
        )
    with pytest.raises(ValueError, match="must be"):
        build_expert_block("phixtral", tensors, bits=16, compute_dtype=torch.float32, device="cpu", act_fn=nn.SiLU())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_never_synchronises_with_the_host(monkeypatch):
    monkeypatch.setattr(experts_module, "DEQUANTIZED_SLICE_BYTES", 1)  # row slices included
    block = make_block("mixtral", 4, "cuda", torch.bfloat16)
    router = nn.Linear(HIDDEN, EXPERTS, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(256, HIDDEN, device="cuda", dtype=torch.bfloat16)
    params = [router.weight] + [p for name, p in block.named_parameters() if "lora_" in name]

    def step():
        _loss, grads = run(block, router, hidden, lambda b, *args: b(*args))
        with torch.no_grad():  # an SGD step on the router and the LoRA factors
            torch._foreach_add_(params, [grad.to(p.dtype) for p, grad in zip(params, grads[1:])], alpha=-1e-3)

    step()  # warm-up: kernels load, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert block.path_counts == {"grouped": 2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 192, 64), (3, 200, 4096 + 64), (2, 1, 64 * 2049)], ids=["small", "ragged-program", "many-nested-blocks"])
def test_the_fused_nf4_kernel_equals_bitsandbytes_bit_for_bit(dtype, shape):
    """One Triton launch per projection gives exactly bitsandbytes' three-kernel dequantization."""
    from moekit.finetune import nf4_kernel
    from moekit.finetune.expert_storage import NF4Storage

    torch.manual_seed(0)
    storage = NF4Storage(torch.randn(shape) * torch.rand(shape[0], 1, 1) * 3, dtype, torch.uint8, "cuda")
    assert nf4_kernel.available(storage.weight)  # else both sides below would be bitsandbytes and agree trivially
    fused = storage.dequantize(dtype)
    NF4Storage.use_triton_kernel = False
    try:
        reference = storage.dequantize(dtype)
    finally:
        NF4Storage.use_triton_kernel = True
    assert fused.shape == reference.shape == shape and fused.dtype == reference.dtype == dtype
    assert torch.equal(fused, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [(0, 64), (64, 200), (128, 192)])
def test_the_fused_nf4_kernel_dequantizes_row_ranges_bit_for_bit(rows):
    from moekit.finetune.expert_storage import NF4Storage

    torch.manual_seed(0)
    shape = (3, 200, 4096 + 64)
    storage = NF4Storage(torch.randn(shape), torch.bfloat16, torch.uint8, "cuda")
    whole = storage.dequantize()
    assert torch.equal(storage.dequantize(rows=rows), whole[:, rows[0] : rows[1]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [None, (64, 192)])
def test_the_fused_nf4_kernel_writes_the_first_columns_of_a_wider_tensor_bit_for_bit(rows):
    """What the folded LoRA GEMM dequantizes into: [W | 16 other columns], the other columns untouched."""
    from moekit.finetune.expert_storage import NF4Storage

    torch.manual_seed(0)
    shape = (3, 200, 4096 + 64)
    storage = NF4Storage(torch.randn(shape), torch.bfloat16, torch.uint8, "cuda")
    assert storage.dequantizes_into_strided()
    expected = storage.dequantize(rows=rows)
    wide = torch.full((3, expected.shape[1], shape[2] + 16), 7.0, dtype=torch.bfloat16, device="cuda")
    storage.dequantize_into(wide[:, :, : shape[2]], rows=rows)
    assert torch.equal(wide[:, :, : shape[2]], expected)
    assert bool((wide[:, :, shape[2] :] == 7).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_swiglu_equals_eager_torch_forward_and_backward(dtype):
    from moekit.finetune.swiglu_kernel import weighted_silu_and_mul

    torch.manual_seed(0)
    gate_up = (torch.randn(300, 2 * 1000, device="cuda") * 3).to(dtype).requires_grad_(True)
    weights = torch.rand(300, device="cuda").requires_grad_(True)  # float32, as transformers' routers give them
    grad = torch.randn(300, 1000, device="cuda", dtype=dtype)
    outputs = {}
    for fused in (True, False):
        out = weighted_silu_and_mul(gate_up, weights, fused=fused)
        grad_gate_up, grad_weights = torch.autograd.grad(out, [gate_up, weights], grad)
        assert out.dtype == dtype and grad_weights.dtype == torch.float32
        outputs[fused] = (out.float(), grad_gate_up.float(), grad_weights)
    # float32 inside the fused kernel, one rounding at the end; eager bf16 rounds SiLU(gate) first
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for fused_tensor, eager_tensor in zip(outputs[True], outputs[False]):
        scale = eager_tensor.abs().max()
        torch.testing.assert_close(fused_tensor / scale, eager_tensor / scale, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("transposed", [False, True], ids=["x@W^T", "dy@W"])
def test_the_nf4_grouped_gemm_equals_dequantize_then_grouped_mm(transposed):
    """The grouped GEMM that reads NF4 bytes itself, compiled, in bf16 with the default tiles: an expert without
    rows, row tiles that end mid-expert."""
    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.nf4_grouped_mm import nf4_grouped_mm, supports

    torch.manual_seed(0)
    shape = (4, 512, 256)
    storage = NF4Storage(torch.randn(shape), torch.bfloat16, torch.uint8, "cuda")
    assert supports(shape, torch.bfloat16, torch.device("cuda"))
    offsets = torch.tensor([200, 200, 329, 700], dtype=torch.int32, device="cuda")
    inputs = torch.randn(700, shape[1] if transposed else shape[2], device="cuda", dtype=torch.bfloat16)
    weight = storage.dequantize()
    expected = F.grouped_mm(inputs, weight if transposed else weight.transpose(1, 2), offs=offsets)
    got = nf4_grouped_mm(inputs, storage, offsets, transposed)
    scale = expected.float().abs().max()
    torch.testing.assert_close(got.float() / scale, expected.float() / scale, rtol=1e-2, atol=4e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mixtral", "phixtral"])
def test_an_expert_block_whose_gemms_read_nf4_equals_the_dequantizing_one(family, monkeypatch):
    """Loss and gradients of a bf16 training step: the GEMMs reading the 4-bit weights, against dequantize + grouped_mm."""
    from moekit.finetune import nf4_grouped_mm
    from moekit.finetune.expert_storage import NF4Storage

    torch.manual_seed(0)
    act_fn = nn.SiLU() if family == "mixtral" else nn.GELU(approximate="tanh")
    hidden_size, inter = 256, 512
    if family == "mixtral":
        tensors = {"gate_up_proj": torch.randn(EXPERTS, 2 * inter, hidden_size) * 0.1, "down_proj": torch.randn(EXPERTS, hidden_size, inter) * 0.1}
    else:
        tensors = {"fc1.weight": torch.randn(EXPERTS, inter, hidden_size) * 0.1, "fc1.bias": torch.randn(EXPERTS, inter) * 0.1}
        tensors |= {"fc2.weight": torch.randn(EXPERTS, hidden_size, inter) * 0.1, "fc2.bias": torch.randn(EXPERTS, hidden_size) * 0.1}
    block = build_expert_block(family, tensors, bits=4, compute_dtype=torch.bfloat16, device="cuda", act_fn=act_fn)
    block.add_lora(16, 32)
    with torch.no_grad():
        for name in block.projections:
            getattr(block, f"lora_B_{name}").normal_(0, 0.05)
    router = nn.Linear(hidden_size, EXPERTS, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(300, hidden_size, device="cuda", dtype=torch.bfloat16)
    results = {}
    for in_kernel in (False, True):
        monkeypatch.setattr(NF4Storage, "use_grouped_mm_kernel", in_kernel)
        nf4_grouped_mm.launches.clear()
        results[in_kernel] = run(block, router, hidden, lambda b, *args: b(*args))
        assert nf4_grouped_mm.launches == ({"x @ W^T": 2, "dy @ W": 2} if in_kernel else {})
    (loss, grads), (kernel_loss, kernel_grads) = results[False], results[True]
    torch.testing.assert_close(kernel_loss, loss, rtol=1e-2, atol=0)
    for grad, kernel_grad in zip(grads, kernel_grads):
        scale = grad.float().abs().max()
        torch.testing.assert_close(kernel_grad.float() / scale, grad.float() / scale, rtol=3e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tiled", [False, True], ids=["slices", "nf4-gemm"])
def test_a_memory_limit_changes_only_the_calls_that_would_go_over_it_and_keeps_the_step(tiled, monkeypatch):
    """`--memory-limit`: with room for whole projections nothing changes; with none, a call dequantizes the smallest
    slices, or reads the 4-bit weight in the GEMM where that would take more than MOST_SLICES slices and the kernel
    tiles the projection; the block holds less at its peak and gives the same loss and gradients (bf16 rounding aside)."""
    torch.manual_seed(0)
    hidden_size, inter = (256, 512) if tiled else (HIDDEN, INTER)
    tensors = {"gate_up_proj": torch.randn(EXPERTS, 2 * inter, hidden_size) * 0.1, "down_proj": torch.randn(EXPERTS, hidden_size, inter) * 0.1}
    block = build_expert_block("mixtral", tensors, bits=4, compute_dtype=torch.bfloat16, device="cuda", act_fn=nn.SiLU())
    block.add_lora(RANK, 8)
    with torch.no_grad():
        for name in block.projections:
            getattr(block, f"lora_B_{name}").normal_(0, 0.05)
    router = nn.Linear(hidden_size, EXPERTS, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(300 if tiled else TOKENS, hidden_size, device="cuda", dtype=torch.bfloat16)
    results, peaks = {}, {}
    for name, limit in (("room", 10**15), ("none", 1)):
        monkeypatch.setattr(experts_module, "MEMORY_LIMIT_BYTES", limit)
        experts_module.limited_calls.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        results[name] = run(block, router, hidden, lambda b, *args: b(*args))
        peaks[name] = torch.cuda.max_memory_allocated() - start
        # both projections, forward and backward
        # no room: gate_up_proj (1,024 rows) would take 16 slices of 64 rows, down_proj (256) 4; the small block's 3 and 1
        expected = {"whole": 4} if name == "room" else {"nf4_gemm": 2, "sliced": 2} if tiled else {"sliced": 4}
        assert experts_module.limited_calls == expected, name
    assert peaks["none"] < peaks["room"], peaks
    (loss, grads), (sliced_loss, sliced_grads) = results["room"], results["none"]
    torch.testing.assert_close(sliced_loss, loss, rtol=1e-2, atol=0)
    for grad, sliced_grad in zip(grads, sliced_grads):
        scale = grad.float().abs().max()
        torch.testing.assert_close(sliced_grad.float() / scale, grad.float() / scale, rtol=3e-2, atol=2e-2)


def _tiny_trainable(family: str, bits: int):
    """A tiny 2-layer MoE with LoRA on attention and experts, trained routers and nonzero LoRA B, on the CPU."""
    from transformers import AutoModelForCausalLM

    from moekit.finetune.options import TrainingOptions
    from moekit.finetune.quantize import quantize_moe
    from moekit.finetune.targets import apply_targets
    from moekit.testing import tiny_config

    torch.manual_seed(0)
    if family == "mixtral":
        model = AutoModelForCausalLM.from_config(tiny_config("mixtral", 128), dtype=torch.float32)
    else:
        from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
        from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

        config = PhixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5)
        model = PhixtralForCausalLM(config)
    model = quantize_moe(model, bits=bits, compute_dtype=torch.float32)
    wrapped, _table = apply_targets(model, TrainingOptions(target=["attn", "experts", "gate"], gradient_checkpointing=False))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return wrapped.train()


def _nan_when_skipped(forward):
    """`_FrozenExpertLinear.forward` with a skipped product filled with NaN: anything that read it would show."""

    def filled(ctx, inputs, offsets, storage, grouped, output_needed, hidden=None, scaled_b=None):
        outputs = forward(ctx, inputs, offsets, storage, grouped, output_needed, hidden, scaled_b)
        return outputs if output_needed else outputs.fill_(float("nan"))

    return staticmethod(filled)


@pytest.mark.parametrize("variant", ["grouped", "per-expert", "lora-folded", "no-early-stop"])
@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("family, skipped_per_step", [("mixtral", 2), ("phixtral", 0)])
def test_a_recomputation_skips_the_unsaved_second_projection_and_changes_no_gradient(family, skipped_per_step, bits, variant, monkeypatch):
    """Mixtral's routing weights are applied before down_proj, so a checkpoint's recomputation of transformers'
    decoder layer leaves that GEMM out (one per layer); with the skipped product filled with NaN, the loss and every
    gradient stay bit for bit those of a step without checkpointing, on either expert path, with the LoRA folded into
    the frozen GEMM, and with torch's early stop of recomputations off. Phixtral (GELU, weights after fc2, whose
    product they then need) recomputes everything."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from moekit.finetune.experts import recomputations_skipped
    from moekit.finetune.quantize import enable_checkpointing

    monkeypatch.setattr(experts_module._FrozenExpertLinear, "forward", _nan_when_skipped(experts_module._FrozenExpertLinear.forward))
    if variant == "per-expert":
        monkeypatch.setattr(experts_module.ExpertBlock, "grouped", False)
    if variant == "lora-folded":
        monkeypatch.setattr(experts_module.ExpertBlock, "fold_lora", True)
    model = _tiny_trainable(family, bits)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with set_checkpoint_early_stop(variant != "no-early-stop"):
            loss = model(input_ids=ids, labels=ids).loss
            return loss.detach(), torch.autograd.grad(loss, params)

    plain_loss, plain_grads = step()
    assert recomputations_skipped(model) == 0
    enable_checkpointing(model)
    checkpointed_loss, checkpointed_grads = step()
    assert recomputations_skipped(model) == skipped_per_step
    assert path_counts(model)["per_expert" if variant == "per-expert" else "grouped"] > 0
    assert torch.equal(checkpointed_loss, plain_loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("router" in n or "gate.weight" in n for n in names) and any("lora_B_down_proj" in n or "lora_B_fc2" in n for n in names)
    for name, grad, plain in zip(names, checkpointed_grads, plain_grads):
        assert torch.count_nonzero(plain) > 0, name
        assert torch.equal(grad, plain), name
