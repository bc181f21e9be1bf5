"""Several processes for `moekit finetune`: `--ddp` / `--fsdp` re-run the same command under `accelerate launch`.

    moekit finetune MODEL --data DATA -o OUT --fsdp            # one process per visible GPU
    = accelerate launch --config_file <moekit>/finetune/accelerate/fsdp_qlora.yaml --num_processes N \
          -m moekit finetune MODEL --data DATA -o OUT

Nothing here trains: accelerate starts the processes (torch.distributed.run), and in each of them the
ordinary single-process code path runs (`moekit.finetune.trainer.finetune`), where transformers' Trainer
and accelerate wrap the model in DDP or FSDP. The shipped configs live in `moekit/finetune/accelerate/`:

- `ddp.yaml`: data parallel, one full (4-bit) copy of the model per GPU (the trainer sets bucketing and overlap:
  `MoeSFTTrainer.create_accelerator_and_postprocess`).
- `fsdp_qlora.yaml`: FSDP version 2 (`fully_shard`, per-parameter sharding), one unit per decoder layer with its
  LoRA and router parameters inside (plus embeddings, and final norm + lm_head), resharded after forward; FSDP2
  prefetches the next unit's all-gather in forward and backward. Each process streams the checkpoint onto its own
  GPU (no rank-0 broadcast: `cpu_ram_efficient_loading` off). The adapter, routers and optimizer state are written
  by moekit (`gathered_trainable`, `save_fsdp_optimizer`), in the single-GPU format; `--resume` reads them back
  (`set_full`, `load_fsdp_optimizer`).

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
        raise TrainingError(
            f"--{kind} needs at least 2 processes, but {gpus} GPU(s) are visible", hint=f"pass --num-processes N, or leave out --{kind} for one process"
        )
    if gpus and count > gpus:
        raise TrainingError(
            f"--num-processes {count} is more than the {gpus} visible GPUs", hint="one process per GPU: lower --num-processes or set CUDA_VISIBLE_DEVICES"
        )
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
        raise TrainingError(
            f"--{kind} inside a process that accelerate or torchrun already started", hint=f"leave out --{kind} when you launch moekit yourself"
        )
    args = launch_command_parser().parse_args(launch_arguments(kind, num_processes, moekit_args))
    try:
        launch_command(args)
    except ChildFailedError as err:
        failed = ", ".join(f"rank {rank} exited with code {failure.exitcode}" for rank, failure in sorted(err.failures.items()))
        raise TrainingError(f"the {num_processes}-process {kind.upper()} run failed: {failed}", hint="the messages above (rank 0 first) say why") from None


def finetune_arguments(model: str, out: Path, options: dict) -> list[str]:
    """The `finetune` command line for the launched processes: the same options, without the launch ones.

    `options` are click's values by field name (None where neither the command line nor --config gave one);
    a --config file is not passed on, its values are. `--push-to-hub` is
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


def is_fsdp2(model) -> bool:
    """True for a model wrapped by FSDP version 2 (`fully_shard`, what the shipped fsdp_qlora.yaml selects)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_units(model) -> list[str]:
    """Names of the modules `fully_shard` made FSDP units ("" is the root): one all-gather each per pass."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def gathered_trainable(fsdp_root) -> dict:
    """Every trainable parameter of an FSDP2 model (`fully_shard`), whole, on the CPU, named as in the unwrapped
    model (FSDP2 renames nothing): what checkpoints, the final adapter and `verify_changed` need.

    Parameter by parameter, only those that train, so the frozen 4-bit weights are never gathered and no process
    holds more than one LoRA/router tensor unsharded. A collective: every process must call it.
    """
    if not is_fsdp2(fsdp_root):
        raise TrainingError(
            "moekit supports FSDP version 2 (the shipped fsdp_qlora.yaml), not fsdp_version 1", hint="set fsdp_version: 2 in the accelerate config"
        )
    return {name: _full(param).to("cpu", copy=True) for name, param in fsdp_root.named_parameters() if param.requires_grad}


def _full(tensor):
    """The whole tensor of a DTensor shard (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().detach() if isinstance(tensor, DTensor) else tensor.detach()


def set_full(param, value) -> None:
    """Copy the whole tensor `value` into `param`, which may be an FSDP2 shard (a DTensor): each process keeps its part."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements)
    with torch.no_grad():
        param.copy_(value)


def save_fsdp_optimizer(model, optimizer, path) -> None:
    """FSDP2's optimizer state, gathered whole and keyed by parameter name (torch's `get_optimizer_state_dict`),
    to `path` from rank 0. The same layout as FSDP1's full optimizer state dict, so `optimizer_state_from_fsdp`
    resumes it on one process. A collective."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, path)


def load_fsdp_optimizer(model, optimizer, saved) -> None:
    """`save_fsdp_optimizer`'s file (a path, or the state it holds) back into the optimizer of an FSDP2 model: each
    process keeps its shard, in the dtype of each parameter (float32 LoRA and routers). A collective."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not isinstance(saved, dict):
        saved = torch.load(saved, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


# PEFT 0.21 picks a model's adapter entries by module name; moekit reads PEFT's file layout once, before wrapping
# (`adapter.adapter_layout`), and writes/reads the adapter of a wrapped model through it.


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


def optimizer_state_to_fsdp(state: dict, optimizer, names: dict[int, str]) -> dict:
    """The inverse of `optimizer_state_from_fsdp`: a plain `optimizer.state_dict()` (entries keyed by position, as
    one process or DDP saves it) keyed by parameter name, for `load_fsdp_optimizer`. `names` maps id(parameter) ->
    name for `optimizer`'s parameters; groups are matched in order."""
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise TrainingError(f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this run's {len(optimizer.param_groups)}")
    saved_count = sum(len(group["params"]) for group in state["param_groups"])
    if saved_count != len(order):
        raise TrainingError(f"the checkpoint's optimizer holds {saved_count} parameters, this run trains {len(order)}")
    groups, start = [], 0
    for saved in state["param_groups"]:
        groups.append({**saved, "params": order[start : start + len(saved["params"])]})
        start += len(saved["params"])
    return {"state": {order[position]: value for position, value in state["state"].items()}, "param_groups": groups}
