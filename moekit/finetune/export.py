"""Merging a fine-tune into a standard checkpoint, and loading a fine-tune for inference.

    export(finetune_dir, out, dtype=None, merge_into="original") -> out
    load_finetuned(finetune_dir, dtype=..., device=..., merge_into="original") -> (model, tokenizer)

The MoE is loaded with the module structure it was trained in: unquantized (`bits=16`, merge_into="original", the
default: held-out perplexity was lower on the demo, docs/finetune.md) or quantized as in training (`--bits`, the NF4
or int8 weights the adapter was trained against) and dequantized by `quantize.dequantize_moe` (merge_into=
"dequantized": exactly the trained model). The adapter is loaded by
`adapter.load_adapter` (which refuses tensors that match nothing), attention LoRA is merged by PEFT and expert
LoRA by the expert blocks (W + alpha / r * B @ A per expert), the trained routers are copied in, and the weights
are written under the base checkpoint's own tensor names (for Mixtral the Hub's legacy
`block_sparse_moe.experts.E.w1/w2/w3` layout that `moekit build` writes, or the fused `mlp.experts.gate_up_proj`
layout where the base has it), so the export loads with plain transformers. Before anything is renamed into
place, every tensor is compared with the weights the merge started from: exactly the adapted modules and the
routers must differ (and, merging into dequantized weights, the base checkpoint differs only there and in the
quantized weights).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from moekit import __version__
from moekit.config_file import save_config
from moekit.errors import DependencyError, OutputError, SourceError, TrainingError

FINETUNE_METADATA = "moekit-finetune.json"
ROUTERS_FILE = "routers.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What the LoRA delta is added to: the weights the adapter was trained against (the base quantized as in training,
# then dequantized), or the base's own unquantized weights. docs/finetune.md ("Export") has the measurements.
MergeTarget = Literal["dequantized", "original"]
MERGE_TARGETS: tuple[str, ...] = ("dequantized", "original")
DEFAULT_MERGE_TARGET: MergeTarget = "original"  # lower held-out perplexity on the demo (docs/finetune.md)


def read_finetune(finetune_dir: str | Path) -> dict:
    """moekit-finetune.json of a `moekit finetune` output; SourceError if it is not one."""
    finetune_dir = Path(finetune_dir)
    path = finetune_dir / FINETUNE_METADATA
    if not path.is_file():
        from moekit.finetune.trainer import partial_dir

        unfinished = f" (an unfinished run is in {partial_dir(finetune_dir)}; finish it with --resume)" if partial_dir(finetune_dir).is_dir() else ""
        raise SourceError(f"{finetune_dir} is not a moekit finetune output: {FINETUNE_METADATA} is missing{unfinished}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path} is not valid JSON: {err}") from None


def base_model_path(metadata: dict) -> Path:
    """The local directory of the MoE a fine-tune started from (its recorded path, else its ref resolved again)."""
    recorded = metadata.get("base_model_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    from moekit.build.sources import resolve_model

    return resolve_model(metadata["base_model"])


def load_finetuned(
    finetune_dir: str | Path, *, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cpu", merge_into: MergeTarget = DEFAULT_MERGE_TARGET
):
    """(model, tokenizer): the base MoE with the adapter merged in and the trained routers loaded, in eval mode;
    the same weights as `export` with the same `merge_into`."""
    finetune_dir = Path(finetune_dir)
    metadata = read_finetune(finetune_dir)
    model, _dequantized = _load_base(finetune_dir, metadata, _dtype(dtype), device, merge_into)
    model, tokenizer, _adapted, _ = _merge_finetune(model, finetune_dir, metadata)
    return model, tokenizer


def export(
    finetune_dir: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_size: int = 2 * 10**9,
    overwrite: bool = False,
    merge_into: MergeTarget = DEFAULT_MERGE_TARGET,
) -> Path:
    """Write the merged fine-tune at `finetune_dir` to `out` in the base checkpoint's layout; returns `out`.

    merge_into="dequantized" adds the LoRA delta to the base's weights quantized as in training (`--bits`) and
    dequantized, which the adapter was trained against; "original" adds it to the base's unquantized weights."""
    from moekit.output import check_output, lock_output

    finetune_dir, out = Path(finetune_dir), Path(out)
    metadata = read_finetune(finetune_dir)
    check_output(out, overwrite=overwrite)
    lock = lock_output(out, f"export output {out}")  # one export per OUT, from the start
    try:
        _export(finetune_dir, out, metadata, dtype, shard_size, overwrite, merge_into)
    finally:
        lock.release()
    return out


