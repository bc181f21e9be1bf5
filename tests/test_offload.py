"""`--offload-activations` (`moekit.finetune.offload`): the checkpointed layers' inputs live in pinned CPU memory
between forward and backward. On a GPU: the same losses and gradients as without, eagerly and replayed from a CUDA
graph, and the inputs really leave the GPU. Everywhere: the option's checks and what `moekit plan` counts."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moekit.finetune.options import TrainingOptions

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(ValidationError, match="needs --gradient-checkpointing"):
        TrainingOptions(offload_activations=True, gradient_checkpointing=False)
    assert TrainingOptions(offload_activations=True).offload_activations


def test_plan_keeps_one_checkpointed_input_on_the_gpu():
    from moekit.plan.activations import activations
    from moekit.plan.shape import shape_from_config
    from moekit.plan.trainable import trainable_parameters
    from moekit.testing import tiny_config

    shape = shape_from_config(tiny_config("mixtral", 384, num_hidden_layers=6))
    options = TrainingOptions()
    targets = trainable_parameters(shape, options)
    kept = activations(shape, options, 2, 64, targets)
    offloaded = activations(shape, options.model_copy(update={"offload_activations": True}), 2, 64, targets)
    assert kept["checkpoints"] == 6 * kept["checkpoint_input"]
    assert offloaded["checkpoints"] == kept["checkpoint_input"]


def test_fsdp_with_offload_is_refused(random_moe, tmp_path, capsys):
    from test_finetune_train import run_cli

    code, output = run_cli(
        ["finetune", str(random_moe), "--data", "x.jsonl", "-o", str(tmp_path / "o"), "--fsdp", "--num-processes", "2", "--offload-activations"], capsys
    )
    assert code != 0 and "--offload-activations is not verified under --fsdp" in output and "Traceback" not in output


def test_on_the_cpu_nothing_moves():
    from moekit.finetune.offload import CheckpointInputOffload

    offload = CheckpointInputOffload()
    tensor = torch.ones(2, 3, 8)
    assert offload.pack(tensor) is tensor and offload.unpack(tensor) is tensor


# --- GPU ---------------------------------------------------------------------------------------------------------


@GPU
@pytest.mark.gpu
def test_offloaded_steps_equal_plain_steps_eagerly_and_replayed():
    from test_cuda_graph import assert_close_steps, batches, make_model, step_fn, train

    from moekit.finetune.cuda_graph import CapturedStep
    from moekit.finetune.offload import CheckpointInputOffload

    data = batches(4)
    plain = train(make_model(), data, captured=False)[:2]
    for captured in (False, True):
        model = make_model()
        offload = CheckpointInputOffload()
        plain_step = step_fn(model)

        def offloaded(batch, model=model, offload=offload, plain_step=plain_step):
            with offload.hooks(model.config.hidden_size):
                return plain_step(batch)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        run = CapturedStep(offloaded, params) if captured else None
        losses, grads = [], []
        for batch in data:
            if run is not None:
                outputs = run(batch)
            else:
                outputs = offloaded(batch)
                outputs["loss"].backward()
            losses.append(float(outputs["loss"]))
            grads.append([p.grad.detach().clone() for p in params])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert_close_steps(plain, (losses, grads))
        assert len(offload.free) >= model.config.num_hidden_layers  # every layer's input went through a CPU buffer
        if run is not None:
            assert run.replays == 3 and run.failure is None


@GPU
@pytest.mark.gpu
def test_checkpointed_inputs_leave_the_gpu():
    """After the forward pass, the GPU holds every layer's input without offloading and only one with it."""
    from test_cuda_graph import make_model

    from moekit.finetune.causal_lm_loss import causal_lm_step
    from moekit.finetune.offload import CheckpointInputOffload

    layers, batch, seq, hidden = 6, 2, 512, 256
    model = make_model(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=512, max_position_embeddings=seq)
    ids = torch.randint(4, 384, (batch, seq), device="cuda")
    inputs = {"input_ids": ids, "labels": ids, "num_items_in_batch": (ids[:, 1:] != -100).sum()}
    input_bytes = batch * seq * hidden * 2  # one layer's bf16 input

    def held_after_forward(offload):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            with offload.hooks(hidden) if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                outputs = causal_lm_step(model, inputs, aux_loss_coef=None)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        outputs["loss"].backward()
        model.zero_grad(set_to_none=True)
        return held

    held_after_forward(CheckpointInputOffload())  # first use: pinned buffers, cuBLAS workspaces
    kept, offloaded = held_after_forward(None), held_after_forward(CheckpointInputOffload())
    assert kept - offloaded >= (layers - 1) * input_bytes, (kept, offloaded, input_bytes)


@GPU
@pytest.mark.gpu
def test_finetune_with_offload_replays_its_steps_with_the_same_losses(random_moe, tmp_path):
    import json

    from test_finetune_train import QUICK, toy_conversations, write_jsonl

    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import finetune

    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(64))
    options = FinetuneOptions(data=str(data), max_steps=4, packing=True, **QUICK)
    finetune(random_moe, tmp_path / "plain", options)
    finetune(random_moe, tmp_path / "offloaded", options.model_copy(update={"offload_activations": True}))
    graphs = json.loads((tmp_path / "offloaded" / "moekit-finetune.json").read_text())["cuda_graphs"]
    assert graphs["used"] and graphs["replayed"] == 3

    def logged(out):
        return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line]

    for want, got in zip(logged(tmp_path / "plain"), logged(tmp_path / "offloaded"), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2), got["step"]
