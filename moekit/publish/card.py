"""Model cards (README.md) for what moekit writes: builds, fine-tunes, adapters.

    write_model_card(model_dir, license=None, report=None) -> huggingface_hub.ModelCard

The YAML header is made with huggingface_hub's `ModelCardData` (base_model, base_model_relation,
library_name, pipeline_tag, tags, license, datasets, model-index) so the Hub links the model to its
sources, shows its evaluation and files it under the right filters. The body is written from
moekit.json, moekit-recipe.yaml, routing/, moekit-finetune.json and an eval report.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from moekit.errors import PublishError
from moekit.units import format_count

# `license: other` is written when the sources' licenses disagree and nobody chose one; publishing then needs --license.
UNDECIDED_LICENSE = "other"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METADATA = "moekit.json"
FINETUNE_METADATA = "moekit-finetune.json"
RECIPE = "moekit-recipe.yaml"
EVAL_DIR = "eval"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")  # `data/train.jsonl` is a file, not a Hub dataset
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")  # the values the Hub accepts


@dataclass
class LicenseDecision:
    """The license a card states and why."""

    license: str | None
    source_licenses: dict[str, str | None] = field(default_factory=dict)
    conflict: bool = False  # sources disagree and no license was chosen

    @property
    def note(self) -> str | None:
        if self.conflict:
            listed = ", ".join(f"`{ref}`: {lic or 'not stated'}" for ref, lic in self.source_licenses.items())
            return (
                f"**License not decided.** The source models' licenses disagree ({listed}). "
                "Choose a license compatible with all of them and publish with `moekit publish --license LICENSE`."
            )
        if self.license is None:
            return "The source models state no license; check their terms before using or redistributing this model."
        return None


@dataclass
class ModelDirectory:
    """What a directory holds, as far as the card and the upload are concerned."""

    path: Path
    kind: str  # "build" (a merge), "adapter" (PEFT adapter, maybe inside a fine-tune output), "finetune" (merged fine-tune), "model"
    metadata: dict[str, Any]  # moekit.json of the MoE (for fine-tunes: of the MoE they were trained on, when found)
    finetune: dict[str, Any] | None
    adapter_dir: Path | None
    recipe_text: str | None

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("architecture")


def inspect_directory(model_dir: Path) -> ModelDirectory:
    """Classify `model_dir` and read the moekit metadata it carries."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir} is not a directory")
    metadata = _read_json(model_dir / METADATA) or {}
    finetune = _read_json(model_dir / FINETUNE_METADATA)
    adapter_dir = None
    if (model_dir / "adapter_config.json").is_file():
        adapter_dir = model_dir
    elif (model_dir / "adapter" / "adapter_config.json").is_file():
        adapter_dir = model_dir / "adapter"
    if adapter_dir is not None:
        kind = "adapter"
    elif finetune is not None or metadata.get("kind") in ("export", "finetune"):
        kind = "finetune"
    elif metadata.get("kind") == "build":
        kind = "build"
    else:
        kind = "model"
    if kind in ("adapter", "finetune") and not metadata:
        # the MoE the fine-tune started from may be a local build whose moekit.json describes the experts
        for base in _finetune_base_dirs(finetune, adapter_dir):
            if (base / METADATA).is_file():
                metadata = _read_json(base / METADATA) or {}
                break
    recipe_path = model_dir / RECIPE
    if not recipe_path.is_file():
        recipe_path = next((base / RECIPE for base in _finetune_base_dirs(finetune, adapter_dir) if (base / RECIPE).is_file()), recipe_path)
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
    return ModelDirectory(model_dir, kind, metadata, finetune, adapter_dir, recipe_text)


