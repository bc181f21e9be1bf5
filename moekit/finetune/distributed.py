"""Several processes for `moekit finetune`: `--ddp` / `--fsdp` re-run the same command under `accelerate launch`.

    moekit finetune MODEL --data DATA -o OUT --fsdp            # one process per visible GPU
    = accelerate launch --config_file <moekit>/finetune/accelerate/fsdp_qlora.yaml --num_processes N \
          -m moekit finetune MODEL --data DATA -o OUT

Nothing here trains: accelerate starts the processes (torch.distributed.run), and in each of them the
ordinary single-process code path runs (`moekit.finetune.trainer.finetune`), where transformers' Trainer
and accelerate wrap the model in DDP or FSDP. The shipped configs live in `moekit/finetune/accelerate/`:

- `ddp.yaml`: data parallel, one full (4-bit) copy of the model per GPU.
- `fsdp_qlora.yaml`: FSDP FULL_SHARD wrapped by decoder layer, `use_orig_params`, FSDP's optimizer state saved
  whole. The adapter and routers are written by moekit from `gathered_trainable`, in the single-GPU format. Under it (`ACCELERATE_USE_FSDP=true`)
  the trainer stores 4-bit weights in the compute dtype (`bnb_4bit_quant_storage`) so FSDP can flatten
  quantized and plain parameters of one layer together.

accelerate runs FSDP on GPUs only: on a CPU machine its launcher would start plain DDP processes under the
FSDP config without a word, so `--fsdp` refuses to start there.
"""

from __future__ import annotations

import os
from pathlib import Path

from moekit.errors import TrainingError

CONFIG_DIR = Path(__file__).parent / "accelerate"
CONFIG_FILES = {"ddp": "ddp.yaml", "fsdp": "fsdp_qlora.yaml"}


def config_path(kind: str) -> Path:
    """The accelerate config moekit ships for `kind` ("ddp" or "fsdp")."""
    return CONFIG_DIR / CONFIG_FILES[kind]


def is_main_process() -> bool:
    """True outside a launched run and in its rank-0 process (set by torch.distributed.run before Python starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def is_launched() -> bool:
    """True inside a process started by `accelerate launch` / torchrun."""
    return "LOCAL_RANK" in os.environ


def process_count(kind: str, requested: int | None) -> int:
    """How many processes to start: `requested`, else one per visible GPU; refuses what cannot work."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "fsdp" and gpus == 0:
        raise TrainingError(
            "--fsdp needs GPUs: accelerate shards with FSDP on GPUs only (on CPUs it would quietly run DDP instead)",
            hint="on a CPU machine use --ddp --num-processes N",
        )
    count = requested or gpus
    if count < 2:
        raise TrainingError(f"--{kind} needs at least 2 processes, but {gpus} GPU(s) are visible", hint=f"pass --num-processes N, or leave out --{kind} for one process")
    if gpus and count > gpus:
        raise TrainingError(f"--num-processes {count} is more than the {gpus} visible GPUs", hint="one process per GPU: lower --num-processes or set CUDA_VISIBLE_DEVICES")
    return count


def launch_arguments(kind: str, num_processes: int, moekit_args: list[str]) -> list[str]:
    """`accelerate launch` arguments that run `moekit <moekit_args>` in `num_processes` processes."""
    return ["--config_file", str(config_path(kind)), "--num_processes", str(num_processes), "-m", "moekit", *moekit_args]


def command_line(kind: str, num_processes: int, moekit_args: list[str]) -> str:
    """The equivalent shell command, for users who launch it themselves (e.g. on a cluster scheduler)."""
    import shlex

    return shlex.join(["accelerate", "launch", *launch_arguments(kind, num_processes, moekit_args)])


