"""`moekit finetune --ddp / --fsdp`: several processes on CPUs (gloo), compared with one process.

- DDP through the real CLI (`--ddp --num-processes 2`, which re-runs the command under `accelerate launch`
  with moekit's ddp.yaml): the same data and seed with the global batch held equal (2 x 2 vs 1 x 4) give
  the loss curve of one process; rank 0 alone writes; the adapter loads with plain PEFT and exports; a
  checkpoint of the 2-process run resumes in one process.
- FSDP cannot run through accelerate's launcher on CPUs (it falls back to DDP there, so `--fsdp` refuses).
  What FSDP does to moekit's model is checked with accelerate's own FSDP2 wrapping (`fsdp2_prepare_model`, as the
  Trainer calls it under the shipped config, with the mixed-precision policy MoeSFTTrainer sets), on gloo:
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
def moe(random_moe) -> Path:
    return random_moe


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
        [sys.executable, "-m", "moekit", "finetune", str(moe), "--data", str(chat_data), "-o", str(out),
         "--ddp", "--num-processes", "2", "--batch-size", "2", *flags],
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
    from moekit.finetune.loading import load_for_training

    out, _ = two_processes
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(one_process / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key in ours:  # the same training, so the same adapter up to float noise (Adam amplifies it where gradients are ~0)
        assert (ours[key] - reference[key]).norm() <= 0.02 * reference[key].norm(), key
    base = load_for_training(moe, bits=16, compute_dtype=torch.float32, device_map="cpu")
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


def test_launch_checks_the_output_once_before_launching(moe, chat_data, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    code, output = run_cli(
        [
            "finetune",
            str(moe),
            "--data",
            str(chat_data),
            "-o",
            str(tmp_path / "used"),
            "--ddp",
            "--num-processes",
            "2",
            "--target",
            "attn,experts",
            "--experts",
            "5",
        ],
        capsys,
    )
    assert code != 0 and "exists and is not empty" in output and "launching" not in output  # checked once, before launching


def test_shipped_configs_are_package_data_and_say_what_the_trainer_relies_on():
    import yaml

    from moekit.finetune.distributed import config_path

    fsdp = yaml.safe_load(config_path("fsdp").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    settings = fsdp["fsdp_config"]
    # FSDP2, one unit per decoder layer (the model's _no_split_modules), resharded after forward; each process loads
    assert settings["fsdp_version"] == 2 and settings["fsdp_reshard_after_forward"] is True
    assert settings["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in settings
    assert settings["fsdp_state_dict_type"] == "FULL_STATE_DICT" and settings["fsdp_cpu_ram_efficient_loading"] is False
    assert yaml.safe_load(config_path("ddp").read_text())["distributed_type"] == "MULTI_GPU"


def test_optimizer_state_converts_between_positions_and_names():
    """A one-process/DDP checkpoint's optimizer state (by position) resumes under FSDP (by name), and back, exactly."""
    from moekit.finetune.distributed import optimizer_state_from_fsdp, optimizer_state_to_fsdp

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable[:1], "weight_decay": 0.0}, {"params": trainable[1:]}], lr=0.1)
    model(torch.ones(5, 3)).sum().backward()
    optimizer.step()
    names = {id(param): name for name, param in model.named_parameters()}
    by_name = optimizer_state_to_fsdp(optimizer.state_dict(), optimizer, names)
    assert [group["params"] for group in by_name["param_groups"]] == [["0.weight"], ["1.weight", "1.bias"]]
    assert torch.equal(by_name["state"]["1.bias"]["exp_avg"], optimizer.state[model[1].bias]["exp_avg"])
    back = optimizer_state_from_fsdp(by_name, optimizer, names)
    assert back["param_groups"] == optimizer.state_dict()["param_groups"]
    assert all(torch.equal(back["state"][i]["exp_avg_sq"], optimizer.state_dict()["state"][i]["exp_avg_sq"]) for i in range(3))


# --- FSDP on CPUs, with torch's FSDP directly ----------------------------------------------------


