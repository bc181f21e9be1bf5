"""moekit's host-synchronisation-free SFT loss (the one CUDA graphs capture) equals transformers' own: the token-sum
cross-entropy, the router load-balancing loss, and their gradients, for Mixtral and Phixtral, chunked or not."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moekit.finetune import causal_lm_loss
from moekit.finetune.causal_lm_loss import causal_lm_step, load_balancing_loss
from moekit.testing import tiny_config

VOCAB = 384


def make_model(arch: str):
    torch.manual_seed(0)
    if arch == "phixtral":
        from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
        from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

        config = PhixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, router_aux_loss_coef=0.02)  # fmt: skip
        return PhixtralForCausalLM(config).float().eval()
    config = tiny_config("mixtral", VOCAB, router_aux_loss_coef=0.02)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def batch(padded: bool):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, VOCAB, (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt
    out = {"input_ids": input_ids, "labels": labels}
    if padded:
        mask = torch.ones_like(input_ids)
        mask[1, 19:] = 0
        labels[1, 19:] = -100
        out["attention_mask"] = mask
    out["num_items_in_batch"] = (labels[:, 1:] != -100).sum()
    return out


@pytest.mark.parametrize("arch", ["mixtral", "phixtral"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("chunk_rows", [1024, 7], ids=["one-chunk", "chunks-of-7"])
def test_the_loss_and_its_gradients_equal_transformers(arch, padded, chunk_rows, monkeypatch):
    monkeypatch.setattr(causal_lm_loss, "CHUNK_ROWS", chunk_rows)
    model = make_model(arch)
    data = batch(padded)
    coef = model.config.router_aux_loss_coef
    inputs = {k: data[k] for k in ("input_ids", "attention_mask") if k in data}

    reference = model(**inputs, labels=data["labels"], output_router_logits=True)
    reference.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    ours = causal_lm_step(model, data, aux_loss_coef=coef)
    ours["loss"].backward()
    # transformers' loss: token-mean CE + coef * aux; with num_items_in_batch = the labelled tokens, the same
    torch.testing.assert_close(ours["loss"], reference.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["aux_loss"], reference.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    assert int(ours["tokens"]) == int(data["num_items_in_batch"])
    assert 0 <= int(ours["correct"]) <= int(ours["tokens"])
    for name, param in model.named_parameters():
        if name in expected_grads:
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(expected_grads) > 10


def test_the_load_balancing_loss_equals_transformers_with_and_without_padding():
    generator = torch.Generator().manual_seed(2)
    logits = tuple(torch.randn(12, 4, generator=generator) for _ in range(3))  # 3 layers, (tokens, experts)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    for attention_mask in (None, mask):
        torch.testing.assert_close(load_balancing_loss(logits, 4, 2, attention_mask), load_balancing_loss_func(logits, 4, 2, attention_mask))


def test_the_loss_is_divided_by_the_tokens_of_the_whole_optimizer_step():
    model = make_model("mixtral")
    data = batch(False)
    single = causal_lm_step(model, data, aux_loss_coef=None)["loss"]
    data["num_items_in_batch"] = data["num_items_in_batch"] * 4  # three more micro-batches of the same size
    assert "aux_loss" not in causal_lm_step(model, data, aux_loss_coef=None)
    torch.testing.assert_close(causal_lm_step(model, data, aux_loss_coef=None)["loss"] * 4, single)
