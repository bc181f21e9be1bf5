"""`moekit finetune --ddp / --fsdp`: several processes on CPUs (gloo), compared with one process.

- DDP through the real CLI (`--ddp --num-processes 2`, which re-runs the command under `accelerate launch`
  with moekit's ddp.yaml): the same data and seed with the global batch held equal (2 x 2 vs 1 x 4) give
  the loss curve of one process; rank 0 alone writes; the adapter loads with plain PEFT and exports; a
  checkpoint of the 2-process run resumes in one process.
- FSDP cannot run through accelerate on CPUs (its launcher falls back to DDP there, so `--fsdp` refuses).
  What FSDP does to moekit's model is checked with torch's FSDP itself, wrapped the way accelerate and the
  Trainer wrap it (PEFT's auto-wrap policy, FULL_SHARD, use_orig_params, 4-bit storage in the compute dtype):
  `python tests/test_finetune_distributed.py` is the worker, started by torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune_train import changed_tensors, run_cli, toy_conversations, write_jsonl

from moekit.finetune.options import FinetuneOptions
from moekit.finetune.trainer import finetune, partial_dir

STEPS = 4
# lora_dropout 0: each process would draw its own dropout masks
COMMON = {"max_seq_len": 64, "lora_r": 8, "learning_rate": 5e-3, "lora_dropout": 0.0, "max_steps": STEPS, "save_steps": 2}


def launch_env() -> dict:
    # one intra-op thread per process (see tests/conftest.py), no Hub access
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def losses(out: Path, key: str = "lm_loss") -> list[float]:
    return [r[key] for r in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def moe(tmp_path_factory, llama_family) -> Path:
    from test_build import recipe_text

    from moekit.build import BuildOptions, build
    from moekit.recipe import parse_recipe

    out = tmp_path_factory.mktemp("distributed") / "moe"
    build(parse_recipe(recipe_text(llama_family, "random")), out, BuildOptions(device="cpu"))
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", toy_conversations())


@pytest.fixture(scope="module")
def one_process(moe, chat_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    finetune(moe, out, FinetuneOptions(data=str(chat_data), batch_size=4, **COMMON))
    return out


@pytest.fixture(scope="module")
def two_processes(moe, chat_data, tmp_path_factory) -> tuple[Path, str]:
    """The real CLI with --ddp: 2 processes of batch 2 (the global batch of one process of batch 4)."""
    out = tmp_path_factory.mktemp("two") / "run"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in COMMON.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "finetune", str(moe), "--data", str(chat_data), "-o", str(out), "--ddp", "--num-processes", "2", "--batch-size", "2", *flags],
        capture_output=True, text=True, env=launch_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_two_process_ddp_follows_the_one_process_loss_curve(one_process, two_processes):
    out, stdout = two_processes
    assert "accelerate launch --config_file" in stdout and "ddp.yaml --num_processes 2" in stdout
    ours, reference = losses(out), losses(one_process)
    assert len(ours) == len(reference) == STEPS
    # same first step (same weights, same 4 sequences); later steps within float32 reduction-order noise
    assert ours == pytest.approx(reference, rel=2e-3), (ours, reference)
    assert losses(out, "loss") == pytest.approx(losses(one_process, "loss"), rel=2e-3)
    assert ours[-1] < ours[0]


def test_only_rank_0_writes_and_reports(two_processes, one_process):
    out, stdout = two_processes
    assert stdout.count("trained 4 steps") == 1 and stdout.count("trainable:") == 1
    assert [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line] == [1, 2, 3, 4]
    assert {p.name for p in out.iterdir()} == {p.name for p in one_process.iterdir()}
    assert not partial_dir(out).exists()
    metadata = json.loads((out / "moekit-finetune.json").read_text())
    assert metadata["steps"] == STEPS and metadata["options"]["batch_size"] == 2


def test_two_process_adapter_loads_and_exports(two_processes, one_process, moe, tmp_path, capsys, tiny_tokenizer):
    from safetensors.torch import load_file

    from moekit.finetune.adapter import load_adapter
    from moekit.finetune.quantize import load_moe_for_training

    out, _ = two_processes
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(one_process / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key in ours:  # the same training, so the same adapter up to float noise (Adam amplifies it where gradients are ~0)
        assert (ours[key] - reference[key]).norm() <= 0.02 * reference[key].norm(), key
    base = load_moe_for_training(moe, bits=16, compute_dtype=torch.float32, device_map="cpu")
    _model, counts = load_adapter(base, out / "adapter")  # every tensor matched (it raises otherwise)
    assert counts["expert_blocks"] == 2 and counts["routers"] == 2
    exported = tmp_path / "exported"
    code, output = run_cli(["export", str(out), "-o", str(exported)], capsys)
    assert code == 0, output
    changed = changed_tensors(moe, exported)
    assert {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)} <= changed
    assert any(".experts.2.w2." in key for key in changed) and any("self_attn.q_proj" in key for key in changed)


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, moe, chat_data, tmp_path):
    out, _ = two_processes
    resumed_out = tmp_path / "resumed"
    staging = partial_dir(resumed_out)
    shutil.copytree(out / "checkpoints" / "checkpoint-2", staging / "checkpoints" / "checkpoint-2")
    shutil.copy(out / "training_log.jsonl", staging / "training_log.jsonl")
    result = finetune(moe, resumed_out, FinetuneOptions(data=str(chat_data), batch_size=4, resume=True, **COMMON))
    assert result.steps == STEPS
    assert losses(resumed_out) == pytest.approx(losses(one_process), rel=2e-3)


def test_fsdp_refuses_a_machine_without_gpus(moe, chat_data, tmp_path, capsys):
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--fsdp", "--num-processes", "2"], capsys)
    assert code != 0 and "--fsdp needs GPUs" in output and "--ddp" in output and "Traceback" not in output
    assert not (tmp_path / "o").exists()


def test_launch_options_are_checked(moe, chat_data, tmp_path, capsys):
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--ddp"], capsys)
    assert code != 0 and "--ddp needs at least 2 processes" in output
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--num-processes", "2"], capsys)
    assert code != 0 and "--num-processes needs --fsdp or --ddp" in output
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--fsdp", "--bits", "8"], capsys)
    assert code != 0 and "--fsdp needs --bits 4 or 16" in output
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--fsdp", "--resume"], capsys)
    assert code != 0 and "--resume under FSDP is not supported" in output and "without --fsdp" in output


def test_a_run_launched_under_fsdp_refuses_resume(moe, chat_data, tmp_path, capsys, monkeypatch):
    (tmp_path / "o.partial" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--resume"], capsys)
    assert code != 0 and "--resume under FSDP is not supported" in output and "Traceback" not in output
    assert (tmp_path / "o.partial" / "checkpoints" / "checkpoint-3").is_dir()  # the checkpoint is kept for a one-GPU resume
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "used"), "--ddp", "--num-processes", "2", "--target", "attn,experts", "--experts", "5"], capsys)
    assert code != 0 and "exists and is not empty" in output and "launching" not in output  # checked once, before launching


def test_shipped_configs_are_package_data_and_say_what_the_trainer_relies_on():
    import yaml

    from moekit.finetune.distributed import config_path

    fsdp = yaml.safe_load(config_path("fsdp").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    settings = fsdp["fsdp_config"]
    assert settings["fsdp_version"] == 1 and settings["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert settings["fsdp_use_orig_params"] is True and settings["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert settings["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert yaml.safe_load(config_path("ddp").read_text())["distributed_type"] == "MULTI_GPU"


# --- FSDP on CPUs, with torch's FSDP directly ----------------------------------------------------


def test_fsdp_shards_4bit_experts_and_gathers_the_adapter(moe, tmp_path):
    """2 processes: FSDP over moekit's NF4 model (storage float32) gives the one-process gradients and update."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(moe), str(tmp_path)],
        capture_output=True, text=True, env=launch_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "fsdp_report.json").read_text())
    assert report["flat_parameters"] >= 2 and report["expert_nf4_tensors_before_wrap"] == 2 * 2  # gate_up, down per layer
    # the grouped path ran under FSDP, never the per-expert fallback (2 layers, one forward)
    assert report["expert_paths_under_fsdp"] == {"grouped": 2, "per_expert": 0}
    assert report["adapter_load_counts"]["expert_blocks"] == 2
    # unit by unit, only what trains: the same names and values as gathering the whole model
    assert report["gathered_names"] == report["full_gather_names"] and report["gathered_vs_full_gather"] == 0.0
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=1e-5)
    assert report["max_update_difference"] < 1e-5, report
    assert report["adapter_keys"] == report["reference_adapter_keys"]
    assert report["adapter_max_difference"] < 1e-5
    assert report["optimizer_state_max_difference"] < 1e-5  # FSDP's optimizer file resumes on one process


