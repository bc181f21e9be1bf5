"""Streaming a checkpoint into a model for training: CPU memory bounded by one tensor in flight (on a GPU).

    load_for_training(path, bits=4, device_map={"": "cuda"}) -> model

`AutoModelForCausalLM.from_pretrained(..., device_map="cpu")` holds the whole checkpoint in CPU memory,
and transformers 5 fuses the experts on the way (a second copy of them), before `quantize_moe` could
quantize anything. Here the model is built on the meta device instead (parameters only; buffers such
as rotary frequencies are computed as usual), and every weight is read from the safetensors shards
when its module is converted:
- a linear layer: its weight (and bias) is read, quantized onto the device by the same helper
  `quantize_moe` uses (`quantize._new_linear`), and dropped;
- an expert block: the layer's experts are gathered into canonical fused tensors (below) on the device,
  from either checkpoint layout, and handed to `experts.build_expert_block`, which quantizes them there (on a GPU,
  CPU memory then holds one checkpoint tensor at a time, the GPU one layer's unquantized experts);
- everything else (embeddings, norms, routers, lm_head): read in the compute dtype onto the device.
The result is what `from_pretrained` on the CPU + `quantize_moe` gives, bit for bit (tests check it).

Canonical expert tensors, one layer at a time:
- gated experts (Mixtral, and any model with transformers' fused `gate_up_proj`/`down_proj`):
  `gate_up_proj` (E, 2I, H), gate rows first, then up rows; `down_proj` (E, H, I).
  Read from transformers 5's fused layout (`mlp.experts.gate_up_proj`, as mergekit-moe writes it) or
  the Hub's per-expert layout (`block_sparse_moe.experts.E.w1/w3/w2`, as transformers' own
  `save_pretrained` and `moekit build` write it; or `experts.E.gate_proj/up_proj/down_proj`).
- Phixtral: `fc1.weight` (E, I, H), `fc1.bias` (E, I), `fc2.weight` (E, H, I), `fc2.bias` (E, H).

Reading: safetensors maps each shard into memory, and every page of a mapping that has been read
counts as resident until the mapping is closed. Each tensor (or each expert's slice of a fused
tensor) is therefore copied out of a freshly opened shard, which is closed again before the next
read, as the build's reader does (`moekit.build.sources.SourceModel.tensor`): the resident set holds
what the loader really keeps, plus one tensor in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import SourceError
from moekit.finetune.experts import build_expert_block
from moekit.finetune.quantize import (
    KEEP_FULL_PRECISION,
    _is_plain_linear,
    _new_linear,
    _require_bitsandbytes,
    _resolve_device,
    expert_tensors,
    is_router,
)

logger = logging.getLogger(__name__)

# Hub names of the per-expert gated projections (gate, up, down): Mixtral's, then Qwen-MoE-like ones
PER_EXPERT_GATED_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
# transformers renames legacy Mixtral blocks on load (`conversion_mapping`, WeightRenaming)
LEGACY_RENAMES = ((".block_sparse_moe.", ".mlp."),)


class CheckpointReader:
    """The safetensors tensors of a checkpoint directory, read one at a time (shards found through the index)."""

    def __init__(self, path: Path):
        from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
        from safetensors import SafetensorError

        self.path = Path(path)
        if not (self.path / "model.safetensors").is_file() and not (self.path / "model.safetensors.index.json").is_file():
            has_pickle = any(self.path.glob("*.bin")) or any(self.path.glob("*.pt"))
            raise SourceError(
                f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json)"
                + (": its weights are in pickle format (.bin), which moekit does not load for training" if has_pickle else ""),
                hint="convert the checkpoint to safetensors (e.g. save_pretrained with a recent transformers)" if has_pickle else None,
            )
        try:
            index = ShardedTensorIndex.from_disk(str(self.path))
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise SourceError(f"cannot read the safetensors weights of {path}: {err}") from None
        self.shards: dict[str, Path] = {key: self.path / shard for key, shard in index.tensor_paths.items()}

    def keys(self) -> list[str]:
        return list(self.shards)

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """A private CPU copy of tensor `key` in `dtype` (floating-point tensors only; others keep theirs)."""
        from safetensors import safe_open

        with safe_open(self.shards[key], framework="pt") as shard:
            mapped = shard.get_tensor(key)
            return mapped.to(dtype=dtype if mapped.is_floating_point() else mapped.dtype, copy=True)

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> None:
        """Copy tensor `key` (or its `index`-th slice along dim 0) into `out`, converting the dtype."""
        from safetensors import safe_open

        with safe_open(self.shards[key], framework="pt") as shard:
            mapped = shard.get_tensor(key) if index is None else shard.get_slice(key)[index]
            if tuple(mapped.shape) != tuple(out.shape):
                raise SourceError(
                    f"{self.path}: tensor {key}{'' if index is None else f'[{index}]'} has shape {tuple(mapped.shape)}, the model expects {tuple(out.shape)}"
                )
            out.copy_(mapped)


@dataclass
class _ExpertBlock:
    """One layer's experts: its family and activation, and where each canonical tensor comes from."""

    name: str  # e.g. "model.layers.3.mlp.experts"
    family: str  # "mixtral" (gated, fused) or "phixtral" (fc1/fc2 with biases)
    act_fn: nn.Module
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape
    # canonical name -> [(checkpoint key or None if absent, expert slice of that tensor to read or None, where it goes)]
    sources: dict[str, list[tuple[str | None, int | None, tuple]]]


