"""The fused RMSNorm: transformers' own forward on the CPU, its arithmetic in one Triton launch each way on CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from moekit.finetune import rmsnorm_kernel
from moekit.finetune.rmsnorm_kernel import fuse_rms_norms
from moekit.testing import tiny_config


def _norm(columns: int, dtype: torch.dtype, device: str) -> MixtralRMSNorm:
    norm = MixtralRMSNorm(columns, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm.requires_grad_(False)


def test_fusing_routes_every_norm_and_keeps_transformers_outputs_on_the_cpu():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", 384)).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(input_ids).logits
    assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
    norms = [module for module in model.modules() if isinstance(module, MixtralRMSNorm)]
    assert all(module.forward.__func__ is rmsnorm_kernel.rms_norm for module in norms)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)  # the CPU runs the module's own forward


@pytest.mark.parametrize(
    "shape, input_dtype, weight_dtype",
    [((2, 33, 4096), torch.bfloat16, torch.bfloat16), ((5, 2560), torch.bfloat16, torch.bfloat16),
     ((3, 7, 100), torch.float32, torch.bfloat16), ((4, 512), torch.float16, torch.float32)],
    ids=["4096-columns", "2560-columns", "float32-input", "float16-float32-weight"],
)  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fused_kernels_equal_transformers_forward_and_backward(shape, input_dtype, weight_dtype):
    torch.manual_seed(0)
    norm = _norm(shape[-1], weight_dtype, "cuda")
    hidden = (torch.randn(shape, device="cuda") * 3).to(input_dtype)
    grad_out = torch.randn(shape, device="cuda").to(torch.promote_types(weight_dtype, input_dtype))
    results = {}
    for fused in (False, True):
        x = hidden.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training
            out = rmsnorm_kernel._RMSNorm.apply(x, norm.weight, norm.variance_epsilon) if fused else norm(x)
        out.backward(grad_out)
        results[fused] = (out.detach(), x.grad)
    (out, grad), (ref_out, ref_grad) = results[True], results[False]
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and grad.dtype == ref_grad.dtype
    # rsqrt and the row sums may round differently, which can move a value rounded to the input dtype by one unit in
    # its last place; a wrong formula, row or column is off by far more
    eps = max(torch.finfo(input_dtype).eps, torch.finfo(out.dtype).eps)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2 * eps, atol=1e-5)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, rtol=4 * eps, atol=4 * eps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_with_fused_norms_trains_like_transformers():
    """Loss and every LoRA gradient of a tiny QLoRA Mixtral step, fused norms against transformers' own."""
    from transformers import AutoModelForCausalLM

    from moekit.finetune.options import TrainingOptions
    from moekit.finetune.quantize import quantize_moe
    from moekit.finetune.targets import apply_targets

    torch.manual_seed(0)
    config = tiny_config("mixtral", 384)
    model = quantize_moe(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), bits=4, device="cuda")
    peft_model, _ = apply_targets(model, TrainingOptions(target="attn,experts,gate", lora_r=8, lora_alpha=16))
    fused_norms = [m for m in peft_model.modules() if isinstance(m, MixtralRMSNorm)]
    assert fused_norms and all(m.forward.__func__ is rmsnorm_kernel.rms_norm for m in fused_norms)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    input_ids = torch.randint(0, config.vocab_size, (2, 64), device="cuda")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    results = {}
    for fused in (True, False):
        rmsnorm_kernel.use_triton_kernel = fused
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = peft_model(input_ids=input_ids, labels=input_ids).loss
            results[fused] = (loss.detach(), torch.autograd.grad(loss, params))
        finally:
            rmsnorm_kernel.use_triton_kernel = True
    (loss, grads), (ref_loss, ref_grads) = results[True], results[False]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for grad, ref in zip(grads, ref_grads):
        scale = ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grad / scale, ref / scale, rtol=3e-2, atol=3e-2)
