"""What is trained: LoRA on attention and chosen experts, routers in full, and checks that it really happens.

Attention targets are given to PEFT as an explicit list of full module names (`model.layers.0.self_attn.q_proj`),
never as a regex: for Mixtral-type models PEFT resolves a regex to bare leaf names (losing the layer
restriction) and rewrites `w1`/`w2`/`w3`/`gate` into fused-parameter targets. Expert LoRA is owned by each
layer's `ExpertBlock` (`add_lora`: stacked A/B over the experts, the untargeted experts masked), and written in
PEFT's own `target_parameters` format by `moekit.finetune.adapter`. After wrapping, the table of trainable
parameters is counted from the model itself, and every requested (layer, expert), attention block and router
is checked to have trainable parameters.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moekit.errors import TargetError, TrainingError
from moekit.finetune.experts import ExpertBlock
from moekit.finetune.options import TrainingOptions
from moekit.finetune.quantize import prepare_for_training
from moekit.finetune.rmsnorm_kernel import fuse_rms_norms

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_BLOCK_LORA = re.compile(r"\.experts\.lora_[AB]_")  # stacked LoRA of an ExpertBlock: (experts, ...)
_LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt")


@dataclass
class MoeLayer:
    """Where one decoder layer's trainable pieces live (module names relative to the unwrapped model)."""

    index: int
    attention: list[str]  # linear layers of the attention block
    router: str | None  # router module (its `.weight` is trained in full)
    experts: str | None  # the layer's ExpertBlock
    num_experts: int = 0


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_linear(module: nn.Module) -> bool:
    return type(module).__name__ in _LINEAR_TYPES and isinstance(module, nn.Linear)


def describe_layers(model: nn.Module) -> list[MoeLayer]:
    """The decoder layers of a (possibly PEFT-wrapped) causal LM: attention linears, router and expert linears."""
    base = _base_model(model)
    layers_name, layers = next(
        ((name, module) for name, module in base.named_modules() if name.endswith("layers") and isinstance(module, nn.ModuleList)),
        (None, None),
    )
    if layers is None:
        raise TargetError(f"cannot find the decoder layers of {type(base).__name__}")
    described = []
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}"
        attention = [
            f"{prefix}.self_attn.{name}" for name, module in layer.self_attn.named_modules() if name and _is_linear(module)
        ] if hasattr(layer, "self_attn") else []  # fmt: skip
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        mlp_name = f"{prefix}.mlp" if getattr(layer, "mlp", None) is not None else f"{prefix}.block_sparse_moe"
        router, experts, num_experts = None, None, 0
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            router = f"{mlp_name}.gate"
            if not isinstance(mlp.experts, ExpertBlock):
                raise TargetError(
                    f"the experts of {mlp_name} are not moekit's quantized expert block ({type(mlp.experts).__name__})",
                    hint="load the model with moekit.finetune.loading.load_for_training (or call quantize_moe) first",
                )
            experts, num_experts = f"{mlp_name}.experts", mlp.experts.num_experts
        described.append(MoeLayer(index=index, attention=attention, router=router, experts=experts, num_experts=num_experts))
    return described


