"""The models of an evaluation: which ones (the MoE, its sources from moekit.json, an adapter) and how each is loaded."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moekit.errors import DependencyError, SourceError
from moekit.eval.options import EvalOptions


@dataclass
class ModelSpec:
    name: str
    ref: str
    path: Path
    role: Literal["moe", "dense", "source"]  # the evaluated model is "dense" when its config has no experts
    experts: list[int] = field(default_factory=list)  # expert slots this source fills in the MoE
    base: bool = False
    adapter: Path | None = None  # a finetune directory: load through moekit.finetune.export


def label(ref: str) -> str:
    """A short name for a model reference: zoo:NAME -> NAME, a path or Hub id -> its last part."""
    return ref.removeprefix("zoo:").split("@")[0].rstrip("/").split("/")[-1] or ref


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return result


def read_metadata(path: Path) -> dict:
    file = path / "moekit.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SourceError(f"cannot read {file}: {err}") from None


def _resolve(ref: str, metadata: dict) -> Path:
    from moekit.build.sources import resolve_model

    recorded = metadata.get("sources", {}).get(ref, {}).get("path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return resolve_model(ref)


def plan_models(model: str | Path, options: EvalOptions) -> tuple[list[ModelSpec], dict, list[str]]:
    """(models to evaluate, the MoE's moekit.json, expert names); resolves every source up front."""
    from moekit.build.sources import resolve_model

    try:
        moe_path = resolve_model(str(model))
    except SourceError as err:
        raise SourceError(f"cannot evaluate {model}: {err.message}", hint=err.hint) from None
    metadata = read_metadata(moe_path)
    role = _model_role(moe_path, model)
    expert_refs = [expert["source_model"] for expert in metadata.get("experts", [])]
    expert_names = _unique([label(ref) for ref in expert_refs])
    if options.against is not None:
        refs = list(dict.fromkeys(options.against))
    else:
        refs = list(dict.fromkeys([r for r in [metadata.get("base_model"), *expert_refs] if r]))
    moe_name = label(str(model)) if not Path(model).is_dir() else Path(model).resolve().name
    names = _unique([moe_name, *(label(ref) for ref in refs)])
    specs = [ModelSpec(names[0], str(model), moe_path, role)]
    for name, ref in zip(names[1:], refs):
        try:
            path = _resolve(ref, metadata)
        except SourceError as err:
            raise SourceError(f"cannot evaluate against {ref}: {err.message}", hint=err.hint) from None
        slots = [i for i, r in enumerate(expert_refs) if r == ref]
        specs.append(ModelSpec(name, ref, path, "source", experts=slots, base=ref == metadata.get("base_model")))
    if options.adapter:
        adapter = Path(options.adapter).expanduser()
        if not adapter.is_dir():
            raise SourceError(f"adapter directory {options.adapter} does not exist", hint="pass a `moekit finetune` output directory")
        try:
            from moekit.finetune.export import read_finetune
        except ImportError:
            raise DependencyError("--adapter needs moekit.finetune.export, which this installation lacks") from None
        read_finetune(adapter)  # SourceError now, before any model is loaded, if it is not a finetune output
        specs.insert(1, ModelSpec(_unique([*names, f"{moe_name}+{label(str(adapter))}"])[-1], str(adapter), adapter, "moe", adapter=adapter))
    return specs, metadata, expert_names


def _model_role(path: Path, ref) -> str:
    """'moe' or 'dense' from config.json; SourceError for a config missing what the model's shape needs."""
    from moekit.plan import MOE_TYPES, missing_fields

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"cannot evaluate {ref}: {path} has no config.json") from None
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot evaluate {ref}: cannot read {path / 'config.json'}: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    missing = missing_fields(config, model_type) if model_type else []
    if missing:
        raise SourceError(
            f"cannot evaluate {ref}: its config.json lacks required fields: {', '.join(missing)}",
            hint="transformers would fill them in with its defaults, which are not this model's; add them to config.json",
        )
    return "moe" if model_type in MOE_TYPES or config.get("num_local_experts") or config.get("num_experts") else "dense"


def eval_device(options: EvalOptions) -> str:
    import torch

    if options.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if options.device == "cuda" and not torch.cuda.is_available():
        raise DependencyError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return options.device


def _dtype(options: EvalOptions, device: str):
    import torch

    if options.dtype == "auto":
        return "auto" if device == "cuda" else torch.float32
    return getattr(torch, options.dtype)


def load_model(spec: ModelSpec, options: EvalOptions, device: str, trust_remote_code: bool):
    """(model, tokenizer) for one entry, on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.models import register_phixtral

    register_phixtral()  # a moekit Phixtral loads without trust_remote_code
    dtype = _dtype(options, device)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    if spec.adapter is not None:
        from moekit.finetune.export import load_finetuned

        model, tokenizer = load_finetuned(spec.adapter, dtype=compute if dtype == "auto" else dtype, device=device)
        return model.eval(), tokenizer
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    # transformers' bitsandbytes config quantizes nn.Linear only and would leave the fused 3-D MoE experts
    # in 16 bit, so the MoE is quantized by moekit's quantize_moe (experts included) after loading.
    quantize_after_loading = options.load_in_4bit and spec.role == "moe"
    if options.load_in_4bit and not quantize_after_loading:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": device}
    if quantize_after_loading:
        kwargs["dtype"] = compute
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(f"cannot load {spec.role} model {spec.ref} from {spec.path}: {str(err).splitlines()[0]}") from None
    if quantize_after_loading:
        from moekit.finetune.quantize import quantize_moe

        quantize_moe(model, bits=4, compute_dtype=compute, device=device)
    elif "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def same_tokenizer(ours, theirs) -> bool:
    """Whether two tokenizers split text identically (same vocabulary, specials and output on a probe)."""
    probe = "Perplexity is comparable only between identical tokenizers: 12 + 30 = 42.\n  def f(x):"
    return (
        ours.get_vocab() == theirs.get_vocab()
        and ours.bos_token_id == theirs.bos_token_id
        and ours.eos_token_id == theirs.eos_token_id
        and ours(probe, add_special_tokens=False)["input_ids"] == theirs(probe, add_special_tokens=False)["input_ids"]
    )


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