def decide_license(directory: ModelDirectory, license: str | None = None) -> LicenseDecision:
    """The license to state: the one given, else the recipe's `moekit.license`, else the sources' common one."""
    sources = {ref: (info or {}).get("license") for ref, info in directory.metadata.get("sources", {}).items()}
    chosen = license or _recipe_license(directory.recipe_text)
    if chosen:
        return LicenseDecision(chosen, sources)
    stated = {lic for lic in sources.values() if lic}
    if len(stated) > 1:
        return LicenseDecision(UNDECIDED_LICENSE, sources, conflict=True)
    if directory.kind in ("adapter", "finetune") and not stated:
        inherited = _adapter_base_license(directory)
        if inherited:
            return LicenseDecision(inherited, sources)
    return LicenseDecision(stated.pop() if stated else None, sources)


def model_card(
    model_dir: Path, *, license: str | None = None, report: dict | Path | None = None, repo_id: str | None = None, base_model: str | None = None
) -> ModelCard:
    """The card for `model_dir`, without writing anything.

    `report` is an eval report dict or a path to report.json (or its directory); by default
    `model_dir/eval/report.json` is used when present. `repo_id` names the model in the usage snippet;
    `base_model` is the Hub id of the model a fine-tune or adapter was trained on, when that was a local directory.
    """
    directory = inspect_directory(Path(model_dir))
    decision = decide_license(directory, license)
    report_dict = _card_report(directory, _load_report(directory.path, report))
    name = repo_id or _directory_name(directory.path)
    data = _card_data(directory, decision, report_dict, name, base_model)
    body = _body(directory, decision, report_dict, name, base_model, _card_charts(report_dict, _report_charts(directory.path, report)))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(
    model_dir: Path, *, license: str | None = None, report: dict | Path | None = None, repo_id: str | None = None, base_model: str | None = None
) -> ModelCard:
    """Write README.md into `model_dir` (and copy a given eval report's JSON and charts to `model_dir/eval/`)."""
    model_dir = Path(model_dir)
    if isinstance(report, (str, Path)):
        _copy_report(model_dir, Path(report))
        report = None  # now read from model_dir/eval, so the card links to files that are uploaded with it
    card = model_card(model_dir, license=license, report=report, repo_id=repo_id, base_model=base_model)
    card.save(model_dir / "README.md")
    return card


def validate_card(card: ModelCard) -> None:
    """Check the card with huggingface_hub's own parsers (the Hub's validate-yaml needs network; this does not).

    The YAML header must parse back into the same `ModelCardData` (model-index included), `base_model`
    must hold Hub ids only and `base_model_relation` one of the values the Hub accepts.
    """
    try:
        reparsed = ModelCard(str(card))
    except ValueError as err:
        raise PublishError(f"the generated model card does not parse: {err}") from None
    data = reparsed.data.to_dict()
    if data != card.data.to_dict():
        raise PublishError("the generated model card's metadata does not survive a round trip through huggingface_hub")
    bases = data.get("base_model") or []
    bad = [ref for ref in ([bases] if isinstance(bases, str) else bases) if not HUB_ID.match(ref)]
    if bad:
        raise PublishError(f"base_model holds entries that are not Hub ids: {bad}")
    if data.get("base_model_relation") not in (None, *BASE_MODEL_RELATIONS):
        raise PublishError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, not {data['base_model_relation']!r}")


# ---------------------------------------------------------------- metadata


def _card_data(directory: ModelDirectory, decision: LicenseDecision, report: dict | None, name: str, base_model: str | None) -> ModelCardData:
    is_moe = bool(directory.metadata.get("num_experts")) or bool((_read_json(directory.path / "config.json") or {}).get("num_local_experts"))
    tags = ["moe", "moekit"] if is_moe or directory.kind == "adapter" else ["moekit"]
    if directory.kind == "build":
        tags.insert(1, "merge")
        if directory.metadata.get("mergekit_version"):
            tags.append("mergekit")
    if directory.architecture:
        tags.append(directory.architecture)
    if directory.kind == "adapter":
        tags += ["lora", "peft"]
    datasets = _hub_ids(_finetune_datasets(directory.finetune)) or None
    eval_results = _eval_results(report)
    return ModelCardData(
        base_model=_metadata_base_models(directory, base_model) or None,
        base_model_relation={"build": "merge", "adapter": "adapter", "finetune": "finetune"}.get(directory.kind),
        library_name="peft" if directory.kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        license=decision.license,
        datasets=datasets,
        tags=tags,
        eval_results=eval_results or None,
        model_name=name if eval_results else None,
    )


