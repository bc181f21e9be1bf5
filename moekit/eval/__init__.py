"""`moekit eval`: an MoE next to each of its source models on the same data, with routing statistics.

    evaluate(model, out, EvalOptions(...)) -> EvalReport

Everything that can be wrong with the input (missing models, unreadable data files, unknown lm-eval
tasks, lm-eval not installed) is checked before the first model is loaded. Models are then loaded
and evaluated one at a time and freed in between, and the report is written to a temporary sibling
of OUT and renamed into place at the end.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moekit import __version__
from moekit.errors import DataError, DependencyError, SourceError

# Sets smaller than this many tokens (MoE tokenizer) are flagged as sanity checks in the report.
SMALL_SET_TOKENS = 2000
LOSS_DEFINITION = (
    "loss = token-weighted mean negative log-likelihood (nats) over every scored token of the set (each document "
    "is preceded by one BOS/EOS prefix token and scored up to max_length tokens; padding is masked); "
    "perplexity = exp(loss); bits_per_byte = summed NLL / (ln 2 * UTF-8 bytes of the scored text)."
)


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    against: list[str] | None = Field(default=None, description="Source models to compare with (paths, Hub ids, zoo:NAME); default: the build's base and experts from moekit.json.")
    data: dict[str, str] = Field(default_factory=dict, description="Evaluation sets, name -> text file, .jsonl (text or messages) or hf:dataset[:split]; default: each expert's positive prompts.")
    adapter: str | None = Field(default=None, description="A `moekit finetune` output directory whose fine-tuned MoE is evaluated as an extra model.")
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names (needs the lm-eval extra).")
    include_path: list[str] = Field(default_factory=list, description="Directories (or YAML files' folders) with local lm-eval task definitions.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device to evaluate on (auto: cuda when available).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(default="auto", description="Weights dtype (auto: the checkpoint's on cuda, float32 on cpu).")
    load_in_4bit: bool = Field(default=False, description="Load every model with bitsandbytes NF4 weights.")
    batch_size: int = Field(default=8, ge=1, description="Documents per forward pass (and lm-eval batch size).")
    max_length: int = Field(default=1024, ge=2, description="Longest scored document in tokens; longer ones are truncated (and counted in the report).")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many documents per set and examples per lm-eval task.")
    overwrite: bool = Field(default=False, description="Replace OUT if it exists and is not empty.")
    trust_remote_code: bool = Field(default=False, description="Allow custom model code from the models' repositories.")


@dataclass
class EvalReport:
    report: dict
    out: Path | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report.json content."""
        return self.report

    def markdown_table(self) -> str:
        from moekit.eval.report import markdown_table

        return markdown_table(self.report)


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
        raise SourceError(f"cannot evaluate {ref}: its config.json lacks required fields: {', '.join(missing)}",
                          hint="transformers would fill them in with its defaults, which are not this model's; add them to config.json")
    return "moe" if model_type in MOE_TYPES or config.get("num_local_experts") or config.get("num_experts") else "dense"


def load_sets(options: EvalOptions, metadata: dict, expert_names: list[str]):
    from moekit.eval.data import load_set, prompt_sets

    expert_refs = [expert["source_model"] for expert in metadata.get("experts", [])]
    if options.data:
        sets = []
        for name, spec in options.data.items():
            eval_set = load_set(name, spec, options.limit)
            for index, (expert_name, ref) in enumerate(zip(expert_names, expert_refs)):
                if name in (expert_name, ref, label(ref)):
                    eval_set.expert = index
            sets.append(eval_set)
        return sets
    sets = prompt_sets(metadata, expert_names)
    for eval_set in sets:
        eval_set.documents = eval_set.documents[: options.limit] if options.limit else eval_set.documents
    return sets


def _device(options: EvalOptions) -> str:
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


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_entry(
    model,
    tokenizer,
    sets: dict[str, list],
    *,
    name: str,
    path: str,
    role: Literal["moe", "dense", "source"],
    batch_size: int = 8,
    max_length: int = 1024,
    reference_tokenizer=None,
    expert_names: list[str] | None = None,
    expert_of_set: dict[str, int] | None = None,
) -> dict:
    """A report.json `models` entry for an already-loaded model: metrics per set ({name: documents}, each a
    string or a chat) and, for an MoE, its `routing`. `reference_tokenizer` is the MoE's, for `same_tokenizer`.
    The demo uses it to add a fine-tuned model to a report before rendering it again."""
    from tqdm.auto import tqdm

    from moekit.eval.data import render
    from moekit.eval.metrics import perplexity
    from moekit.eval.routing import ROUTER_FORWARD_KWARGS, RoutingCollector, moe_layout

    same = reference_tokenizer is None or same_tokenizer(reference_tokenizer, tokenizer)
    entry = {"name": name, "path": str(path), "role": role, "same_tokenizer": same, "metrics": {}}
    layout = moe_layout(model) if role == "moe" else None
    collector = RoutingCollector(*layout) if layout else None
    with tqdm(total=sum(len(documents) for documents in sets.values()), desc=f"evaluating {name}", unit="doc") as bar:
        for set_name, documents in sets.items():
            texts = [render(document, tokenizer) for document in documents]
            result = perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=bar,
                                observer=collector.observer(set_name) if collector else None,
                                forward_kwargs=ROUTER_FORWARD_KWARGS if collector else None)
            entry["metrics"][set_name] = result.to_dict()
    if collector is not None and sets:
        names = expert_names if expert_names and len(expert_names) == layout[0] else None
        entry["routing"] = collector.stats(names, expert_of_set) | {"model": name}
    return entry


