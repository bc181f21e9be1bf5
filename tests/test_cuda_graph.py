"""A training step captured as a CUDA graph (`moekit.finetune.cuda_graph`) equals the eager step: losses and gradients
over several optimizer steps of a 4-bit MoE with LoRA on attention and experts and trained routers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune_train import QUICK, toy_conversations, write_jsonl

from moekit.finetune.causal_lm_loss import causal_lm_step
from moekit.finetune.cuda_graph import CapturedStep
from moekit.finetune.options import FinetuneOptions, TrainingOptions
from moekit.finetune.quantize import enable_checkpointing, quantize_moe
from moekit.finetune.targets import apply_targets
from moekit.finetune.trainer import finetune
from moekit.testing import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VOCAB = 384


def make_model(**overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("mixtral", VOCAB, output_router_logits=True, router_aux_loss_coef=0.01, **overrides)
    model = quantize_moe(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), bits=4, device="cuda")
    wrapped, _table = apply_targets(model, TrainingOptions(target=["attn", "experts", "gate"]))
    with torch.no_grad():  # LoRA B starts at zero: give every factor a value, so every gradient path carries signal
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    enable_checkpointing(wrapped, preserve_rng_state=False)
    wrapped.train()
    return wrapped


def make_phixtral():
    """A tiny Phixtral (fc1/fc2 experts with biases, gelu_new, LayerNorm) in 4-bit with LoRA and trained routers."""
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

    torch.manual_seed(0)
    config = PhixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            partial_rotary_factor=0.5, output_router_logits=True, router_aux_loss_coef=0.01)  # fmt: skip
    model = quantize_moe(PhixtralForCausalLM(config).to(torch.bfloat16), bits=4, device="cuda")
    wrapped, _table = apply_targets(model, TrainingOptions(target=["attn", "experts", "gate"]))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    enable_checkpointing(wrapped, preserve_rng_state=False)
    return wrapped.train()


def step_fn(model):
    def run(batch):  # the trainer's loss, router loss included
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return causal_lm_step(model, batch, aux_loss_coef=0.01)

    return run


def batches(count, shape=(2, 48)):
    generator = torch.Generator(device="cuda").manual_seed(1)
    ids = [torch.randint(4, VOCAB, shape, device="cuda", generator=generator) for _ in range(count)]
    return [{"input_ids": x, "labels": x, "num_items_in_batch": (x[:, 1:] != -100).sum()} for x in ids]


def train(model, data, captured: bool, accumulate: int = 1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    run = CapturedStep(step_fn(model), params) if captured else None
    losses, grads = [], []
    for index, batch in enumerate(data):
        if run is not None:
            outputs = run(batch)
        else:
            outputs = step_fn(model)(batch)
            outputs["loss"].backward()
        losses.append(float(outputs["loss"]))
        if (index + 1) % accumulate == 0:
            grads.append([p.grad.detach().clone() for p in params])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, grads, run


def assert_close_steps(eager, graphed):
    (eager_losses, eager_grads), (graph_losses, graph_grads) = eager, graphed
    # the same kernels on the same inputs; only float atomics (index_add_ of expert outputs) reorder sums
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for step, (expected, actual) in enumerate(zip(eager_grads, graph_grads)):
        for e, a in zip(expected, actual):
            scale = e.abs().max().clamp(min=1e-6)
            assert (a - e).abs().max() / scale < 2e-2, f"step {step}"


def test_replayed_steps_equal_eager_steps():
    data = batches(5)
    eager = train(make_model(), data, captured=False)[:2]
    losses, grads, run = train(make_model(), data, captured=True)
    assert run.replays == 4 and run.eager_steps == 1  # step 1 warms up, step 2 captures and replays
    assert_close_steps(eager, (losses, grads))
    assert losses[0] != losses[-1]  # the optimizer steps reached the captured model


def test_phixtral_replayed_steps_equal_eager_steps():
    # its gelu_new runs in float32 under autocast; the expert block casts it back, or the second GEMM would fall back
    # to torch's float32 grouped GEMM, which reads the offsets on the host (the capture fails)
    data = batches(4)
    eager = train(make_phixtral(), data, captured=False)[:2]
    losses, grads, run = train(make_phixtral(), data, captured=True)
    assert run.failure is None and run.replays == 3
    assert_close_steps(eager, (losses, grads))


def test_gradients_accumulate_over_replays_as_over_eager_steps():
    data = batches(6)
    eager = train(make_model(), data, captured=False, accumulate=2)[:2]
    losses, grads, run = train(make_model(), data, captured=True, accumulate=2)
    # step 1 warms up, step 2 (not from zero gradients) runs eagerly, then fresh and accumulating graphs alternate
    assert (run.replays, run.eager_steps, sorted(run.graphs)) == (4, 2, [False, True])
    assert_close_steps(eager, (losses, grads))


def test_a_batch_of_another_shape_runs_eagerly_and_its_gradients_are_kept():
    data = batches(3) + batches(1, shape=(1, 40)) + batches(1)
    eager = train(make_model(), data, captured=False)[:2]
    losses, grads, run = train(make_model(), data, captured=True)
    assert (run.replays, run.eager_steps) == (3, 2)
    assert_close_steps(eager, (losses, grads))


def test_a_captured_step_never_synchronises_with_the_host():
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    run = CapturedStep(step_fn(model), params)
    data = batches(3)
    for index, batch in enumerate(data):
        if index == 2:  # warm-up and capture done: a replay must not wait for the GPU
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            run(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for param in params:
            param.grad = None
    assert run.replays == 2


FAILING_CAPTURE = """
import json, torch, test_cuda_graph as t
from moekit.finetune.cuda_graph import CapturedStep
model = t.make_model()
params = [p for p in model.parameters() if p.requires_grad]
plain = t.step_fn(model)

