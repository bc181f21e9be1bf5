"""Adapters in PEFT's own format: what moekit trains, loadable by stock transformers + PEFT.

    save_adapter(model, directory)           # the trained model (or, under FSDP, its gathered parameters)
    load_adapter(model, directory) -> model  # onto a model from load_for_training; counts what was adapted

The files are those of `PeftModel.save_pretrained` (adapter_config.json, adapter_model.safetensors):
- attention LoRA: `target_modules` with full module names, PEFT's `lora.Linear` keys;
- Mixtral experts: `target_parameters` on the fused `model.layers.N.mlp.experts.gate_up_proj` / `down_proj` of
  each adapted layer (PEFT's `lora.ParamWrapper`): lora_A (E * r, in) with expert e's rows at [e*r:(e+1)*r],
  lora_B (out, r * E) with expert e's columns at [e::E]. PEFT nests the two wrappers in parameter order, so
  gate_up_proj's keys carry `.base_layer`. Experts left out of `--experts` have zero B slices;
- Phixtral experts: `target_modules` on each adapted expert's `fc1` / `fc2` (stock Phixtral keeps an
  `nn.ModuleList` of MLPs);
- routers: `modules_to_save` (`model.layers.N.mlp.gate`), so PEFT loads the trained router weights.
LoRA dropout is written as 0: it only acts in training, and PEFT's ParamWrapper refuses any other value.

Adapters of moekit <= 0.x (per-expert `mlp.experts.E.w_gate/w_up/w_down` LoRA, routers in a separate file)
load too: `convert_legacy_adapter` rewrites them exactly (rank 2r, alpha 2 * alpha: gate and up become one
rank-2r LoRA on gate_up_proj, everything else is zero-padded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moekit.errors import TargetError
from moekit.finetune.experts import ExpertBlock, expert_blocks

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM
LEGACY_PROJECTIONS = ("w_gate", "w_up", "w_down")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _name_prefix(model: nn.Module) -> str:
    """The prefix of the base model's parameter names inside `model` (PEFT-wrapped or not)."""
    return PREFIX if hasattr(model, "get_base_model") else ""


def _to_peft_a(lora_a: torch.Tensor) -> torch.Tensor:
    experts, rank, in_features = lora_a.shape
    return lora_a.reshape(experts * rank, in_features)


def _to_peft_b(lora_b: torch.Tensor) -> torch.Tensor:
    experts, out_features, rank = lora_b.shape
    return lora_b.permute(1, 2, 0).reshape(out_features, rank * experts)  # [o, k * E + e] = B[e, o, k]


def _from_peft_a(tensor: torch.Tensor, experts: int) -> torch.Tensor:
    return tensor.reshape(experts, -1, tensor.shape[-1])


def _from_peft_b(tensor: torch.Tensor, experts: int) -> torch.Tensor:
    out_features = tensor.shape[0]
    return tensor.reshape(out_features, -1, experts).permute(2, 0, 1)


def expert_entries(block_name: str, block: ExpertBlock, parameter_prefix: str) -> dict[str, tuple[str, object, object]]:
    """File key -> (parameter name, to_file(param) -> tensor, from_file) of one block's LoRA; from_file is a
    function (tensor -> param) or ("slice", position) for one expert's slice of the stacked parameter."""
    entries = {}
    if block.family == "mixtral":
        projections = list(block.projections)  # PEFT nests in parameter order: the first gets `.base_layer`
        adapted = block.adapted_experts
        for depth, name in enumerate(projections):
            module_key = PREFIX + block_name + ".base_layer" * (len(projections) - 1 - depth)
            entries[f"{module_key}.lora_A.weight"] = (
                f"{parameter_prefix}{block_name}.lora_A_{name}",
                lambda p: _to_peft_a(block.expand_lora(p)),
                lambda t, e=block.num_experts: _from_peft_a(t, e)[adapted],
            )
            entries[f"{module_key}.lora_B.weight"] = (
                f"{parameter_prefix}{block_name}.lora_B_{name}",
                lambda p: _to_peft_b(block.expand_lora(p)),
                lambda t, e=block.num_experts: _from_peft_b(t, e)[adapted],
            )
        return entries
    for position, expert in enumerate(block.adapted_experts):
        for name in block.projections:
            for factor in ("A", "B"):
                entries[f"{PREFIX}{block_name}.{expert}.{name}.lora_{factor}.weight"] = (
                    f"{parameter_prefix}{block_name}.lora_{factor}_{name}",
                    lambda p, i=position: p[i],
                    ("slice", position),
                )
    return entries