def test_fsdp_shards_4bit_experts_and_gathers_the_adapter(moe, tmp_path):
    """2 processes: FSDP2 over moekit's NF4 model, wrapped by accelerate's own code under the shipped config, gives
    the one-process gradients and update, and a checkpoint of it resumes under FSDP with the same losses."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(moe), str(tmp_path)],
        capture_output=True, text=True, env=launch_env(), timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "fsdp_report.json").read_text())
    # one unit per decoder layer (LoRA, routers and 4-bit experts inside), embeddings, final norm + lm_head, the root
    assert report["units"] == [
        "",
        "base_model.model.model.embed_tokens",
        "base_model.model.model.layers.0",
        "base_model.model.model.layers.1",
        "base_model.model.lm_head",
    ]
    assert report["expert_nf4_tensors_before_wrap"] == 2 * 2  # gate_up, down per layer
    # the grouped path ran under FSDP, never the per-expert fallback (2 layers, one forward)
    assert report["expert_paths_under_fsdp"] == {"grouped": 2, "per_expert": 0}
    assert report["trainable_dtypes"] == ["torch.float32"]
    assert report["adapter_load_counts"]["expert_blocks"] == 2
    # parameter by parameter, only what trains: the same names and values as the unsharded reference update
    assert report["gathered_names"] == report["reference_names"]
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=1e-5)
    assert report["max_update_difference"] < 1e-5, report
    assert report["adapter_keys"] == report["reference_adapter_keys"]
    assert report["adapter_max_difference"] < 1e-5
    assert report["optimizer_state_max_difference"] < 1e-5  # FSDP's optimizer file resumes on one process
    # --resume under FSDP: the checkpoint of step 2 continues with the uninterrupted run's losses
    assert report["cpu_repacked_4bit_weights"] == 0  # bitsandbytes' CPU repack breaks under FSDP (see adapted())
    assert len(report["resumed_losses"]) == 2 and report["resumed_losses"] == pytest.approx(report["uninterrupted_losses"], rel=1e-6), report
    assert report["optimizer_state_dtypes"] == ["torch.float32"]
    # with a GPU run's dtypes (bf16 frozen weights and 4-bit codes beside float32 LoRA/routers in one unit, autocast)
    assert report["bf16_frozen_dtypes"] == ["torch.bfloat16"] and report["bf16_gradient_dtypes"] == ["torch.float32"]
    assert report["bf16_paths"] == {"grouped": 2, "per_expert": 0} and report["bf16_loss"] == pytest.approx(report["loss"], rel=0.05)


def _fsdp_worker(moe: str, out: str) -> None:
    """Rank 0 and 1 under torchrun: an FSDP2-wrapped training step vs the same step on one unwrapped copy, then
    checkpoint / resume under FSDP2 through the trainer's own save and load code."""
    import functools
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from safetensors.torch import load_file
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moekit.finetune.adapter import adapter_layout, load_adapter, save_adapter
    from moekit.finetune.distributed import fsdp_units, gathered_trainable, optimizer_state_from_fsdp, save_fsdp_optimizer
    from moekit.finetune.expert_storage import NF4Storage
    from moekit.finetune.experts import path_counts
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.options import TrainingOptions
    from moekit.finetune.targets import apply_targets, snapshot_trainable, verify_changed
    from moekit.finetune.trainer import FSDP_OPTIMIZER_FILE, MoeSFTTrainer, _router_modules, _router_names, _write_routers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    options = TrainingOptions(lora_r=8, lora_dropout=0.0, gradient_checkpointing=False)
    # what the trainer loads under FSDP on a CPU: NF4 weights stored in the compute dtype
    load = functools.partial(load_for_training, moe, bits=4, compute_dtype=torch.float32, device_map="cpu", quant_storage=torch.float32)

    def adapted():
        torch.manual_seed(0)
        model, _ = apply_targets(load(), options)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():  # LoRA B starts at zero; make every adapter take part in the gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02, generator=generator)
        # training mode, as the Trainer sets it (the loader leaves the model in eval mode, as from_pretrained does).
        # In eval mode bitsandbytes repacks a Linear4bit's codes for its AVX512-BF16 CPU kernel on the first
        # forward of an input without grad (layer 0's q/k/v): in place, on FSDP's all-gathered copy, while the
        # flag goes into the shared quant_state; every later all-gather rebuilds the unpacked codes from the
        # shards, which the flag then misreads (layer 0's attention computes with scrambled weights)
        return model.train()

    def wrap(model):
        """What accelerate does to the model under the shipped fsdp_qlora.yaml, with the policy MoeSFTTrainer sets."""
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True, cpu_ram_efficient_loading=False
        )
        plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        accelerator = SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=plugin),
            mixed_precision="no",
            is_main_process=rank == 0,
            device=torch.device("cpu"),
            torch_device_mesh=None,
            parallelism_config=None,
        )
        return fsdp2_prepare_model(accelerator, model)

    model = adapted()
    expert_nf4 = sum(1 for module in model.modules() if isinstance(module, NF4Storage))
    snapshot = snapshot_trainable(model)
    layout = adapter_layout(model, _router_modules(model))  # before wrapping, as MoeSFTTrainer does
    router_names = _router_names(model)
    vocab = model.config.vocab_size
    batches = torch.randint(0, vocab, (5, 4, 24), generator=torch.Generator().manual_seed(1))  # (steps, sequences, tokens)
    batch = batches[0]

    wrapped = wrap(model)
    units = fsdp_units(wrapped)
    half = batch[rank * 2 : rank * 2 + 2]
    before_paths = path_counts(wrapped)
    loss = wrapped(input_ids=half, labels=half).loss
    loss.backward()  # FSDP averages the gradients of the two halves: the gradient of the mean over 4
    # FSDP hands the packed 4-bit weights to the blocks as plain (unsharded) tensors
    paths = {path: count - before_paths[path] for path, count in path_counts(wrapped).items()}
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    optimizer.step()  # the first step of momentum SGD moves by lr * gradient and keeps the gradient as state
    save_fsdp_optimizer(wrapped, optimizer, Path(out) / "sgd_optimizer.bin")  # what the trainer saves
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    trained = gathered_trainable(wrapped)  # what the trainer saves, parameter by parameter
    trainable_dtypes = sorted({str(param.dtype) for param in wrapped.parameters() if param.requires_grad})
    if rank == 0:
        verify_changed(snapshot, trained)
        save_adapter(model, Path(out) / "adapter", parameters=trained, layout=layout)

    # --- resume under FSDP: AdamW, 4 steps uninterrupted vs 2 steps, checkpoint, a new process group state, 2 steps
    def adam_steps(model, optimizer, steps):
        values = []
        for step in steps:
            part = batches[step][rank * 2 : rank * 2 + 2]
            step_loss = model(input_ids=part, labels=part).loss
            step_loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            gathered = [torch.zeros(()) for _ in range(2)]
            dist.all_gather(gathered, step_loss.detach())
            values.append(float(sum(gathered) / 2))
        return values

    def adam(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    checkpoint = Path(out) / "checkpoint-2"
    first = wrap(adapted())
    first_optimizer = adam(first)
    adam_steps(first, first_optimizer, [1, 2])
    whole = gathered_trainable(first)  # MoeSFTTrainer.save_model + _save_optimizer_and_scheduler
    if rank == 0:
        save_adapter(first, checkpoint, parameters=whole, layout=layout)
        _write_routers({key: whole[name] for key, name in router_names.items()}, checkpoint / "routers.safetensors")
    save_fsdp_optimizer(first, first_optimizer, checkpoint / FSDP_OPTIMIZER_FILE)
    dist.barrier()
    uninterrupted = adam_steps(first, first_optimizer, [3, 4])
    resumed = wrap(adapted())
    resumed_optimizer = adam(resumed)
    trainer = SimpleNamespace(
        model_wrapped=resumed, optimizer=resumed_optimizer, adapter_layout=layout, train_routers=True, router_names=router_names, is_fsdp_enabled=True
    )
    MoeSFTTrainer._load_sharded(trainer, checkpoint)
    from moekit.finetune.distributed import load_fsdp_optimizer

    load_fsdp_optimizer(resumed, resumed_optimizer, checkpoint / FSDP_OPTIMIZER_FILE)
    optimizer_dtypes = sorted({str(value.dtype) for state in resumed_optimizer.state.values() for key, value in state.items() if key != "step"})
    resumed_losses = adam_steps(resumed, resumed_optimizer, [3, 4])
    # the quant_state each Linear4bit keeps (FSDP hands the forward a new weight tensor, bitsandbytes puts it back on it)
    cpu_repacked = sum(
        bool(getattr(getattr(module, "quant_state", None), "packing_format_for_cpu", False)) for net in (first, resumed) for module in net.modules()
    )

    # the dtypes of a GPU run: 4-bit codes, norms and embeddings in bf16, LoRA and routers float32, bf16 autocast
    from moekit.finetune.trainer import trainables_to_float32

    torch.manual_seed(0)
    bf16_model, _ = apply_targets(load(compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16), options)
    trainables_to_float32(bf16_model)
    bf16_wrapped = wrap(bf16_model)
    before_paths = path_counts(bf16_wrapped)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = bf16_wrapped(input_ids=half, labels=half).loss
    bf16_loss.backward()
    bf16_paths = {path: count - before_paths[path] for path, count in path_counts(bf16_wrapped).items()}
    bf16_gradients = sorted({str(param.grad.dtype) for param in bf16_wrapped.parameters() if param.requires_grad and param.grad is not None})
    bf16_frozen = sorted({str(param.dtype) for param in bf16_wrapped.parameters() if not param.requires_grad})

    if rank == 0:
        reference = adapted()
        reference_loss = reference(input_ids=batch, labels=batch).loss
        reference_loss.backward()
        trainable = [p for p in reference.parameters() if p.requires_grad]
        reference_optimizer = torch.optim.SGD(trainable, lr=1.0, momentum=0.9)
        reference_optimizer.step()
        # resuming the FSDP optimizer state on one process
        resumed_sgd = torch.optim.SGD(trainable, lr=1.0, momentum=0.9)
        names = {id(param): name for name, param in reference.named_parameters()}
        fsdp_sgd_state = torch.load(Path(out) / "sgd_optimizer.bin", weights_only=True)
        resumed_sgd.load_state_dict(optimizer_state_from_fsdp(fsdp_sgd_state, resumed_sgd, names))
        optimizer_difference = max(
            float((resumed_sgd.state[p]["momentum_buffer"] - reference_optimizer.state[p]["momentum_buffer"]).abs().max()) for p in trainable
        )
        expected = {name: param.detach() for name, param in reference.named_parameters() if param.requires_grad}
        update_difference = max(float((trained[name] - expected[name]).abs().max()) for name in expected)
        save_adapter(reference, Path(out) / "reference_adapter", routers=_router_modules(reference))
        saved, wanted = (
            load_file(str(Path(out) / "adapter" / "adapter_model.safetensors")),
            load_file(str(Path(out) / "reference_adapter" / "adapter_model.safetensors")),
        )
        _loaded, counts = load_adapter(load(), Path(out) / "adapter")
        report = {
            "units": units,
            "gathered_names": sorted(trained),
            "reference_names": sorted(expected),
            "trainable_dtypes": trainable_dtypes,
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
            "uninterrupted_losses": uninterrupted,
            "resumed_losses": resumed_losses,
            "cpu_repacked_4bit_weights": cpu_repacked,
            "optimizer_state_dtypes": optimizer_dtypes,
            "bf16_loss": float(bf16_loss),
            "bf16_paths": bf16_paths,
            "bf16_gradient_dtypes": bf16_gradients,
            "bf16_frozen_dtypes": bf16_frozen,
        }
        (Path(out) / "fsdp_report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1], sys.argv[2])