@dataclass
class Quantization:
    """How loaded weights are stored: `bits` 4 (NF4, double-quantized), 8 (LLM.int8) or 16 (`compute_dtype`), on `device`."""

    bits: int
    compute_dtype: torch.dtype
    quant_storage: torch.dtype
    device: torch.device

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A linear layer holding `weight` (out, in), as `quantize_moe` makes it."""
        return _new_linear(weight, bias, bits=self.bits, compute_dtype=self.compute_dtype, quant_storage=self.quant_storage, device=self.device)


@dataclass
class _Step:
    """Loading one module's (or one parameter's) weights: which checkpoint tensors, and how."""

    name: str
    keys: list[str]
    load: Callable  # (reader, quantization) -> None
    missing: str | None = None  # what the checkpoint lacks for it


def load_for_training(
    path: str | Path,
    *,
    bits: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    device_map=None,
    quant_storage: torch.dtype = torch.uint8,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Load a Mixtral/Phixtral (or dense) checkpoint for training with every linear layer at `bits`.

    Streams the safetensors tensor by tensor (one layer's experts at a time) onto the device
    (`device_map`: a device, {"": device} or None for the GPU if there is one), quantizing as it goes:
    4 (NF4, double-quantized), 8 (LLM.int8) or 16 (plain `nn.Linear` in `compute_dtype`); routers,
    embeddings, norms and lm_head in `compute_dtype`. The same model as `from_pretrained` +
    `quantize_moe`, without the checkpoint ever being whole in CPU memory. `config.use_cache` is off.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from moekit.models import register_phixtral

    register_phixtral()

    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    device = _resolve_device(device_map)
    if bits != 16:
        _require_bitsandbytes(device, compute_dtype)
    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None
    reader = CheckpointReader(path)
    # parameters on the meta device (no memory); buffers (rotary frequencies) computed as from_pretrained does
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # lm_head = embeddings where the config says so (init_empty_weights leaves them apart)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: keep the one made from the config, as from_pretrained does

    quantization = Quantization(bits, compute_dtype, quant_storage, device)
    steps = _plan(model, reader)
    _check_complete(model, reader, steps)
    from tqdm.auto import tqdm

    from moekit.finetune.distributed import is_main_process

    with tqdm(total=sum(len(step.keys) for step in steps), desc="loading weights", unit="tensor", disable=not progress or not is_main_process()) as bar:
        while steps:
            step = steps.pop(0)  # dropped once done, with the skeleton modules it refers to (measured: a steadier peak)
            step.load(reader, quantization)
            bar.update(len(step.keys))
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    model.eval()  # as from_pretrained leaves it
    model.is_loaded_in_4bit = bits == 4
    model.is_loaded_in_8bit = bits == 8
    model.moekit_bits = bits
    model.config.use_cache = False
    return model


# --- planning: which checkpoint tensors each module needs, before any is read ----------------------


def _plan(model: nn.Module, reader: CheckpointReader) -> list[_Step]:
    """One step per expert block, linear layer and other parameter, in model order."""
    available = {_model_name(key): key for key in reader.keys()}
    positions: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id(param) -> (module, attribute, full name); tied ones share
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                positions.setdefault(id(param), []).append((module, name, f"{module_name}.{name}" if module_name else name))
    steps: list[_Step] = []
    planned: set[int] = set()
    expert_prefixes: list[str] = []
    for module_name, module in list(model.named_modules()):
        if any(module_name.startswith(prefix) for prefix in expert_prefixes):
            continue
        parent_name, _, attribute = module_name.rpartition(".")
        block = _expert_block(module_name, module, available)
        if block is not None:
            expert_prefixes.append(module_name + ".")
            steps.append(_experts_step(block, model.get_submodule(parent_name), attribute))
        elif module_name and _is_plain_linear(module) and not is_router(module_name, module) and attribute not in KEEP_FULL_PRECISION:
            keys = {name: available.get(f"{module_name}.{name}") for name in ("weight", "bias") if getattr(module, name) is not None}
            planned.update(id(getattr(module, name)) for name in keys)
            steps.append(_linear_step(module_name, model.get_submodule(parent_name), attribute, keys))
        else:
            for param in module._parameters.values():
                if param is not None and id(param) not in planned:
                    planned.add(id(param))
                    steps.append(_parameter_step(positions[id(param)], available, param.requires_grad))
    return steps


def _model_name(key: str) -> str:
    for old, new in LEGACY_RENAMES:
        key = key.replace(old, new)
    return key


def _expert_block(name: str, module: nn.Module, available: dict[str, str]) -> _ExpertBlock | None:
    """The expert block `module` is (as `quantize_moe` finds them), with the checkpoint tensors of each canonical tensor, or None."""
    found = expert_tensors(module) if name.rpartition(".")[2] == "experts" else None
    if found is None:
        return None
    family, skeleton_tensors, act_fn = found  # on the meta device: their shapes
    shapes = {canonical: tuple(tensor.shape) for canonical, tensor in skeleton_tensors.items()}
    experts = shapes[next(iter(shapes))][0]
    if family == "mixtral":
        intermediate = shapes["down_proj"][2]
        if f"{name}.gate_up_proj" in available:  # transformers 5's fused layout: read expert by expert
            sources = {canonical: [(available.get(f"{name}.{canonical}"), e, (e,)) for e in range(experts)] for canonical in shapes}
            return _ExpertBlock(name, family, act_fn, shapes, sources)
        gate, up, down = next((names for names in PER_EXPERT_GATED_NAMES if f"{name}.0.{names[0]}.weight" in available), PER_EXPERT_GATED_NAMES[0])
        sources = {
            "gate_up_proj": [(available.get(f"{name}.{e}.{projection}.weight"), None, (e, rows)) for e in range(experts)
                             for projection, rows in ((gate, slice(0, intermediate)), (up, slice(intermediate, None)))],
            "down_proj": [(available.get(f"{name}.{e}.{down}.weight"), None, (e,)) for e in range(experts)],
        }  # fmt: skip
        return _ExpertBlock(name, family, act_fn, shapes, sources)
    sources = {canonical: [(available.get(f"{name}.{e}.{canonical}"), None, (e,)) for e in range(experts)] for canonical in shapes}
    return _ExpertBlock(name, family, act_fn, shapes, sources)


def _check_complete(model: nn.Module, reader: CheckpointReader, steps: list[_Step]) -> None:
    """Refuse, before reading any weight, a checkpoint that lacks tensors the model needs; log the ones it does not use."""
    missing = [step.missing for step in steps if step.missing]
    if missing:
        raise SourceError(
            f"{reader.path} does not hold every weight of a {type(model).__name__}: nothing for {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
            hint="is it a complete checkpoint of this architecture, in the transformers layout?",
        )
    used = {key for step in steps for key in step.keys}
    unused = [key for key in reader.keys() if key not in used and not key.endswith("rotary_emb.inv_freq")]
    if unused:
        logger.warning("%s: %d checkpoint tensors not used by the model, e.g. %s", reader.path, len(unused), ", ".join(unused[:3]))


# --- loading: one step per module -----------------------------------------------------------------


def _parameter_step(places: list[tuple[nn.Module, str, str]], available: dict[str, str], requires_grad: bool) -> _Step:
    name = places[0][2]
    key = next((available[full] for _, _, full in places if full in available), None)

    def load(reader: CheckpointReader, quantization: Quantization) -> None:
        value = reader.read(key, quantization.compute_dtype).to(quantization.device)
        param = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
        for module, attribute, _ in places:  # tied parameters (embeddings = lm_head) stay one parameter
            module._parameters[attribute] = param

    return _Step(name, [key] if key else [], load, None if key else name)


def _linear_step(name: str, parent: nn.Module, attribute: str, keys: dict[str, str | None]) -> _Step:
    def load(reader: CheckpointReader, quantization: Quantization) -> None:
        weight = reader.read(keys["weight"], quantization.compute_dtype)  # (out, in)
        bias = reader.read(keys["bias"], quantization.compute_dtype) if "bias" in keys else None
        setattr(parent, attribute, quantization.linear(weight, bias))

    missing = [f"{name}.{part}" for part, key in keys.items() if key is None]
    return _Step(name, [key for key in keys.values() if key], load, missing[0] if missing else None)


def _experts_step(block: _ExpertBlock, parent: nn.Module, attribute: str) -> _Step:
    def load(reader: CheckpointReader, quantization: Quantization) -> None:
        tensors = {}
        for canonical, shape in block.shapes.items():
            tensors[canonical] = torch.empty(shape, dtype=quantization.compute_dtype, device=quantization.device)
            for key, expert, destination in block.sources[canonical]:
                reader.read_into(key, tensors[canonical][destination], index=expert)
        setattr(
            parent,
            attribute,
            build_expert_block(
                block.family,
                tensors,
                bits=quantization.bits,
                compute_dtype=quantization.compute_dtype,
                quant_storage=quantization.quant_storage,
                device=quantization.device,
                act_fn=block.act_fn,
            ),
        )
        del tensors
        _return_freed_memory()

    keys = list(dict.fromkeys(key for parts in block.sources.values() for key, _, _ in parts if key))
    absent = sum(key is None for parts in block.sources.values() for key, _, _ in parts)
    return _Step(block.name, keys, load, f"{block.name} ({absent} expert tensors)" if absent else None)


def _return_freed_memory() -> None:
    """Give the memory freed with a layer's expert tensors back to the OS.

    glibc keeps freed chunks of its heap for reuse, but small allocations made meanwhile (quantized weights
    on a CPU device, other tensors) land in the holes, so the next layer's buffers no longer fit there: the
    resident set then grows by up to a layer per layer (measured on the CPU). `malloc_trim` releases the
    free pages wherever they are. Elsewhere than glibc this does nothing.
    """
    import ctypes

    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library the interpreter runs on
    if malloc_trim is not None:
        malloc_trim(0)