def adapter_layout(model: nn.Module, routers: list[str] | None = None) -> tuple[dict, dict]:
    """(entries, config fields) of `model`'s adapter: entries = file key -> (parameter name, to_file, from_file),
    parameter names as in `model`; `routers`: router module names (relative to the base model) trained in full."""
    from moekit.finetune.distributed import adapter_parameter_names

    prefix = _name_prefix(model)
    entries: dict = {}
    target_modules: list[str] = []
    if hasattr(model, "peft_config"):
        for key, parameter in adapter_parameter_names(model).items():
            entries[key] = (parameter, None, None)
        target_modules += sorted(model.peft_config[model.active_adapter].target_modules)
    target_parameters: list[str] = []
    for block_name, block in expert_blocks(_base(model)).items():
        if not block.has_lora:
            continue
        entries.update(expert_entries(block_name, block, prefix))
        if block.family == "mixtral":
            target_parameters += [f"{block_name}.{name}" for name in block.projections]
        else:
            target_modules += [f"{block_name}.{expert}.{name}" for expert in block.adapted_experts for name in block.projections]
    for router in routers or []:
        entries[f"{PREFIX}{router}.weight"] = (f"{prefix}{router}.weight", None, None)
    return entries, {"target_modules": target_modules, "target_parameters": target_parameters, "modules_to_save": list(routers or [])}


def _lora_hyperparameters(model: nn.Module) -> tuple[int, float]:
    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        return config.r, config.lora_alpha
    block = next((b for b in expert_blocks(model).values() if b.has_lora), None)
    if block is None:
        raise TargetError("the model has no LoRA to save")
    return block.lora_r, block.lora_alpha