def launch(kind: str, num_processes: int, moekit_args: list[str]) -> None:
    """Run `moekit <moekit_args>` in `num_processes` processes through accelerate; returns when all finished.

    The processes print their own messages (only rank 0 prints moekit's); a failure raises TrainingError
    with each failed rank's exit code instead of the launcher's traceback.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if is_launched():
        raise TrainingError(f"--{kind} inside a process that accelerate or torchrun already started", hint=f"leave out --{kind} when you launch moekit yourself")
    args = launch_command_parser().parse_args(launch_arguments(kind, num_processes, moekit_args))
    try:
        launch_command(args)
    except ChildFailedError as err:
        failed = ", ".join(f"rank {rank} exited with code {failure.exitcode}" for rank, failure in sorted(err.failures.items()))
        raise TrainingError(f"the {num_processes}-process {kind.upper()} run failed: {failed}", hint="the messages above (rank 0 first) say why") from None


def finetune_arguments(model: str, out: Path, options: dict) -> list[str]:
    """The `finetune` command line for the launched processes: the same options, without the launch ones.

    `options` are click's values by field name (None where the user gave nothing). `--push-to-hub` is
    left out: the launching process uploads once, after all processes finished.
    """
    arguments = ["finetune", str(model), "-o", str(out)]
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + flag[2:])
        else:
            arguments += [flag, str(value)]
    return arguments


def gathered_trainable(fsdp_root) -> dict:
    """Every trainable parameter of an FSDP (version 1, `use_orig_params`) model, whole, on the CPU, named as in
    the unwrapped model: what checkpoints, the final adapter and `verify_changed` need.

    One FSDP unit at a time, and only units that hold trainable parameters (PEFT's wrap policy gives every LoRA
    and router layer a unit of its own), so the frozen 4-bit weights are never gathered and no process holds
    more than one small unit unsharded. The Trainer's own FSDP save would gather the whole model into a full
    state dict instead (and fails outright on a single process with rank-0 CPU offload). A collective: every
    process must call it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(fsdp_root, FullyShardedDataParallel):
        raise TrainingError("moekit supports FSDP version 1 (the shipped fsdp_qlora.yaml), not fsdp_version 2", hint="set fsdp_version: 1 in the accelerate config")
    gathered = {}
    for prefix, unit in fsdp_root.named_modules():
        if not isinstance(unit, FullyShardedDataParallel):
            continue
        # a unit's own parameters carry one FSDP prefix; those of units nested in it carry more
        own = [(name, param) for name, param in unit.named_parameters() if name.count(FSDP_PREFIX) == 1 and param.requires_grad]
        if not own:
            continue
        # with use_orig_params the same Parameter objects show the unsharded data inside the context
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for name, param in own:
                gathered[_unwrapped_name(f"{prefix}.{name}" if prefix else name)] = param.detach().to("cpu", copy=True)
    return gathered


FSDP_PREFIX = "_fsdp_wrapped_module."


def _unwrapped_name(name: str) -> str:
    return name.replace(FSDP_PREFIX, "")


# PEFT 0.21 picks a model's adapter entries by module name, and under FSDP each LoRA layer is its own FSDP unit
# (`..._fsdp_wrapped_module.self_attn.q_proj.lora_A.default._fsdp_wrapped_module`), so `save_pretrained` of the
# wrapped model finds no entry and writes an empty adapter, and the Trainer's FSDP checkpoints likewise. moekit
# reads PEFT's file layout once, before wrapping (`adapter.adapter_layout`), and writes/reads the adapter of a
# wrapped model through it.


def adapter_parameter_names(peft_model) -> dict[str, str]:
    """Adapter file key (as `save_pretrained` writes it) -> parameter name, read from the unwrapped PEFT model."""
    from peft import get_peft_model_state_dict

    by_storage = {param.data_ptr(): name for name, param in peft_model.named_parameters()}
    return {key: by_storage[tensor.data_ptr()] for key, tensor in get_peft_model_state_dict(peft_model).items()}


def optimizer_state_from_fsdp(fsdp_state: dict, optimizer, names: dict[int, str]) -> dict:
    """FSDP's full optimizer state (`FSDP.optim_state_dict`: entries keyed by parameter name) as a plain
    `optimizer.state_dict()` for `optimizer` (entries keyed by position), so that a checkpoint written
    under FSDP resumes on one process. `names` maps id(parameter) -> name; groups are matched in order."""
    order = [[names[id(param)] for param in group["params"]] for group in optimizer.param_groups]
    position = {name: index for index, name in enumerate(name for group in order for name in group)}
    if len(fsdp_state["param_groups"]) != len(order):
        raise TrainingError(f"the checkpoint's optimizer has {len(fsdp_state['param_groups'])} parameter groups, this run's {len(order)}")
    missing = sorted(set(position) - {name for group in fsdp_state["param_groups"] for name in group["params"]})
    if missing:
        raise TrainingError(f"the checkpoint's optimizer does not cover {missing[0]} (and {len(missing) - 1} more)")
    return {
        "state": {position[name]: state for name, state in fsdp_state["state"].items() if name in position},
        "param_groups": [{**saved, "params": [position[name] for name in group]} for saved, group in zip(fsdp_state["param_groups"], order)],
    }
