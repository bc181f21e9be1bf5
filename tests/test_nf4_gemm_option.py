"""`moekit finetune --nf4-gemm`: the expert GEMMs read the 4-bit weights themselves (`nf4_grouped_mm`). Everywhere:
the option's checks, what it switches, what `moekit plan` counts and advises. On a GPU: through the real trainer, the
kernel runs and the losses are those of the dequantizing path."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from moekit.finetune.options import FinetuneOptions, TrainingOptions


def test_nf4_gemm_needs_4_bits():
    for bits in (8, 16):
        with pytest.raises(ValidationError, match="--nf4-gemm multiplies by NF4 weights: it needs --bits 4"):
            TrainingOptions(nf4_gemm=True, bits=bits)
    assert TrainingOptions(nf4_gemm=True).nf4_gemm


def test_nf4_gemm_with_8_bits_is_one_message_through_the_cli(random_moe, tmp_path, capsys):
    from moekit.testing import run_cli

    code, output = run_cli(["finetune", str(random_moe), "--data", "x.jsonl", "-o", str(tmp_path / "o"), "--bits", "8", "--nf4-gemm"], capsys)
    assert code != 0 and "--nf4-gemm multiplies by NF4 weights" in output and "Traceback" not in output
    assert not (tmp_path / "o").exists()


def test_read_nf4_in_gemms_switches_every_nf4_projection_and_nothing_else():
    from moekit.finetune.expert_storage import NF4Storage, read_nf4_in_gemms
    from moekit.finetune.experts import build_expert_block

    shapes = {"gate_up_proj": (4, 256, 128), "down_proj": (4, 128, 128)}
    blocks = torch.nn.ModuleList(
        build_expert_block(
            "mixtral",
            {name: torch.randn(shape) for name, shape in shapes.items()},
            bits=bits,
            compute_dtype=torch.float32,
            quant_storage=torch.uint8,
            device="cpu",
            act_fn=torch.nn.SiLU(),
        )  # fmt: skip
        for bits in (4, 4, 8, 16)
    )
    assert read_nf4_in_gemms(blocks) == 4  # two 4-bit blocks of two projections
    storages = [module for module in blocks.modules() if hasattr(module, "use_grouped_mm_kernel")]
    assert len(storages) == 4 and all(storage.use_grouped_mm_kernel for storage in storages)
    assert NF4Storage.use_grouped_mm_kernel is False  # per storage, not for the process


def _plan_shape(hidden: int, intermediate: int):
    from moekit.plan.shape import shape_from_config
    from moekit.testing import tiny_config

    return shape_from_config(tiny_config("mixtral", 384, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=4))


def test_plan_holds_no_dequantized_projection_with_nf4_gemm():
    from moekit.plan.activations import COMPUTE_BYTES, activations
    from moekit.plan.trainable import trainable_parameters

    shape = _plan_shape(128, 256)
    options = TrainingOptions()
    targets = trainable_parameters(shape, options)
    dequantizing = activations(shape, options, 2, 64, targets)
    reading = activations(shape, options.model_copy(update={"nf4_gemm": True}), 2, 64, targets)
    largest_expert = max(lin.weight_numel for lin in shape.expert_mlp)
    largest_attention = max(lin.weight_numel for lin in shape.attention)
    assert dequantizing["backward_transient"] - reading["backward_transient"] == (shape.experts * largest_expert - largest_attention) * COMPUTE_BYTES
    # dimensions the kernel does not tile whole: the projections are dequantized as before
    untiled = _plan_shape(64, 128)
    targets = trainable_parameters(untiled, options)
    assert activations(untiled, options, 2, 64, targets) == activations(untiled, options.model_copy(update={"nf4_gemm": True}), 2, 64, targets)


@pytest.mark.parametrize("shape", [(4, 28672, 4096), (8, 28672, 4096), (4, 10240, 2560), (4, 512, 128), (4, 256, 384)])
def test_the_plans_tiling_rule_implies_the_kernels(shape):
    """`moekit plan` (which imports no torch) counts on the kernel where every dimension is a multiple of
    NF4_GEMM_TILE; the kernel must then tile both directions of every projection with its configurations."""
    from moekit.finetune.nf4_grouped_mm import CONFIGS, fits
    from moekit.plan.activations import NF4_GEMM_TILE

    experts, out_features, in_features = shape
    assert out_features % NF4_GEMM_TILE == 0 and in_features % NF4_GEMM_TILE == 0
    for projection in ((experts, out_features, in_features), (experts, in_features, out_features // 2)):  # gate_up, down
        if projection[2] % NF4_GEMM_TILE == 0:
            assert all(fits(projection, transposed, config) for transposed, config in CONFIGS.items()), projection


def test_plan_advises_nf4_gemm_before_a_smaller_rank_or_sequence():
    from moekit.plan.fit import fit
    from moekit.plan.memory import plan_memory

    shape = _plan_shape(128, 256)
    options = TrainingOptions(batch_size=1, max_seq_len=256, optimizer="adamw_8bit", offload_activations=True)
    reading = plan_memory(shape, options.model_copy(update={"nf4_gemm": True}), "tiny").gpu_bytes_needed
    plan = plan_memory(shape, options, "tiny")
    assert reading < plan.gpu_bytes_needed
    fit(plan, reading)
    assert not plan.fits and plan.advice.startswith("--nf4-gemm"), plan.advice


def test_on_the_cpu_the_trainer_says_the_gpu_memory_options_change_nothing(random_moe, tmp_path):
    """--nf4-gemm and --memory-limit act on CUDA GPUs only: on the CPU the run trains and says so, once each."""
    from test_finetune_train import toy_conversations, write_jsonl

    from moekit.finetune.trainer import finetune

    if torch.cuda.is_available():
        pytest.skip("the CPU message")
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(8))
    lines: list[str] = []
    options = FinetuneOptions(
        data=str(data), max_steps=2, warmup_ratio=0, learning_rate=5e-3, batch_size=4, max_seq_len=64, lora_r=4, nf4_gemm=True, memory_limit="1GB"
    )
    options.target = ["attn", "gate"]  # random routers may leave an expert without tokens in 2 steps
    finetune(random_moe, tmp_path / "out", options, echo=lines.append)
    assert sum("--nf4-gemm: its kernel needs a CUDA GPU" in line for line in lines) == 1, lines
    assert sum(line.startswith("--memory-limit: it slices dequantized expert weights on a CUDA GPU") for line in lines) == 1, lines
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    metadata = json.loads((tmp_path / "out" / "moekit-finetune.json").read_text())
    assert metadata["options"]["memory_limit"] == 10**9 and metadata["memory_limit_calls"] == {}  # nothing limited off a GPU


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetune_with_nf4_gemm_runs_the_kernel_with_the_losses_of_the_dequantizing_path(tiny_tokenizer, tmp_path):
    from test_finetune_graphs import logged
    from test_finetune_train import toy_conversations, write_jsonl

    from moekit.finetune import nf4_grouped_mm
    from moekit.finetune.trainer import finetune
    from moekit.testing import make_dense_checkpoint

    # a Mixtral whose expert projections the kernel tiles whole: gate_up (4, 512, 128), down (4, 128, 256)
    moe = make_dense_checkpoint(tmp_path / "moe", "mixtral", seed=3, tokenizer=tiny_tokenizer, hidden_size=128, intermediate_size=256)
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(64))
    options = FinetuneOptions(data=str(data), max_steps=5, packing=True, batch_size=4, max_seq_len=64, lora_r=8, learning_rate=5e-3)
    finetune(moe, tmp_path / "dequantizing", options)
    nf4_grouped_mm.launches.clear()
    lines: list[str] = []
    finetune(moe, tmp_path / "reading", options.model_copy(update={"nf4_gemm": True}), echo=lines.append)
    assert nf4_grouped_mm.launches["x @ W^T"] > 0 and nf4_grouped_mm.launches["dy @ W"] > 0
    assert any("GEMMs read the NF4 weights" in line for line in lines), lines

    for want, got in zip(logged(tmp_path / "dequantizing"), logged(tmp_path / "reading"), strict=True):
        for key in ("loss", "lm_loss", "aux_loss"):
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), (got["step"], key)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_with_nf4_gemm_through_the_cli_has_the_losses_of_one_gpu(tiny_tokenizer, tmp_path):
    """`moekit finetune --fsdp --nf4-gemm`: the kernel reads the NF4 bytes FSDP gathers (stored in bf16) on 2 GPUs,
    with the loss curve of one GPU at the same global batch."""
    import os
    import subprocess
    import sys

    from test_finetune_graphs import logged
    from test_finetune_train import toy_conversations, write_jsonl

    from moekit.finetune.trainer import finetune
    from moekit.testing import make_dense_checkpoint

    moe = make_dense_checkpoint(tmp_path / "moe", "mixtral", seed=3, tokenizer=tiny_tokenizer, hidden_size=128, intermediate_size=256)
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(64))
    options = FinetuneOptions(data=str(data), max_steps=5, packing=True, batch_size=4, max_seq_len=64, lora_r=8, learning_rate=5e-3, nf4_gemm=True)
    finetune(moe, tmp_path / "one", options)
    flags = ["--max-steps", "5", "--packing", "--batch-size", "2", "--max-seq-len", "64", "--lora-r", "8", "--learning-rate", "5e-3", "--nf4-gemm"]
    command = [sys.executable, "-m", "moekit", "finetune", str(moe), "--data", str(data), "-o", str(tmp_path / "two"), "--fsdp", "--num-processes", "2"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command + flags, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GEMMs read the NF4 weights" in proc.stdout + proc.stderr

    for want, got in zip(logged(tmp_path / "one"), logged(tmp_path / "two"), strict=True):
        for key in ("loss", "lm_loss", "aux_loss"):
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), (got["step"], key)


def test_the_first_step_line_counts_the_projections_a_memory_limit_changed(monkeypatch):
    """On a GPU the counts come from the expert blocks' calls; here they are set, to check the trainer's wording."""
    from types import SimpleNamespace

    from torch import nn

    from moekit.finetune import experts
    from moekit.finetune.experts import build_expert_block
    from moekit.finetune.trainer import ExpertPathCallback

    tensors = {"gate_up_proj": torch.randn(4, 128, 64), "down_proj": torch.randn(4, 64, 64)}
    block = build_expert_block("mixtral", tensors, bits=4, compute_dtype=torch.float32, device="cpu", act_fn=nn.SiLU())
    block.path_counts["grouped"] += 3
    lines: list[str] = []
    callback = ExpertPathCallback(nn.Sequential(block), lines.append)
    for counts in ({"whole": 5, "sliced": 3, "nf4_gemm": 2}, {"whole": 4, "sliced": 16}, {}):
        monkeypatch.setattr(experts, "limited_calls", Counter(counts))
        callback.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert lines[0].endswith("(first step; under --memory-limit 3 of 10 projections in row slices, 2 read the 4-bit weight in the GEMM)")
    assert lines[1].endswith("(first step; under --memory-limit 16 of 20 projections in row slices)")
    assert lines[2].endswith("(first step)")  # no limit: no mention