@dataclass
class TrainableTable:
    """Trainable parameters counted from the wrapped model: per kind, per layer, per expert."""

    requested: dict  # the request: targets, experts, layers
    rows: list[dict] = field(default_factory=list)  # one per trainable tensor: name, kind, layer, expert, params
    total_params: int = 0  # all parameters of the model (4-bit weights counted as unpacked values)

    @property
    def trainable_params(self) -> int:
        return sum(row["params"] for row in self.rows)

    def by(self, key: str) -> dict:
        totals: dict = defaultdict(int)
        for row in self.rows:
            if row[key] is not None:
                totals[row[key]] += row["params"]
        return dict(sorted(totals.items(), key=lambda item: str(item[0]) if not isinstance(item[0], int) else f"{item[0]:06d}"))

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "by_kind": self.by("kind"),
            "by_layer": {str(k): v for k, v in self.by("layer").items()},
            "by_expert": {str(k): v for k, v in self.by("expert").items()},
            "tensors": len(self.rows),
        }

    def render(self) -> str:
        """A plain-text table: one line per (kind, layer) with per-expert counts, then totals."""
        cells: dict = defaultdict(lambda: defaultdict(int))  # (kind, layer) -> expert|None -> params
        for row in self.rows:
            cells[(row["kind"], row["layer"])][row["expert"]] += row["params"]
        experts = sorted({row["expert"] for row in self.rows if row["expert"] is not None})
        header = ["target", "layer", "params"] + [f"expert {e}" for e in experts]
        lines = []
        for (kind, layer), per_expert in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1] if item[0][1] is not None else -1)):
            line = [kind, "-" if layer is None else str(layer), f"{sum(per_expert.values()):,}"]
            line += [f"{per_expert[e]:,}" if e in per_expert else "" for e in experts]
            lines.append(line)
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in self.by("kind").items())
        share = 100 * self.trainable_params / max(self.total_params, 1)
        lines.append(["total", "", f"{self.trainable_params:,}"] + [f"{self.by('expert').get(e, 0):,}" for e in experts])
        widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

        def fmt(line):
            return "  ".join(cell.rjust(width) if i >= 2 else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths)))

        out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
        out.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} parameters ({share:.3f}%): {kinds}")
        return "\n".join(out)