def evaluate(model: str | Path, out: Path | str, options: EvalOptions | None = None) -> EvalReport:
    """Evaluate the MoE at `model` against its sources; writes OUT/report.json, report.md and charts."""
    from moekit.output import check_output, lock_output

    options = options or EvalOptions()
    out = Path(out)
    check_output(out, options.overwrite, what="report directory")
    lock = lock_output(out, f"report directory {out}")  # one evaluation per OUT, from the start
    try:
        return _evaluate(model, out, options)
    finally:
        lock.release()


def _evaluate(model: str | Path, out: Path, options: EvalOptions) -> EvalReport:
    from moekit.eval.report import write_report

    specs, metadata, expert_names = plan_models(model, options)
    sets = load_sets(options, metadata, expert_names)
    manager = None
    if options.tasks:
        from moekit.console import status
        from moekit.eval.lm_eval_tasks import prepare_tasks, task_manager

        with status("indexing lm-eval tasks and loading their datasets"):
            manager = task_manager(options.tasks, options.include_path)
            prepare_tasks(options.tasks, manager)
    if not sets and not options.tasks:
        raise DataError("nothing to evaluate: the model has no moekit.json with expert prompts", hint="pass --data NAME=PATH or --task TASK")
    device = _device(options)
    documents = {s.name: s.documents for s in sets}
    expert_of_set = {s.name: s.expert for s in sets if s.expert is not None}

    entries, moe_tokenizer = [], None
    for spec in specs:
        model_obj, tokenizer = load_model(spec, options, device, options.trust_remote_code)
        moe_tokenizer = moe_tokenizer or tokenizer
        entry = model_entry(model_obj, tokenizer, documents, name=spec.name, path=str(spec.path), role=spec.role, batch_size=options.batch_size,
                            max_length=options.max_length, reference_tokenizer=moe_tokenizer, expert_names=expert_names, expert_of_set=expert_of_set)
        entry["ref"] = spec.ref
        if spec.role == "source":
            entry.update({"base": spec.base, "experts": spec.experts})
        if spec.adapter is not None:
            entry["adapter"] = str(spec.adapter)
        if manager is not None:
            from moekit.eval.lm_eval_tasks import run_tasks

            entry["tasks"] = run_tasks(model_obj, tokenizer, options.tasks, manager, batch_size=options.batch_size, max_length=options.max_length, limit=options.limit)
        entries.append(entry)
        del model_obj  # the next model is loaded only after this one is gone
        _release_memory()
    routing = entries[0].pop("routing", None)  # the MoE's routing is the report's; an adapter entry keeps its own

    moe_metrics = entries[0]["metrics"]
    data = {
        s.name: {
            "source": s.source,
            "documents": len(s.documents),
            "tokens": moe_metrics[s.name]["tokens"],
            "bytes": moe_metrics[s.name]["bytes"],
            "truncated": moe_metrics[s.name]["truncated"],
            "expert": s.expert,
            "small": moe_metrics[s.name]["tokens"] < SMALL_SET_TOKENS,
        }
        for s in sets
    }
    _mark_training_overlap(data, sets, specs)
    notes = [LOSS_DEFINITION]
    if any(not e["same_tokenizer"] for e in entries):
        notes.append("Some sources use a different tokenizer than the MoE: their perplexities are per token of their own tokenizer; compare bits_per_byte.")
    if not data:
        notes.append("No perplexity sets (lm-eval tasks only).")
    elif not options.data:
        notes.append(f"Default data: each expert's positive prompts from moekit.json ({sum(d['tokens'] for d in data.values())} tokens in all) - a sanity check, not a benchmark.")
    report = {
        "moekit_version": __version__,
        "kind": "eval",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": specs[0].name, "path": str(specs[0].path), "ref": specs[0].ref, "architecture": metadata.get("architecture")},
        "settings": {k: v for k, v in options.model_dump().items() if k in ("device", "dtype", "load_in_4bit", "batch_size", "max_length", "limit", "tasks")} | {"device": device},
        "data": data,
        "models": entries,
        "routing": routing,
        "notes": notes,
    }
    files = write_report(report, out, overwrite=options.overwrite)
    return EvalReport(report=report, out=out, files=files)


def _mark_training_overlap(data: dict, sets: list, specs: list[ModelSpec]) -> None:
    """Mark each set that shares documents with a fine-tuned entry's training data (`overlaps_training`): its
    figures for that model are not held-out figures."""
    from moekit.eval.data import training_overlap
    from moekit.finetune.export import read_finetune

    for spec in (s for s in specs if s.adapter is not None):
        for training_data in read_finetune(spec.adapter).get("datasets") or []:
            for eval_set in sets:
                shared = training_overlap(eval_set, str(training_data))
                if shared and "overlaps_training" not in data[eval_set.name]:
                    data[eval_set.name]["overlaps_training"] = {"model": spec.name, "training_data": str(training_data),
                                                                "documents": shared, "of": len(eval_set.documents)}


__all__ = ["EvalOptions", "EvalReport", "evaluate", "load_sets", "model_entry", "plan_models"]
