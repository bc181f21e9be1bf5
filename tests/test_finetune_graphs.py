"""The trainer's CUDA-graph step path (`MoeSFTTrainer.training_step` over `CapturedStep` and `causal_lm_step`):
when graphs are used and why not, and, on the CPU (where the same step runs eagerly), the same logged losses and
metrics as TRL's own step. The capture itself: test_cuda_graph.py (GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune_train import QUICK, toy_conversations, write_jsonl

from moekit.finetune import trainer as trainer_module
from moekit.finetune.options import FinetuneOptions
from moekit.finetune.trainer import cuda_graphs_refusal, finetune
from moekit.testing import tiny_config

CUDA = torch.device("cuda")  # only its type is read


def tiny_model(**overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config("mixtral", 384, **overrides))


def test_graphs_are_used_only_where_a_step_can_be_captured(monkeypatch):
    model = tiny_model()
    options = FinetuneOptions(data="x", packing=True)
    assert cuda_graphs_refusal(model, options, None, CUDA) is None
    assert cuda_graphs_refusal(model, options.model_copy(update={"cuda_graphs": False}), None, CUDA) == "--no-cuda-graphs"
    assert cuda_graphs_refusal(model, options, None, torch.device("cpu")) == "not on a GPU"
    assert "--packing" in cuda_graphs_refusal(model, options.model_copy(update={"packing": False}), None, CUDA)
    assert "distillation" in cuda_graphs_refusal(model, options, object(), CUDA)
    assert "dropout" in cuda_graphs_refusal(model, options.model_copy(update={"lora_dropout": 0.05}), None, CUDA)
    assert "router_jitter_noise" in cuda_graphs_refusal(tiny_model(router_jitter_noise=0.1), options, None, CUDA)
    assert "attention_dropout" in cuda_graphs_refusal(tiny_model(attention_dropout=0.1), options, None, CUDA)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in cuda_graphs_refusal(model, options, None, CUDA)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cuda_graphs_refusal(tiny_model(), options, None, CUDA) is None  # DDP: the gradients are averaged after the step
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "FSDP" in cuda_graphs_refusal(tiny_model(), options, None, CUDA)


def test_dropout_modules_turn_graphs_off():
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

    options = FinetuneOptions(data="x", packing=True)
    config = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    phi = PhixtralForCausalLM(PhixtralConfig(**config, resid_pdrop=0.1))
    assert "resid_pdrop" in cuda_graphs_refusal(phi, options, None, CUDA)
    phi.config.resid_pdrop = 0.0  # the dropout modules on their own
    assert "dropout is on" in cuda_graphs_refusal(phi, options, None, CUDA)
    phi.config.resid_pdrop = 0.0
    for module in phi.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert cuda_graphs_refusal(phi, options, None, CUDA) is None


def logged(out):
    return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_graph_step_path_logs_what_trls_step_logs(random_moe, tmp_path, monkeypatch, grad_accum):
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(48))
    options = FinetuneOptions(data=str(data), max_steps=3, packing=True, grad_accum=grad_accum, **{**QUICK, "batch_size": 2})
    finetune(random_moe, tmp_path / "trl", options)
    monkeypatch.setattr(trainer_module, "cuda_graphs_refusal", lambda *args: None)  # the graph path; eager on the CPU
    finetune(random_moe, tmp_path / "graph", options)
    expected, actual = logged(tmp_path / "trl"), logged(tmp_path / "graph")
    assert [r["step"] for r in actual] == [1, 2, 3]
    for want, got in zip(expected, actual):
        # the graph path pads packed rows to batch x max-seq-len: the padding counts nowhere
        for key in ("loss", "lm_loss", "aux_loss", "mean_token_accuracy", "entropy", "grad_norm", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=2e-4, abs=1e-6), (got["step"], key)


def test_packed_examples_become_rows_of_max_seq_len_with_a_token_mask():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = trainer_module._packed_rows(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8))
    examples = [{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]}, {"input_ids": [10, 11, 12], "seq_lengths": [3]}]
    batch = collate(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "token_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [10, 11, 12, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch["token_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    # nothing is predicted across a sequence start or in the padding
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9, -100, -100, -100], [-100, 11, 12, -100, -100, -100, -100, -100]]


# 2 processes of batch 1 with --grad-accum 2: the global batch (4 sequences) of one process of batch 4
DDP_OPTIONS = {"max_seq_len": 64, "lora_r": 8, "learning_rate": 5e-3, "lora_dropout": 0.0, "max_steps": 3, "save_steps": 1000, "packing": True}


def test_the_graph_step_path_under_ddp_follows_one_process(random_moe, tmp_path):
    """With several processes the graph path trains the model without a DDP wrapper: it starts every process from rank
    0's weights (`broadcast_parameters`) and averages the gradients at the end of each accumulation cycle
    (`average_gradients`). 2 processes (gloo, under torchrun; rank 1 starts from other LoRA weights) must follow the
    loss curve of one process with the same global batch through TRL's step."""
    data = write_jsonl(tmp_path / "chat.jsonl", toy_conversations(48))
    finetune(random_moe, tmp_path / "one", FinetuneOptions(data=str(data), batch_size=4, **DDP_OPTIONS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    command += [str(random_moe), str(data), str(tmp_path / "two")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    expected, actual = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [r["step"] for r in actual] == [1, 2, 3]
    for want, got in zip(expected, actual):
        for key in ("loss", "lm_loss", "aux_loss", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=2e-3, abs=1e-5), (got["step"], key)
    assert actual[-1]["lm_loss"] < actual[0]["lm_loss"]


def _other_start_on_rank_1(apply_targets):
    """apply_targets, with other LoRA weights on rank 1: the trainer must start every process from rank 0's."""

    def apply(*args, **kwargs):
        model, table = apply_targets(*args, **kwargs)
        if os.environ["RANK"] == "1":
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.add_(torch.randn_like(param), alpha=0.1)
        return model, table

    return apply


if __name__ == "__main__":  # a rank of the DDP test above, started by torchrun
    from moekit.finetune import targets

    torch.set_num_threads(1)
    trainer_module.cuda_graphs_refusal = lambda *args: None  # the graph path; eager on the CPU
    targets.apply_targets = _other_start_on_rank_1(targets.apply_targets)
    moe, data, out = sys.argv[1:]
    finetune(moe, out, FinetuneOptions(data=data, batch_size=1, grad_accum=2, **DDP_OPTIONS))