def _classify(name: str, routers: set[str]) -> tuple[str, int | None, int | None]:
    """(kind, layer, expert) of a trainable parameter name of the wrapped or unwrapped model."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    plain = name.removeprefix("base_model.model.")
    if plain.removesuffix(".weight") in routers:
        return "gate", layer, None
    expert_match = _EXPERT.search(name)
    if _BLOCK_LORA.search(name):
        return "experts", layer, None
    if expert_match and ".lora_" in name:
        return "experts", layer, int(expert_match.group(1))
    if ".self_attn." in name and ".lora_" in name:
        return "attn", layer, None
    return "other", layer, None


def _count_all(model: nn.Module) -> int:
    from moekit.finetune.experts import expert_blocks

    storages = [block.storage(name) for block in expert_blocks(model).values() for name in block.projections]
    packed = {id(storage.weight) for storage in storages}
    total = sum(storage.numel for storage in storages)  # quantized experts counted as unpacked values
    for param in model.parameters():
        if id(param) in packed:
            continue
        quant_state = getattr(param, "quant_state", None)
        # a packed 4-bit tensor holds the values of its original shape in any storage dtype
        total += math.prod(quant_state.shape) if param.__class__.__name__ == "Params4bit" and quant_state is not None else param.numel()
    return total


def apply_targets(model: nn.Module, options: TrainingOptions):
    """Wrap `model` (from `loading.load_for_training`) for training as `options` asks; returns (model, TrainableTable).

    attn / experts get LoRA (r, alpha, dropout from `options`) on explicitly named modules, restricted by
    `options.layers` and `options.experts`; gate makes the routers' weights trainable in full (not LoRA).
    The first value is a `peft.PeftModel` when attn or experts are targeted, else the model itself (router-only).
    Raises TargetError when a request matches nothing or is out of range.
    """
    layers = describe_layers(model)
    targets = set(options.target)
    is_moe = any(layer.router is not None for layer in layers)
    if not is_moe and targets & {"experts", "gate"}:
        raise TargetError(
            f"{type(_base_model(model)).__name__} is not a mixture of experts, so --target {','.join(sorted(targets & {'experts', 'gate'}))} matches nothing",
            hint="use --target attn for a dense model",
        )
    if options.experts is not None and "experts" not in targets:
        raise TargetError("--experts only applies to --target experts", hint="add experts to --target")
    if options.layers is not None:
        out_of_range = [i for i in options.layers if i >= len(layers)]
        if out_of_range:
            raise TargetError(f"layer index {out_of_range[0]} is out of range: the model has {len(layers)} layers (0-{len(layers) - 1})")
    chosen_layers = [layer for layer in layers if options.layers is None or layer.index in options.layers]
    num_experts = max((layer.num_experts for layer in layers), default=0)
    if options.experts is not None:
        out_of_range = [i for i in options.experts if i >= num_experts]
        if out_of_range:
            raise TargetError(f"expert index {out_of_range[0]} is out of range: the model has {num_experts} experts (0-{num_experts - 1})")
    chosen_experts = list(range(num_experts)) if options.experts is None else options.experts

    lora_modules: list[str] = []
    routers: list[str] = []
    blocks: list[str] = []
    for layer in chosen_layers:
        if "attn" in targets:
            if not layer.attention:
                raise TargetError(f"layer {layer.index} has no attention linear layers to adapt")
            lora_modules += layer.attention
        if "experts" in targets and layer.experts is not None:
            if max(chosen_experts) >= layer.num_experts:
                raise TargetError(f"layer {layer.index} has only {layer.num_experts} experts")
            blocks.append(layer.experts)
        if "gate" in targets and layer.router is not None:
            routers.append(layer.router)

    prepare_for_training(_base_model(model), options.gradient_checkpointing)
    fuse_rms_norms(_base_model(model))  # one Triton launch each way on CUDA
    wrapped = model
    if lora_modules:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=lora_modules,  # full names, taken literally by PEFT
            bias="none",
            task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, config)
    base = _base_model(wrapped)
    modules = dict(base.named_modules())
    for block in blocks:  # after PEFT wrapped, which freezes every parameter that is not its own
        modules[block].add_lora(options.lora_r, options.lora_alpha, experts=chosen_experts, dropout=options.lora_dropout)
    for router in routers:
        modules[router].weight.requires_grad_(True)

    requested = {"target": sorted(targets), "experts": options.experts, "layers": options.layers, "lora_r": options.lora_r}
    table = TrainableTable(requested=requested, total_params=_count_all(wrapped))
    router_set = set(routers)
    for name, param in wrapped.named_parameters():
        if not param.requires_grad:
            continue
        kind, layer_idx, expert_idx = _classify(name, router_set)
        if _BLOCK_LORA.search(name):  # stacked over the experts: one row per adapted expert
            block = _owner(wrapped, name)
            for position, expert_idx in enumerate(block.adapted_experts):
                table.rows.append(
                    {"name": _slice_name(name, position, expert_idx), "kind": kind, "layer": layer_idx, "expert": expert_idx, "params": param[position].numel()}
                )
            continue
        table.rows.append({"name": name, "kind": kind, "layer": layer_idx, "expert": expert_idx, "params": param.numel()})
    _check_table(table, chosen_layers, chosen_experts, targets)
    return wrapped, table


def _owner(model: nn.Module, parameter_name: str) -> nn.Module:
    return model.get_submodule(parameter_name.rsplit(".", 1)[0])


def _check_table(table: TrainableTable, chosen_layers: list[MoeLayer], chosen_experts: list[int], targets: set[str]) -> None:
    """Every requested (layer, expert), attention block and router has trainable parameters; nothing else does."""
    have = defaultdict(int)
    for row in table.rows:
        have[(row["kind"], row["layer"], row["expert"])] += row["params"]
    missing = []
    for layer in chosen_layers:
        if "attn" in targets and not have[("attn", layer.index, None)]:
            missing.append(f"attention of layer {layer.index}")
        if "experts" in targets:
            missing += [f"expert {e} of layer {layer.index}" for e in chosen_experts if not have[("experts", layer.index, e)]]
        if "gate" in targets and layer.router is not None and not have[("gate", layer.index, None)]:
            missing.append(f"router of layer {layer.index}")
    if missing:
        raise TargetError(f"no trainable parameters for: {', '.join(missing)}")
    unexpected = sorted({row["name"] for row in table.rows if row["kind"] == "other"})
    if unexpected:
        raise TargetError(f"parameters outside the requested targets are trainable: {', '.join(unexpected[:5])}")


def _label(name: str) -> str:
    """'layer 1 expert 2 gate_up_proj (LoRA)' / 'layer 0 router' / 'layer 0 self_attn.q_proj (LoRA)' for a parameter name."""
    layer = _LAYER.search(name)
    where = f"layer {layer.group(1)} " if layer else ""
    if _BLOCK_LORA.search(name):
        match = _SLICE.match(name)
        projection = (match[1] if match else name).split(".lora_")[1][2:]
        return f"{where}expert {match[3] if match else '*'} {projection} (LoRA)"
    if ".lora_" not in name:
        return f"{where}router" if name.endswith("gate.weight") else name
    module = name.split(".lora_")[0]
    expert = _EXPERT.search(module + ".")
    if expert:
        return f"{where}expert {expert.group(1)} {module.rsplit('.', 1)[-1]} (LoRA)"
    return f"{where}{'.'.join(module.split('.')[-2:])} (LoRA)"


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training must change: every LoRA B (it starts at zero) and every trainable router weight;
    a stacked expert B once per adapted expert (`name[expert]`)."""
    snapshot = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _BLOCK_LORA.search(name) and ".lora_B_" in name:
            for position, expert_idx in enumerate(_owner(model, name).adapted_experts):
                snapshot[_slice_name(name, position, expert_idx)] = param[position].detach().to("cpu", copy=True)
        elif ".lora_B." in name or ".lora_" not in name:
            snapshot[name] = param.detach().to("cpu", copy=True)
    return snapshot