def _metadata_base_models(directory: ModelDirectory, base_model: str | None) -> list[str]:
    """Hub ids only: the Hub rejects local paths in `base_model`."""
    if directory.kind in ("adapter", "finetune"):
        candidates = [base_model or finetune_base(directory.finetune, directory.adapter_dir)]
    else:
        candidates = [directory.metadata.get("base_model"), *(e.get("source_model") for e in directory.metadata.get("experts", []))]
    return _hub_ids(ref for ref in candidates if ref and is_hub_ref(ref, directory.metadata))


def is_hub_ref(ref: str, metadata: dict) -> bool:
    """A ref is a Hub id when it looks like `org/name[@rev]` and was not read as a local directory."""
    if ref.startswith(("zoo:", ".", "/", "~")):
        return False
    local = (metadata.get("sources", {}).get(ref) or {}).get("path")
    if local is not None and Path(local) == Path(ref).expanduser():
        return False
    if local is None and Path(ref).expanduser().exists():
        return False
    return bool(HUB_ID.match(ref.split("@", 1)[0]))


def _hub_ids(refs) -> list[str]:
    ids: list[str] = []
    for ref in refs:
        repo = str(ref).split("@", 1)[0]
        if HUB_ID.match(repo) and not repo.startswith((".", "/", "~")) and not Path(repo).exists() and not repo.endswith(FILE_SUFFIXES) and repo not in ids:
            ids.append(repo)
    return ids


def _card_report(directory: ModelDirectory, report: dict | None) -> dict | None:
    """The report as the card shows it: the entry of the model the card describes, then its baselines (the
    source models, and for a fine-tune the MoE it was trained from); other models' rows (a fine-tune on a
    build's card, other gate modes) are left out. None when the report has no entry for this model."""
    if not report or not report.get("models"):
        return report
    here = directory.path.resolve()
    moes = [m for m in report["models"] if m.get("role") == "moe"]
    described = next((m for m in moes if _same_path(m.get("adapter") or m.get("path"), here)), None)
    if described is None and directory.kind == "build":
        described = next((m for m in moes if not m.get("adapter")), None)
    elif described is None:
        described = next((m for m in moes if m.get("adapter")), None)
    if described is None:
        return None
    baselines = []
    trained_from = (directory.finetune or {}).get("base_model_path")
    if described.get("adapter") and trained_from:  # the MoE before fine-tuning
        baselines = [m | {"role": "moe before fine-tuning"} for m in moes if not m.get("adapter") and _same_path(m.get("path"), Path(trained_from))]
    sources = [m for m in report["models"] if m.get("role") == "source"]
    shown = [described, *baselines, *sources]
    names = {m.get("name") for m in shown}
    # a set is marked as training data only for a model on this card
    data = {name: {k: v for k, v in info.items() if k != "overlaps_training" or v.get("model") in names} for name, info in (report.get("data") or {}).items()}
    return report | {"models": shown, "data": data}


def _card_charts(report: dict | None, charts: list[str]) -> list[str]:
    """The report's charts, less the routing charts of models the card does not describe."""
    from moekit.eval.report import ROUTING_CHART, routing_chart

    if not report or not report.get("models"):
        return charts
    described = report["models"][0]["name"]
    report_moe = (report.get("routing") or {}).get("model") or (report.get("model") or {}).get("name")
    own = routing_chart(described) if described != report_moe else ROUTING_CHART
    return [c for c in charts if not Path(c).name.startswith("routing") or Path(c).name == own]


def _same_path(a: str | None, b: Path) -> bool:
    return bool(a) and Path(a).resolve() == Path(b).resolve()


