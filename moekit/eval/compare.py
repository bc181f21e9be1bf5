"""`moekit eval`'s comparison: the MoE next to each of its source models on the same data, with routing statistics.

    evaluate(model, out, EvalOptions(...)) -> EvalReport

Everything that can be wrong with the input (missing models, unreadable data files, unknown lm-eval
tasks, lm-eval not installed) is checked before the first model is loaded. Models are then loaded
and evaluated one at a time and freed in between, and the report is written to a temporary sibling
of OUT and renamed into place at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from moekit import __version__
from moekit.errors import DataError
from moekit.eval.models import ModelSpec, eval_device, label, load_model, plan_models, release_memory, same_tokenizer
from moekit.eval.options import EvalOptions

# Sets smaller than this many tokens (MoE tokenizer) are flagged as sanity checks in the report.
SMALL_SET_TOKENS = 2000
LOSS_DEFINITION = (
    "loss = token-weighted mean negative log-likelihood (nats) over every scored token of the set (each document "
    "is preceded by one BOS/EOS prefix token and scored up to max_length tokens; padding is masked); "
    "perplexity = exp(loss); bits_per_byte = summed NLL / (ln 2 * UTF-8 bytes of the scored text)."
)


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
            result = perplexity(
                model,
                tokenizer,
                texts,
                batch_size=batch_size,
                max_length=max_length,
                progress=bar,
                observer=collector.observer(set_name) if collector else None,
                forward_kwargs=ROUTER_FORWARD_KWARGS if collector else None,
            )
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
    device = eval_device(options)
    documents = {s.name: s.documents for s in sets}
    expert_of_set = {s.name: s.expert for s in sets if s.expert is not None}

    entries, moe_tokenizer = [], None
    for spec in specs:
        model_obj, tokenizer = load_model(spec, options, device, options.trust_remote_code)
        moe_tokenizer = moe_tokenizer or tokenizer
        entry = model_entry(
            model_obj,
            tokenizer,
            documents,
            name=spec.name,
            path=str(spec.path),
            role=spec.role,
            batch_size=options.batch_size,
            max_length=options.max_length,
            reference_tokenizer=moe_tokenizer,
            expert_names=expert_names,
            expert_of_set=expert_of_set,
        )
        entry["ref"] = spec.ref
        if spec.role == "source":
            entry.update({"base": spec.base, "experts": spec.experts})
        if spec.adapter is not None:
            entry["adapter"] = str(spec.adapter)
        if manager is not None:
            from moekit.eval.lm_eval_tasks import run_tasks

            entry["tasks"] = run_tasks(
                model_obj, tokenizer, options.tasks, manager, batch_size=options.batch_size, max_length=options.max_length, limit=options.limit
            )
        entries.append(entry)
        del model_obj  # the next model is loaded only after this one is gone
        release_memory()
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
        notes.append(
            "Default data: each expert's positive prompts from moekit.json "
            f"({sum(d['tokens'] for d in data.values())} tokens in all) - a sanity check, not a benchmark."
        )
    report = {
        "moekit_version": __version__,
        "kind": "eval",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": specs[0].name, "path": str(specs[0].path), "ref": specs[0].ref, "architecture": metadata.get("architecture")},
        "settings": {k: v for k, v in options.model_dump().items() if k in ("device", "dtype", "load_in_4bit", "batch_size", "max_length", "limit", "tasks")}
        | {"device": device},
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
                    data[eval_set.name]["overlaps_training"] = {
                        "model": spec.name,
                        "training_data": str(training_data),
                        "documents": shared,
                        "of": len(eval_set.documents),
                    }


__all__ = ["EvalReport", "evaluate", "load_sets", "model_entry"]