def _fsdp_worker(moe: str, out: str) -> None:
    """Rank 0 and 1 under torchrun: FSDP-wrapped training step vs the same step on one unwrapped copy."""
    import functools

    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from moekit.finetune.adapter import adapter_layout, load_adapter, save_adapter
    from moekit.finetune.distributed import gathered_trainable, optimizer_state_from_fsdp
    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.experts import path_counts
    from moekit.finetune.options import TrainingOptions
    from moekit.finetune.quantize import load_moe_for_training
    from moekit.finetune.trainer import _router_modules
    from moekit.finetune.targets import (
        apply_targets,
        snapshot_trainable,
        verify_changed,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    options = TrainingOptions(lora_r=8, lora_dropout=0.0, gradient_checkpointing=False)
    # what the trainer loads under FSDP on a CPU: NF4 weights stored in the compute dtype
    load = functools.partial(load_moe_for_training, moe, bits=4, compute_dtype=torch.float32, device_map="cpu", quant_storage=torch.float32)

    def adapted():
        torch.manual_seed(0)
        model, _ = apply_targets(load(), options)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():  # LoRA B starts at zero; make every adapter take part in the gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02, generator=generator)
        return model

    model = adapted()
    expert_nf4 = sum(1 for module in model.modules() if isinstance(module, NF4Storage))
    snapshot = snapshot_trainable(model)
    layout = adapter_layout(model, _router_modules(model))  # before wrapping, as MoeSFTTrainer does
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(1))  # (sequences, tokens), no padding

    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True, device_id=torch.device("cpu"),
    )  # fmt: skip
    flat = sum(1 for module in wrapped.modules() if isinstance(module, FullyShardedDataParallel))
    half = batch[rank * 2 : rank * 2 + 2]
    before_paths = path_counts(model)
    loss = wrapped(input_ids=half, labels=half).loss
    loss.backward()  # FSDP averages the gradients of the two halves: the gradient of the mean over 4
    # FSDP hands the packed 4-bit weights to the blocks as plain views of its flat parameters
    paths = {path: count - before_paths[path] for path, count in path_counts(model).items()}
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    optimizer.step()  # the first step of momentum SGD moves by lr * gradient and keeps the gradient as state
    fsdp_optimizer_state = FullyShardedDataParallel.optim_state_dict(wrapped, optimizer)  # what the Trainer saves
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())

    trained = gathered_trainable(wrapped)  # what the trainer saves, unit by unit
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):  # the whole model, for comparison
        everything = {name: param.detach().clone() for name, param in wrapped.named_parameters() if param.requires_grad}
    if rank == 0:
        verify_changed(snapshot, trained)
        save_adapter(model, Path(out) / "adapter", parameters=trained, layout=layout)
    dist.barrier()
    if rank == 0:
        reference = adapted()
        reference_loss = reference(input_ids=batch, labels=batch).loss
        reference_loss.backward()
        trainable = [p for p in reference.parameters() if p.requires_grad]
        reference_optimizer = torch.optim.SGD(trainable, lr=1.0, momentum=0.9)
        reference_optimizer.step()
        # resuming the FSDP optimizer state on one process
        resumed_optimizer = torch.optim.SGD(trainable, lr=1.0, momentum=0.9)
        names = {id(param): name for name, param in reference.named_parameters()}
        resumed_optimizer.load_state_dict(optimizer_state_from_fsdp(fsdp_optimizer_state, resumed_optimizer, names))
        optimizer_difference = max(float((resumed_optimizer.state[p]["momentum_buffer"] - reference_optimizer.state[p]["momentum_buffer"]).abs().max()) for p in trainable)
        expected = {name: param.detach() for name, param in reference.named_parameters() if param.requires_grad}
        update_difference = max(float((trained[name] - expected[name]).abs().max()) for name in expected)
        save_adapter(reference, Path(out) / "reference_adapter", routers=_router_modules(reference))
        saved, wanted = load_file(str(Path(out) / "adapter" / "adapter_model.safetensors")), load_file(str(Path(out) / "reference_adapter" / "adapter_model.safetensors"))
        _loaded, counts = load_adapter(load(), Path(out) / "adapter")
        report = {
            "flat_parameters": flat,
            "gathered_names": sorted(trained),
            "full_gather_names": sorted(everything),
            "gathered_vs_full_gather": max(float((trained[name] - everything[name]).abs().max()) for name in everything),
            "expert_nf4_tensors_before_wrap": expert_nf4,
            "expert_paths_under_fsdp": paths,
            "adapter_load_counts": counts,
            "loss": float(sum(losses) / 2),
            "reference_loss": float(reference_loss),
            "max_update_difference": update_difference,
            "adapter_keys": sorted(saved),
            "reference_adapter_keys": sorted(wanted),
            "adapter_max_difference": max(float((saved[key] - wanted[key]).abs().max()) for key in wanted),
            "optimizer_state_max_difference": optimizer_difference,
        }
        (Path(out) / "fsdp_report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1], sys.argv[2])