def _eval_results(report: dict | None) -> list[EvalResult]:
    """The evaluated model's own results (role 'moe' or 'dense') as model-index entries: perplexity per evaluation set."""
    results: list[EvalResult] = []
    if not report:
        return results
    for model in report.get("models", []):
        if model.get("role") == "source":
            continue
        for set_name, metrics in (model.get("metrics") or {}).items():
            for metric in ("perplexity", "loss"):
                value = (metrics or {}).get(metric)
                if isinstance(value, (int, float)):
                    results.append(
                        EvalResult(
                            task_type="text-generation",
                            task_name="Language modelling",
                            dataset_type=set_name,
                            dataset_name=set_name,
                            metric_type=metric,
                            metric_name=metric.capitalize(),
                            metric_value=round(float(value), 4),
                            source_name="moekit eval",
                            source_url="https://github.com/moekit/moekit",
                        )
                    )
        break
    return results


# ---------------------------------------------------------------- body


def _body(directory: ModelDirectory, decision: LicenseDecision, report: dict | None, name: str, base_model: str | None, charts: list[str]) -> str:
    meta = directory.metadata
    parts = [f"# {name}\n"]
    if directory.kind == "build":
        parts.append(
            f"A {_arch_name(meta)} mixture of experts built with [moekit](https://github.com/moekit/moekit) "
            f"{meta.get('moekit_version', '')} from {meta.get('num_experts', '?')} dense checkpoints"
            + (f" (mergekit {meta['mergekit_version']})." if meta.get("mergekit_version") else ".")
            + "\n"
        )
    elif directory.kind == "adapter":
        base = base_model or finetune_base(directory.finetune, directory.adapter_dir) or "its base model"
        parts.append(f"A PEFT (LoRA) adapter fine-tuned with moekit on the mixture of experts `{base}`. Load it on top of that model (see Usage).\n")
    elif directory.kind == "finetune":
        base = base_model or finetune_base(directory.finetune, None) or "a moekit MoE"
        merged = meta.get("finetune") if isinstance(meta.get("finetune"), dict) else {}
        into = (
            f" as trained: into the base's {merged.get('bits')}-bit quantized weights, dequantized (`moekit export --merge-into dequantized`)"
            if merged.get("merge_into") == "dequantized"
            else ""
        )
        parts.append(f"A fine-tune of the mixture of experts `{base}` made with moekit, with the adapter merged into the weights{into}.\n")
    if decision.note:
        parts.append(f"> {decision.note}\n")
    parts += _sources_section(meta, "Source models" if directory.kind == "build" else "Source models of the base MoE")
    parts += _architecture_section(meta)
    parts += _training_section(directory)
    parts += _eval_section(report, charts)
    parts += _routing_section(directory)
    parts += _usage_section(directory, name, base_model)
    if directory.recipe_text:
        parts.append("## Recipe\n\n```yaml\n" + directory.recipe_text.rstrip() + "\n```\n")
    if decision.license and not decision.conflict:
        from_sources = decision.license in decision.source_licenses.values()
        parts.append(f"## License\n\n`{decision.license}`" + (", the source models' license.\n" if from_sources else ".\n"))
    return "\n".join(parts).rstrip() + "\n"


def _arch_name(meta: dict) -> str:
    return {"mixtral": "Mixtral", "phixtral": "Phixtral"}.get(meta.get("architecture", ""), meta.get("architecture", "mixture-of-experts"))


def _sources_section(meta: dict, title: str) -> list[str]:
    experts = meta.get("experts") or []
    if not meta.get("base_model") and not experts:
        return []
    sources = meta.get("sources", {})
    base = meta.get("base_model")
    lines = [f"## {title}\n", f"- Base (attention, norms, embeddings): {_source_link(base, meta)}" + _license_suffix(sources, base)]
    for index, expert in enumerate(experts):
        ref = expert.get("source_model")
        prompts = expert.get("positive_prompts") or []
        shown = ", ".join(_cell(json.dumps(p[:60], ensure_ascii=False)) for p in prompts[:3])
        lines.append(f"- Expert {index}: {_source_link(ref, meta)}" + _license_suffix(sources, ref) + (f" (positive prompts: {shown})" if shown else ""))
    return ["\n".join(lines) + "\n"]