def save_adapter(model: nn.Module, directory: str | Path, routers: list[str] | None = None, parameters: dict | None = None, layout=None) -> Path:
    """Write `model`'s adapter (attention LoRA, expert LoRA, `routers`) to `directory` in PEFT's format.

    `parameters`: {parameter name: tensor} to write instead of the model's own (FSDP's gathered parameters);
    `layout`: `adapter_layout(model, routers)` noted before FSDP wrapped the model.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries, fields = layout if layout is not None else adapter_layout(model, routers)
    if parameters is None:
        parameters = dict(model.named_parameters())
    r, alpha = _lora_hyperparameters(model)
    tensors = {}
    for key, (parameter, to_file, _from_file) in entries.items():
        value = parameters[parameter].detach()
        tensors[key] = (to_file(value) if to_file is not None else value).to("cpu").contiguous()
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=fields["target_modules"], target_parameters=fields["target_parameters"] or None,
        modules_to_save=fields["modules_to_save"] or None,
    )  # fmt: skip
    base = _base(model)
    config.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or None
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


# --- loading ---------------------------------------------------------------------------------


def is_legacy_adapter(keys) -> bool:
    return any(f".{projection}." in key for key in keys for projection in LEGACY_PROJECTIONS if ".experts." in key)


def convert_legacy_tensors(config: dict, tensors: dict[str, torch.Tensor], num_experts: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A moekit <= 0.x adapter (per-expert w_gate/w_up/w_down LoRA) as the current format, exactly:
    rank 2r and alpha 2 * alpha (same scaling); gate and up LoRA stacked into one rank-2r LoRA on gate_up_proj
    (A = [A_gate; A_up], B = [[B_gate, 0], [0, B_up]]), every other LoRA zero-padded to rank 2r."""
    r = config["r"]
    new_tensors: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # block -> expert -> "w_gate.A" -> tensor
    for key, tensor in tensors.items():
        body = key.removeprefix(PREFIX)
        parts = body.split(".")
        if ".experts." in body and parts[-3] in LEGACY_PROJECTIONS:
            at = parts.index("experts")
            block, expert, projection, factor = ".".join(parts[: at + 1]), int(parts[at + 1]), parts[at + 2], parts[-2][-1]
            experts.setdefault(block, {}).setdefault(expert, {})[f"{projection}.{factor}"] = tensor
        elif key.endswith(".lora_A.weight"):
            new_tensors[key] = torch.cat([tensor, torch.zeros_like(tensor)])  # (2r, in)
        elif key.endswith(".lora_B.weight"):
            new_tensors[key] = torch.cat([tensor, torch.zeros_like(tensor)], dim=1)  # (out, 2r)
        else:
            new_tensors[key] = tensor
    target_parameters = []
    for block, per_expert in experts.items():
        sample = next(iter(per_expert.values()))
        hidden, inter, dtype = sample["w_gate.A"].shape[1], sample["w_gate.B"].shape[0], sample["w_gate.A"].dtype
        gate_up_a = torch.zeros(num_experts, 2 * r, hidden, dtype=dtype)
        gate_up_b = torch.zeros(num_experts, 2 * inter, 2 * r, dtype=dtype)
        down_a = torch.zeros(num_experts, 2 * r, inter, dtype=dtype)
        down_b = torch.zeros(num_experts, hidden, 2 * r, dtype=dtype)
        for expert, factors in per_expert.items():
            gate_up_a[expert] = torch.cat([factors["w_gate.A"], factors["w_up.A"]])
            gate_up_b[expert, :inter, :r] = factors["w_gate.B"]
            gate_up_b[expert, inter:, r:] = factors["w_up.B"]
            down_a[expert, :r] = factors["w_down.A"]
            down_b[expert, :, :r] = factors["w_down.B"]
        new_tensors[f"{PREFIX}{block}.base_layer.lora_A.weight"] = _to_peft_a(gate_up_a)
        new_tensors[f"{PREFIX}{block}.base_layer.lora_B.weight"] = _to_peft_b(gate_up_b)
        new_tensors[f"{PREFIX}{block}.lora_A.weight"] = _to_peft_a(down_a)
        new_tensors[f"{PREFIX}{block}.lora_B.weight"] = _to_peft_b(down_b)
        target_parameters += [f"{block}.gate_up_proj", f"{block}.down_proj"]
    new_config = dict(config)
    new_config.update(
        r=2 * r, lora_alpha=2 * config["lora_alpha"], lora_dropout=0.0, target_parameters=target_parameters or None,
        target_modules=[name for name in config["target_modules"] if name.rsplit(".", 1)[-1] not in LEGACY_PROJECTIONS],
    )  # fmt: skip
    return new_config, new_tensors


def read_adapter(directory: str | Path, num_experts: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of an adapter directory, a legacy moekit adapter converted on the way."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise TargetError(f"{directory} is not a LoRA adapter ({CONFIG_FILE} and {WEIGHTS_FILE} are needed)")
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / WEIGHTS_FILE))
    if is_legacy_adapter(tensors):
        if num_experts is None:
            raise TargetError(f"{directory} is a legacy moekit adapter; the number of experts is needed to convert it")
        config, tensors = convert_legacy_tensors(config, tensors, num_experts)
    return config, tensors