def synchronising(batch):
    outputs = plain(batch)
    outputs["loss_on_host"] = torch.tensor(float(outputs["loss"]))  # waits for the GPU: cannot be captured
    return outputs

run = CapturedStep(synchronising, params)
losses = []
for batch in t.batches(3):
    losses.append(float(run(batch)["loss"]))
    for p in params:
        p.grad = None
print(json.dumps({"failure": run.failure, "replays": run.replays, "eager": run.eager_steps, "losses": losses,
                  "default_stream": torch.cuda.current_stream() == torch.cuda.default_stream()}))
"""


def test_a_step_that_cannot_be_captured_runs_eagerly_from_then_on():
    # in a process of its own: a failed capture leaves torch's CUDA random generator unusable for later tests
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FAILING_CAPTURE], capture_output=True, text=True, cwd=tests, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failure"] and result["replays"] == 0 and result["eager"] == 3 and result["default_stream"]
    assert all(loss == loss and loss > 0 for loss in result["losses"])  # finite: the eager steps ran


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_finetune_replays_its_steps_and_logs_the_losses_of_eager_steps(random_moe, tmp_path, grad_accum):
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(64))
    options = FinetuneOptions(data=str(data), max_steps=5, packing=True, grad_accum=grad_accum, **{**QUICK, "batch_size": 2})
    finetune(random_moe, tmp_path / "eager", options.model_copy(update={"cuda_graphs": False}))
    finetune(random_moe, tmp_path / "graph", options)
    graphs = json.loads((tmp_path / "graph" / "moekit-finetune.json").read_text())["cuda_graphs"]
    micro_steps = 5 * grad_accum
    # the first micro-step warms up; with accumulation the second too (it does not start from zero gradients)
    assert graphs == {"used": True, "replayed": micro_steps - grad_accum, "eager": grad_accum, "failure": None}

    def logged(out):
        return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line]

    for want, got in zip(logged(tmp_path / "eager"), logged(tmp_path / "graph"), strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), (got["step"], key)
        assert got["mean_token_accuracy"] == pytest.approx(want["mean_token_accuracy"], abs=0.03)  # a bf16 tie may flip a token


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_through_the_cli_replays_its_steps_with_the_losses_of_one_gpu(random_moe, tmp_path):
    """`moekit finetune --ddp --num-processes 2`: each process replays its steps from a CUDA graph (no DDP wrapper,
    gradients averaged by the trainer), with the loss curve of one GPU at the same global batch."""
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(64))
    options = FinetuneOptions(data=str(data), max_steps=5, packing=True, **QUICK)  # batch 4
    finetune(random_moe, tmp_path / "one", options)
    flags = ["--max-steps", "5", "--packing", "--batch-size", "2", "--max-seq-len", "64", "--lora-r", "8", "--learning-rate", "5e-3"]
    command = [sys.executable, "-m", "moekit", "finetune", str(random_moe), "--data", str(data), "-o", str(tmp_path / "two"), "--ddp", "--num-processes", "2"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command + flags, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    graphs = json.loads((tmp_path / "two" / "moekit-finetune.json").read_text())["cuda_graphs"]
    assert graphs == {"used": True, "replayed": 4, "eager": 1, "failure": None}  # rank 0's: the first step warms up

    def logged(out):
        return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line]

    for want, got in zip(logged(tmp_path / "one"), logged(tmp_path / "two"), strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), (got["step"], key)