def _source_link(ref: str | None, meta: dict) -> str:
    """`ref`, linked to its Hub page (at its revision) when it is a Hub id."""
    if not ref or not is_hub_ref(ref, meta):
        return f"`{ref}`"
    repo, _, revision = ref.partition("@")
    return f"[`{ref}`](https://huggingface.co/{repo}" + (f"/tree/{revision})" if revision else ")")


def _license_suffix(sources: dict, ref: str | None) -> str:
    lic = (sources.get(ref) or {}).get("license") if ref else None
    return f", license {lic}" if lic else ""


def _architecture_section(meta: dict) -> list[str]:
    if not meta.get("num_experts"):
        return []
    params = meta.get("parameters") or {}
    rows = [
        ("Architecture", _arch_name(meta)),
        ("Experts", meta.get("num_experts")),
        ("Experts per token", meta.get("experts_per_token")),
        ("Gate mode", f"`{meta.get('gate_mode')}`"),
        ("Parameters (total)", _format_count(params.get("total"))),
        ("Parameters (active per token)", _format_count(params.get("active"))),
        ("dtype", meta.get("dtype")),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows if value not in (None, "`None`"))
    return ["## Architecture\n\n" + table + "\n"]


def _format_count(value) -> str | None:
    if not isinstance(value, int):
        return None
    return f"{format_count(value)} ({value:,})" if value >= 1000 else f"{value:,}"