def convert_legacy_adapter(directory: str | Path, out: str | Path, num_experts: int) -> Path:
    """Write the legacy adapter at `directory` to `out` in the current (PEFT target_parameters) format."""
    from safetensors.torch import save_file

    config, tensors = read_adapter(directory, num_experts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path, *, is_trainable: bool = False) -> tuple[nn.Module, dict]:
    """Put the adapter at `directory` onto `model` (from `load_for_training`, not yet wrapped).

    Returns (model, PEFT-wrapped if the adapter has attention LoRA; counts {"lora_modules", "expert_blocks",
    "routers", "tensors"}). Raises TargetError, naming them, if any adapter tensor matches nothing in the model,
    or any adapted module's tensor is missing from the file: nothing is dropped silently.
    """
    from peft import LoraConfig, get_peft_model

    blocks = expert_blocks(model)
    num_experts = next((block.num_experts for block in blocks.values()), None)
    config, tensors = read_adapter(directory, num_experts)
    modules = dict(model.named_modules())
    expert_modules = {name for name in config.get("target_modules") or [] if ".experts." in name}
    attention = [name for name in config.get("target_modules") or [] if name not in expert_modules]
    missing_modules = [name for name in attention if name not in modules]
    if missing_modules:
        raise TargetError(f"{directory}: {len(missing_modules)} adapted module(s) are not in this model, e.g. {missing_modules[0]}")
    r, alpha = config["r"], config["lora_alpha"]
    for block_name, block in blocks.items():
        parameters = [name for name in config.get("target_parameters") or [] if name.rsplit(".", 1)[0] == block_name]
        adapted = sorted({int(name[len(block_name) + 1 :].split(".")[0]) for name in expert_modules if name.startswith(block_name + ".")})
        if parameters or adapted:
            block.add_lora(r, alpha, experts=adapted or None)
            block.requires_grad_(False)
    routers = list(config.get("modules_to_save") or [])
    unknown_routers = [name for name in routers if name not in modules]
    if unknown_routers:
        raise TargetError(f"{directory}: router {unknown_routers[0]} is not in this model")
    if attention:
        lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=attention, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    entries, _fields = adapter_layout(model, routers)
    _check_keys(entries, tensors, directory)
    _copy_values(model, entries, tensors, directory)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable and name in {entry[0] for entry in entries.values()})
    counts = {
        "lora_modules": len(attention),
        "expert_blocks": sum(block.has_lora for block in blocks.values()),
        "routers": len(routers),
        "tensors": len(tensors),
    }
    return model, counts


def _check_keys(entries: dict, tensors: dict, directory) -> None:
    unmatched = sorted(set(tensors) - set(entries))
    absent = sorted(set(entries) - set(tensors))
    if unmatched or absent:
        raise TargetError(
            f"{directory} does not match this model: {len(unmatched)} adapter tensor(s) match no module"
            + (f" (e.g. {unmatched[0]})" if unmatched else "")
            + f", {len(absent)} adapted tensor(s) are missing"
            + (f" (e.g. {absent[0]})" if absent else ""),
            hint="was the adapter trained on this base model?",
        )


@torch.no_grad()
def _copy_values(model: nn.Module, entries: dict, tensors: dict, directory, parameters: dict | None = None) -> None:
    parameters = dict(model.named_parameters()) if parameters is None else parameters
    for key, (parameter, _to_file, from_file) in entries.items():
        target = parameters[parameter]
        value = tensors[key]
        if isinstance(from_file, tuple):  # one expert's slice of a stacked parameter
            target = target[from_file[1]]
        elif from_file is not None:
            value = from_file(value)
        if tuple(value.shape) != tuple(target.shape):
            raise TargetError(f"{directory}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def load_adapter_values(model: nn.Module, directory: str | Path, layout, parameters: dict | None = None) -> None:
    """Copy a saved adapter (a checkpoint of this same run) into `model`'s existing adapter; `layout` from
    `adapter_layout`. Every key must match. `parameters` ({parameter name: tensor}, e.g. the whole tensors of a
    sharded model) receive the values instead of the model's own parameters."""
    entries, _fields = layout
    blocks = expert_blocks(_base(model))
    _config, tensors = read_adapter(directory, next((block.num_experts for block in blocks.values()), None))
    _check_keys(entries, tensors, directory)
    _copy_values(model, entries, tensors, directory, parameters)


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or any(block.has_lora for block in expert_blocks(_base(model)).values())