_SLICE = re.compile(r"^(.*)\[(\d+):expert (\d+)\]$")


def _slice_name(name: str, position: int, expert: int) -> str:
    """The name of one expert's slice of a stacked LoRA parameter: `name[position:expert E]`."""
    return f"{name}[{position}:expert {expert}]"


def _snapshot_value(params: dict, key: str):
    """The tensor a snapshot key names in `params`, or None: a parameter, or a slice (`_slice_name`) of one."""
    if key in params:
        return params[key]
    match = _SLICE.match(key)
    if match and match[1] in params:
        return params[match[1]][int(match[2])]
    return None


def verify_changed(snapshot: dict[str, torch.Tensor], model: nn.Module | dict[str, torch.Tensor]) -> None:
    """Raise TrainingError naming every snapshotted adapter/router that training left unchanged; `model` may
    also be `{parameter name: tensor}` (the trainable parameters gathered from an FSDP model)."""
    params = model if isinstance(model, dict) else dict(model.named_parameters())
    now = {name: _snapshot_value(params, name) for name in snapshot}
    unchanged = [name for name, before in snapshot.items() if now[name] is not None and torch.equal(now[name].detach().cpu(), before)]
    vanished = [name for name in snapshot if now[name] is None]
    if unchanged or vanished:
        labels = sorted(dict.fromkeys(_label(name) for name in unchanged + vanished))
        raise TrainingError(
            f"training did not change {len(labels)} targeted adapter(s)/router(s): {', '.join(labels)}",
            hint="these targets got no gradient (no tokens routed to an expert, a learning rate of 0, or too few steps)",
        )


def _router_key(name: str, architecture: str) -> str:
    """In-memory router name -> checkpoint key (Mixtral checkpoints use the legacy `block_sparse_moe`)."""
    return name.replace(".mlp.", ".block_sparse_moe.") + ".weight" if architecture == "mixtral" else name + ".weight"


def _routers(model: nn.Module) -> dict[str, nn.Parameter]:
    base = _base_model(model)
    architecture = getattr(base.config, "model_type", "")
    modules = dict(base.named_modules())
    return {_router_key(layer.router, architecture): modules[layer.router].weight for layer in describe_layers(base) if layer.router is not None}


def save_routers(model: nn.Module, path: str | Path) -> Path:
    """Write every router weight to a safetensors file under the checkpoint's key names."""
    from safetensors.torch import save_file

    tensors = {key: param.detach().to("cpu").contiguous() for key, param in _routers(model).items()}
    if not tensors:
        raise TargetError("the model has no routers to save")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


@torch.no_grad()
def load_routers(model: nn.Module, path: str | Path) -> None:
    """Copy router weights saved by `save_routers` into `model` (keys and shapes must match)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = _routers(model)
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise TargetError(
            f"{path} does not match this model's routers (missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})"
        )
    for key, param in params.items():
        if saved[key].shape != param.shape:
            raise TargetError(f"{path}: {key} has shape {tuple(saved[key].shape)}, the model's router has {tuple(param.shape)}")
        param.copy_(saved[key].to(device=param.device, dtype=param.dtype))