def _training_section(directory: ModelDirectory) -> list[str]:
    finetune = directory.finetune
    if not finetune:
        return []
    settings = finetune.get("options") if isinstance(finetune.get("options"), dict) else finetune
    rows = [
        (key, value)
        for key, value in settings.items()
        if isinstance(value, (str, int, float, bool)) or (isinstance(value, list) and len(value) <= 12 and all(isinstance(v, (str, int, float)) for v in value))
    ]
    lines = ["## Training\n"]
    if rows:
        lines.append("| Setting | Value |\n|---|---|\n" + "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows) + "\n")
    datasets = _finetune_datasets(finetune)
    if datasets:
        lines.append("Datasets: " + ", ".join(f"`{d}`" for d in datasets) + "\n")
    losses = _losses(finetune)
    if losses:
        lines.append(f"Training loss: {losses[0]:.4f} at the first step, {losses[1]:.4f} at the last.\n")
    if (directory.path / "loss.png").is_file():
        lines.append("![training loss](loss.png)\n")
    return lines


def _cell(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _losses(finetune: dict) -> tuple[float, float] | None:
    first, last = finetune.get("first_loss"), finetune.get("last_loss")
    losses = finetune.get("losses")
    if isinstance(losses, list) and losses and all(isinstance(v, (int, float)) for v in losses):
        first, last = losses[0], losses[-1]
    if isinstance(losses, dict):
        first, last = losses.get("first", first), losses.get("last", last)
    return (float(first), float(last)) if isinstance(first, (int, float)) and isinstance(last, (int, float)) else None


def _eval_section(report: dict | None, charts: list[str]) -> list[str]:
    if not report or not report.get("models"):
        return []
    from moekit.eval.report import TRAINING_OVERLAP_MARK, overlap_note, overlaps_training

    sets = list(dict.fromkeys(s for model in report["models"] for s in (model.get("metrics") or {})))
    header = "| Model | Role | " + " | ".join(f"{s} perplexity" + (f" {TRAINING_OVERLAP_MARK}" if overlaps_training(report, s) else "") for s in sets) + " |"
    lines = [header, "|---|---|" + "---|" * len(sets)]
    for model in report["models"]:
        metrics = model.get("metrics") or {}
        cells = []
        for s in sets:
            value = (metrics.get(s) or {}).get("perplexity")
            cells.append(f"{value:.3f}" if isinstance(value, (int, float)) else "-")
        lines.append(f"| {_cell(model.get('name', '?'))} | {model.get('role', '')} | " + " | ".join(cells) + " |")
    section = [
        "## Evaluation\n",
        "Perplexity (lower is better) measured with `moekit eval`, on the same texts for the MoE and each source model.\n",
        "\n".join(lines) + "\n",
    ]
    if overlap_note(report):
        section.append(overlap_note(report) + "\n")
    section += [f"![{Path(chart).stem}]({chart})\n" for chart in charts]
    return section


def _routing_section(directory: ModelDirectory) -> list[str]:
    routing = _read_json(directory.path / "routing" / "routing.json")
    if not routing:
        return []
    shares = (routing.get("own_expert_share") or {}).get("mean_per_expert") or []
    lines = ["## Routing\n", "Share of each expert's own positive-prompt tokens that the initial routers send to it (mean over layers):\n"]
    if shares:
        lines.append("| Expert | Share |\n|---|---|\n" + "\n".join(f"| {i} | {_percent(s)} |" for i, s in enumerate(shares)) + "\n")
    if (directory.path / "routing" / "routing.png").is_file():
        lines.append("![routing](routing/routing.png)\n")
    return lines


def _percent(share) -> str:
    return f"{share:.0%}" if isinstance(share, (int, float)) and math.isfinite(share) else "n/a"


def _usage_section(directory: ModelDirectory, name: str, base_model: str | None) -> list[str]:
    remote = ", trust_remote_code=True" if directory.architecture == "phixtral" else ""
    if directory.kind == "adapter":
        base = base_model or finetune_base(directory.finetune, directory.adapter_dir) or "BASE_MOE"
        subfolder = "" if directory.adapter_dir == directory.path else f', subfolder="{directory.adapter_dir.name}"'
        code = (
            f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto"{remote})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{name}"{subfolder})\n'
        )
        note = ""
        adapter_config = directory.adapter_dir / "adapter_config.json" if directory.adapter_dir else None
        routers_in_adapter = (
            adapter_config is not None and adapter_config.is_file() and bool(json.loads(adapter_config.read_text(encoding="utf-8")).get("modules_to_save"))
        )
        if routers_in_adapter:
            note = (
                "\nThe adapter also holds the trained routers (`modules_to_save`), so PEFT loads them too. "
                "`moekit export` on the fine-tune directory writes one checkpoint with everything merged in.\n"
            )
        elif (directory.path / "routers.safetensors").is_file():
            note = (
                "\nThe fine-tune also trained the routers: `routers.safetensors` holds them, and the adapter alone leaves "
                "the base's routers in place. `moekit export` on the fine-tune directory writes one checkpoint with the "
                "adapter and the routers merged in.\n"
            )
    else:
        code = (
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto"{remote})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        )
        note = (
            "\nThe Phixtral model code ships with the checkpoint, hence `trust_remote_code=True`.\n"
            if remote
            else "\nIt loads with plain transformers; no custom code is needed.\n"
        )
    code += '\ninputs = tokenizer("def fibonacci(n):", return_tensors="pt")\nprint(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n'
    return ["## Usage\n", "```python\n" + code + "```\n" + note]


# ---------------------------------------------------------------- inputs


def _directory_name(path: Path) -> str:
    """The model's name: its directory's, also while the build writes into its temporary `.NAME.moekit-XXXX` sibling."""
    name = path.resolve().name
    staging = re.match(r"^\.(.+)\.moekit-\w+$", name)
    return staging.group(1) if staging else name


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot read {path}: {err}") from None
    return data if isinstance(data, dict) else None


def _recipe_license(recipe_text: str | None) -> str | None:
    if not recipe_text:
        return None
    import yaml

    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return None
    settings = recipe.get("moekit") if isinstance(recipe, dict) else None
    return settings.get("license") if isinstance(settings, dict) else None


def finetune_base(finetune: dict | None, adapter_dir: Path | None) -> str | None:
    """The model a fine-tune started from: moekit-finetune.json, else the adapter's own config."""
    for key in ("base_model", "model", "base_model_path", "model_path", "base"):
        value = (finetune or {}).get(key)
        if isinstance(value, str) and value:
            return value
    if adapter_dir is not None:
        config = _read_json(adapter_dir / "adapter_config.json") or {}
        return config.get("base_model_name_or_path") or None
    return None


def _finetune_base_dirs(finetune: dict | None, adapter_dir: Path | None) -> list[Path]:
    """Local directories of the model a fine-tune started from (moekit-finetune.json records the ref and its path)."""
    refs = [(finetune or {}).get("base_model_path"), finetune_base(finetune, adapter_dir)]
    return [Path(ref) for ref in refs if isinstance(ref, str) and ref and Path(ref).is_dir()]


def _adapter_base_license(directory: ModelDirectory) -> str | None:
    from huggingface_hub import metadata_load

    for base in _finetune_base_dirs(directory.finetune, directory.adapter_dir):
        if (base / "README.md").is_file():
            try:
                license_ = (metadata_load(base / "README.md") or {}).get("license")
            except ValueError:
                continue
            if license_ and license_ != UNDECIDED_LICENSE:
                return license_
    return None


def _finetune_datasets(finetune: dict | None) -> list[str]:
    if not finetune:
        return []
    for container in (finetune, finetune.get("options") if isinstance(finetune.get("options"), dict) else {}):
        for key in ("datasets", "dataset_ids", "dataset", "data"):
            value = container.get(key)
            if isinstance(value, str):
                return [value]
            if isinstance(value, list):
                return [str(v if not isinstance(v, dict) else v.get("id") or v.get("path") or v.get("name")) for v in value]
    return []


def _load_report(model_dir: Path, report: dict | Path | None) -> dict | None:
    """The eval report given (dict or path), else the one in `model_dir/eval/`, else None."""
    if isinstance(report, dict):
        return report
    path = Path(report) if report is not None else model_dir / EVAL_DIR / "report.json"
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        if report is not None:
            raise PublishError(f"eval report {path} does not exist", hint="pass the report.json written by `moekit eval`, or its directory")
        return None
    data = _read_json(path)
    if data is None or not isinstance(data.get("models"), list):
        raise PublishError(f"{path} is not a moekit eval report (no 'models' list)")
    return data


def _report_charts(model_dir: Path, report: dict | Path | None) -> list[str]:
    """Paths (inside model_dir) of the eval charts the card shows; a report outside the folder is shown
    where `write_model_card` copies it (eval/), so that the card only links to files uploaded with it."""
    if isinstance(report, dict):
        return []
    charts_dir = model_dir / EVAL_DIR
    if report is not None:
        path = Path(report)
        charts_dir = path if path.is_dir() else path.parent
    try:
        relative = charts_dir.resolve().relative_to(model_dir.resolve())
    except ValueError:
        relative = Path(EVAL_DIR)
    return [(relative / png.name).as_posix() for png in sorted(charts_dir.glob("*.png"))]


def report_files(model_dir: Path, report: Path | None) -> dict[str, Path]:
    """{path inside model_dir: source file} that `write_model_card` copies for an eval report outside the folder."""
    if report is None:
        return {}
    source = Path(report) if Path(report).is_dir() else Path(report).parent
    if not (source / "report.json").is_file():
        raise PublishError(f"eval report {report} does not exist", hint="pass the report.json written by `moekit eval`, or its directory")
    if source.resolve() == (model_dir / EVAL_DIR).resolve():
        return {}
    items = [source / "report.json", source / "report.md", *sorted(source.glob("*.png"))]
    return {f"{EVAL_DIR}/{item.name}": item for item in items if item.is_file()}


def _copy_report(model_dir: Path, report: Path) -> None:
    for target, source in report_files(model_dir, report).items():
        (model_dir / target).parent.mkdir(exist_ok=True)
        shutil.copy2(source, model_dir / target)