def _export(finetune_dir: Path, out: Path, metadata: dict, dtype, shard_size: int, overwrite: bool, merge_into: MergeTarget) -> None:
    from moekit.build.sources import copy_tokenizer_files
    from moekit.output import staged_output

    base = base_model_path(metadata)
    out_dtype = _dtype(dtype) if dtype is not None else _config_dtype(base)
    base_tensors = _checkpoint_tensor_names(base)
    model, dequantized = _load_base(finetune_dir, metadata, out_dtype, "cpu", merge_into)
    # the weights the merge starts from, as digests (a second copy of the model would double the memory)
    before = {key: _digest(tensor) for key, tensor in _checkpoint_state_dict(model, base_tensors, {})[0].items()} if dequantized else None
    quantized = _checkpoint_keys(model, dequantized, base_tensors)
    model, tokenizer, adapted, routers_trained = _merge_finetune(model, finetune_dir, metadata)

    tensors, expected = _checkpoint_state_dict(model, base_tensors, adapted)
    if routers_trained:
        from moekit.finetune.targets import describe_layers

        expected |= {_checkpoint_name(layer.router + ".weight", base_tensors) for layer in describe_layers(model) if layer.router is not None}
    _verify_changes(tensors, base, expected, before, quantized)

    with staged_output(out, overwrite=overwrite) as staging:
        _write_tensors(tensors, staging, out_dtype, shard_size)
        config = model.config
        config.dtype = out_dtype
        config.use_cache = True
        save_config(config, staging)
        for code in base.glob("*.py"):  # model code of remote-code architectures (Phixtral)
            shutil.copy2(code, staging / code.name)
        if (base / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", staging / "generation_config.json")
        copy_tokenizer_files(base, staging)
        _write_chat_template(staging, tokenizer.chat_template)
        shutil.copy2(finetune_dir / FINETUNE_METADATA, staging / FINETUNE_METADATA)
        if (finetune_dir / "loss.png").is_file():
            shutil.copy2(finetune_dir / "loss.png", staging / "loss.png")
        _write_metadata(staging, base, metadata, finetune_dir, out_dtype, sorted(expected), merge_into if dequantized else "original")
        from moekit.publish.card import write_model_card

        write_model_card(staging)


def _write_chat_template(directory: Path, template: str | None) -> None:
    """Put the chat template the fine-tune was trained with into the base's copied tokenizer files.

    Only the template can differ from the base's tokenizer (the trainer adds one when the base has none). The
    files are otherwise the base's, unchanged: a tokenizer re-saved by transformers 5 cannot be read by
    transformers 4.x or llama.cpp's converter.
    """
    if not template:
        return
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():  # transformers reads this file before the tokenizer_config.json key
        if jinja.read_text(encoding="utf-8") != template:
            jinja.write_text(template, encoding="utf-8")
        return
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("chat_template") != template:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OutputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _config_dtype(base: Path) -> torch.dtype:
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return DTYPES.get(name, torch.bfloat16)


def _load_base(finetune_dir: Path, metadata: dict, dtype: torch.dtype, device, merge_into: MergeTarget):
    """(the base MoE in the structure it was trained in, 16-bit; the modules dequantized, for merge_into="dequantized")."""
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.quantize import dequantize_moe

    if merge_into not in MERGE_TARGETS:
        raise OutputError(f"unknown merge target {merge_into!r}; choose from {', '.join(MERGE_TARGETS)}")
    base = base_model_path(metadata)
    options = metadata.get("options", {})
    trust_remote_code = bool(options.get("trust_remote_code", False))
    bits = int(options.get("bits", 16)) if merge_into == "dequantized" else 16
    if bits != 16:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise DependencyError(
                f"merging into the dequantized {bits}-bit weights needs bitsandbytes ({err})", hint="pip install bitsandbytes, or pass --merge-into original"
            ) from None
    # quantizing the base again gives the weights the adapter was trained against: quantization is deterministic
    model = load_for_training(base, bits=bits, compute_dtype=dtype, device_map={"": device}, trust_remote_code=trust_remote_code)
    dequantized = dequantize_moe(model, dtype) if bits != 16 else []
    return model, dequantized


def _merge_finetune(model, finetune_dir: Path, metadata: dict):
    """(merged model, tokenizer, adapted modules {module name: experts adapted or None}, whether routers were loaded):
    the adapter of `finetune_dir` merged into `model` (from `_load_base`) and the trained routers loaded."""
    from transformers import AutoTokenizer

    from moekit.finetune.adapter import load_adapter
    from moekit.finetune.experts import expert_blocks
    from moekit.finetune.targets import load_routers

    base = base_model_path(metadata)
    trust_remote_code = bool(metadata.get("options", {}).get("trust_remote_code", False))
    adapted: dict[str, list[int] | None] = {}
    adapter_dir = finetune_dir / "adapter"
    routers_trained = (finetune_dir / ROUTERS_FILE).is_file()
    if (adapter_dir / "adapter_config.json").is_file():
        from peft.tuners.tuners_utils import BaseTunerLayer

        model, counts = load_adapter(model, adapter_dir)
        routers_trained = routers_trained or bool(counts["routers"])
        if hasattr(model, "peft_config"):
            adapted = {name.removeprefix("base_model.model."): None for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
            model = model.merge_and_unload()
        trained_experts = metadata.get("options", {}).get("experts")  # --experts; the adapter holds zero B slices for the others
        for name, block in expert_blocks(model).items():
            if block.has_lora:
                adapted[name] = trained_experts if trained_experts is not None else block.adapted_experts
                block.merge_lora()
    if (finetune_dir / ROUTERS_FILE).is_file():
        load_routers(model, finetune_dir / ROUTERS_FILE)
    model.eval()
    model.config.use_cache = True  # the training loader turns it off
    tokenizer_dir = next((d for d in (adapter_dir, finetune_dir / "tokenizer") if (d / "tokenizer_config.json").is_file()), base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, adapted, routers_trained


def _checkpoint_name(name: str, base_tensors) -> str:
    """In-memory name -> base checkpoint name: Mixtral routers live in the legacy `block_sparse_moe` where the base has it."""
    legacy = name.replace(".mlp.", ".block_sparse_moe.")
    return legacy if name not in base_tensors and legacy in base_tensors else name


def _block_tensors(name: str, block, base_tensors) -> dict[str, tuple[torch.Tensor, int | None]]:
    """{checkpoint name: (tensor, expert; -1 for a fused tensor of all experts, None for a bias)} of a merged block."""
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    if block.family == "phixtral":
        weights = {projection: block.dequantized(projection) for projection in block.projections}
        for expert in range(block.num_experts):
            for projection in block.projections:
                out[f"{name}.{expert}.{projection}.weight"] = (weights[projection][expert], expert)
                out[f"{name}.{expert}.{projection}.bias"] = (getattr(block, f"{projection}_bias")[expert], None)
        return out
    gate_up, down = block.dequantized("gate_up_proj"), block.dequantized("down_proj")
    if f"{name}.gate_up_proj" in base_tensors:  # the fused layout (mergekit-moe, transformers 5's save_pretrained)
        return {f"{name}.gate_up_proj": (gate_up, -1), f"{name}.down_proj": (down, -1)}
    legacy = name.replace(".mlp.", ".block_sparse_moe.")
    inter = down.shape[-1]
    for expert in range(block.num_experts):
        out[f"{legacy}.{expert}.w1.weight"] = (gate_up[expert, :inter], expert)
        out[f"{legacy}.{expert}.w3.weight"] = (gate_up[expert, inter:], expert)
        out[f"{legacy}.{expert}.w2.weight"] = (down[expert], expert)
    return out


def _checkpoint_tensor_names(base: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the base checkpoint's safetensors files."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if not shapes:
        raise SourceError(f"no safetensors weights in {base}")
    return shapes


def _checkpoint_state_dict(model, base_tensors: dict[str, tuple[int, ...]], adapted: dict) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(the merged weights under the base checkpoint's names, the names LoRA changed); the name sets and shapes
    must match the base exactly."""
    from moekit.finetune.experts import expert_blocks

    blocks = expert_blocks(model)
    tensors, expected = {}, set()
    for name, tensor in model.state_dict().items():
        if any(name.startswith(block + ".") for block in blocks):
            continue
        key = _checkpoint_name(name, base_tensors)
        if key not in base_tensors and key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied to the embeddings, not stored
        tensors[key] = tensor
        if name.removesuffix(".weight") in adapted:
            expected.add(key)
    for name, block in blocks.items():
        experts = adapted.get(name)
        for key, (tensor, expert) in _block_tensors(name, block, base_tensors).items():
            tensors[key] = tensor
            if experts is not None and expert is not None and (expert == -1 or expert in experts):
                expected.add(key)
    missing, extra = sorted(set(base_tensors) - set(tensors)), sorted(set(tensors) - set(base_tensors))
    if missing or extra:
        raise TrainingError(f"the merged model does not match the base checkpoint's layout (missing: {missing[:3]}, unexpected: {extra[:3]})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != base_tensors[key]:
            raise TrainingError(f"{key}: merged shape {tuple(tensor.shape)} differs from the base checkpoint's {base_tensors[key]}")
    return tensors, expected


def _checkpoint_keys(model, modules: list[str], base_tensors) -> set[str]:
    """The checkpoint names of the weights of `modules` (linear layers and expert blocks of `model`)."""
    from moekit.finetune.experts import expert_blocks

    blocks = expert_blocks(model)
    keys = set()
    for name in modules:
        if name in blocks:  # the expert weights; biases were never quantized
            keys |= {key for key, (_tensor, expert) in _block_tensors(name, blocks[name], base_tensors).items() if expert is not None}
        else:
            keys.add(_checkpoint_name(name + ".weight", base_tensors))
    return keys


def _digest(tensor: torch.Tensor) -> bytes:
    """Equal digests for bitwise-equal values (+0.0 for -0.0: adding a zero delta turns one into the other)."""
    canonical = (tensor.detach().cpu() + 0).contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(canonical.numpy(), digest_size=16).digest()


def _verify_changes(
    tensors: dict[str, torch.Tensor], base: Path, expected: set[str], before: dict[str, bytes] | None = None, quantized: set[str] = frozenset()
) -> None:
    """Exactly the tensors in `expected` differ from the weights the merge started from: the base checkpoint
    (compared in the export dtype), or with `before` (digests of the dequantized weights) those, and then the
    base checkpoint differs only in the `quantized` and `expected` tensors."""
    from safetensors import safe_open

    changed_from_base = set()
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                merged = tensors[key]
                if not torch.equal(handle.get_tensor(key).to(merged.dtype), merged.cpu()):
                    changed_from_base.add(key)
    changed = changed_from_base if before is None else {key for key, tensor in tensors.items() if _digest(tensor) != before[key]}
    unchanged, unexpected = sorted(expected - changed), sorted(changed - expected)
    if before is not None:
        unexpected += sorted(changed_from_base - expected - quantized)  # neither trained nor quantized, yet not the base's
    if unchanged or unexpected:
        raise TrainingError(
            "the merged weights do not differ from the "
            + ("base" if before is None else "dequantized base")
            + " exactly where the fine-tune trained"
            + (f"; unchanged although trained: {', '.join(unchanged[:5])}" if unchanged else "")
            + (f"; changed although not trained: {', '.join(unexpected[:5])}" if unexpected else ""),
            hint="nothing was written",
        )


def _write_tensors(tensors: dict[str, torch.Tensor], staging: Path, dtype: torch.dtype, shard_size: int) -> None:
    """Shards and index written by `moekit build`'s own writer, so the layout is the same."""
    from moekit.build.arch.base import PlannedTensor
    from moekit.build.writer import write_sharded

    planned = [
        PlannedTensor(name, tuple(tensor.shape), "merged fine-tune", lambda tensor=tensor: tensor.detach().cpu().to(dtype)) for name, tensor in tensors.items()
    ]
    write_sharded(planned, staging, dtype=dtype, shard_size=shard_size)


def _write_metadata(staging: Path, base: Path, finetune: dict, finetune_dir: Path, dtype: torch.dtype, changed: list[str], merge_into: MergeTarget) -> None:
    base_meta_path = base / "moekit.json"
    metadata = json.loads(base_meta_path.read_text(encoding="utf-8")) if base_meta_path.is_file() else {}
    metadata.update(
        {
            "moekit_version": __version__,
            "kind": "export",
            "dtype": str(dtype).removeprefix("torch."),
            "finetune": {
                "source": str(finetune_dir.resolve()),
                "base_moe": finetune.get("base_model"),
                "datasets": finetune.get("datasets"),
                "steps": finetune.get("steps"),
                "changed_tensors": len(changed),
                "bits": finetune.get("options", {}).get("bits"),
                "merge_into": merge_into,
            },
        }
    )
    (staging / "moekit.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
