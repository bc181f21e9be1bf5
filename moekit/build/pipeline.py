"""`moekit build`'s pipeline: sources opened and cross-checked, routers from the gate pass, the MoE written.

    build(recipe, out, BuildOptions()) -> BuildResult
    plan(recipe, BuildOptions()) -> BuildPlan  (what build would write; reads configs only)

Validation happens before any tensor is read; the output is written to a temporary sibling of
OUT and renamed into place only when complete, so a failure or Ctrl-C leaves nothing at OUT.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit import __version__
from moekit.build.arch import choose_architecture
from moekit.build.arch.base import BuildInputs, OutputArchitecture, PlannedTensor
from moekit.build.families import family_of
from moekit.build.options import BuildOptions
from moekit.build.sources import SourceModel, copy_tokenizer_files, load_tokenizer, open_source
from moekit.config_file import save_config
from moekit.errors import IncompatibleModelsError
from moekit.output import staged_output
from moekit.recipe import Recipe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that must match between every expert and the base for their layers to be interchangeable.
MATCHING_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")


@dataclass
class BuildPlan:
    architecture: str
    config: object
    tensors: list[PlannedTensor]
    parameters_total: int
    parameters_active: int

    @property
    def output_bytes(self) -> int:
        size = DTYPES[str(self.config.dtype).removeprefix("torch.")].itemsize
        return sum(_numel(t.shape) for t in self.tensors) * size

    def sources_summary(self) -> list[tuple[str, str, int]]:
        """(tensor name pattern, source, count) with layer and expert indices replaced by '*'."""
        import re

        groups: dict[tuple[str, str], int] = {}
        for tensor in self.tensors:
            pattern = re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", tensor.name))
            source = re.sub(r"^expert \d+ .*", "each expert's MLP", tensor.source)
            groups[(pattern, source)] = groups.get((pattern, source), 0) + 1
        return [(pattern, source, count) for (pattern, source), count in groups.items()]


@dataclass
class BuildResult:
    out: Path | None  # None for a dry run
    plan: BuildPlan
    routing: dict | None = None
    files: list[str] = field(default_factory=list)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def prepare(recipe: Recipe, options: BuildOptions) -> tuple[BuildInputs, OutputArchitecture]:
    """Open and cross-check every source and pick the output architecture; reads configs only."""
    experts_refs = [e.source_model for e in recipe.experts]
    if not options.allow_same_experts and not recipe.upcycling and len(experts_refs) > 1 and len(set(experts_refs)) == 1:
        raise IncompatibleModelsError(
            f"all {len(experts_refs)} experts are the same model ({experts_refs[0]}): the MoE would cost more and compute the same, "
            f"and gate_mode '{recipe.gate_mode}' could not make their routers differ",
            hint="pass --allow-same-experts if you will train it afterwards, or upcycle with gate_mode random / noise_scale as mergekit does",
        )
    opened: dict[str, SourceModel] = {}
    for ref in recipe.source_models:
        opened[ref] = open_source(ref, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    base = opened[recipe.base_model]
    experts = [opened[ref] for ref in experts_refs]
    shared = [opened[e.source_model] for e in recipe.shared_experts or []]
    for index, expert in enumerate(experts):
        _check_compatible(base, expert, f"expert {index} ({expert.ref})")
    for index, expert in enumerate(shared):
        _check_compatible(base, expert, f"shared expert {index} ({expert.ref})")
    dtype_name = options.dtype or recipe.dtype or _config_dtype(base.config)
    inputs = BuildInputs(recipe=recipe, base=base, experts=experts, family=family_of(base), dtype=DTYPES[dtype_name], shared_experts=shared)
    return inputs, choose_architecture(inputs, recipe.architecture)


def _config_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def _check_compatible(base: SourceModel, expert: SourceModel, where: str) -> None:
    if expert.architecture != base.architecture:
        raise IncompatibleModelsError(
            f"{where} is a {expert.architecture} but the base model ({base.ref}) is a {base.architecture}; all models of one MoE must share an architecture"
        )
    for key in MATCHING_SETTINGS:
        ours, theirs = getattr(base.config, key, None), getattr(expert.config, key, None)
        if ours != theirs:
            raise IncompatibleModelsError(f"{where} has {key}={theirs} but the base model ({base.ref}) has {key}={ours}; experts must have the base's shape")


def plan(recipe: Recipe, options: BuildOptions | None = None) -> BuildPlan:
    """What `build` would write, without reading any tensor."""
    inputs, arch = prepare(recipe, options or BuildOptions())
    return _plan(inputs, arch, routers=lambda layer: None)


def _plan(inputs: BuildInputs, arch: OutputArchitecture, routers) -> BuildPlan:
    config = arch.output_config(inputs)
    total, active = arch.active_parameters(config)
    return BuildPlan(arch.name, config, list(arch.tensors(inputs, routers)), total, active)


def build(recipe: Recipe, out: Path | str, options: BuildOptions | None = None, recipe_text: str | None = None) -> BuildResult:
    """Build the MoE described by `recipe` into `out`. `recipe_text` is saved as written, if given."""
    options = options or BuildOptions()
    out = Path(out)
    # OUT is locked and checked (writable, empty or --overwrite) before the sources are read and the gates computed.
    with staged_output(out, overwrite=options.overwrite) as staging:
        build_plan, routing = _build_into(staging, recipe, options, recipe_text)
    return BuildResult(out=out, plan=build_plan, routing=routing, files=sorted(p.name for p in out.iterdir()))


def _build_into(staging: Path, recipe: Recipe, options: BuildOptions, recipe_text: str | None) -> tuple[BuildPlan, dict | None]:
    inputs, arch = prepare(recipe, options)
    torch.manual_seed(recipe.moekit.seed)  # expert noise_scale draws from the global generator (mergekit's code)

    tokenizer = load_tokenizer(inputs.base, options.trust_remote_code)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    from moekit.build import gates as gate_init

    calibration = _load_calibration(recipe, tokenizer)
    gate_pass = gate_init.router_weights(
        recipe, inputs.base, tokenizer, device=device, forward_dtype=DTYPES[options.gate_dtype], batch_size=options.gate_batch_size, calibration=calibration
    )
    routers = gate_pass.routers
    build_plan = _plan(inputs, arch, routers=lambda layer: routers[layer])

    _write_weights(build_plan, staging, options.shard_size, inputs.dtype)
    save_config(build_plan.config, staging)
    arch.write_extra_files(staging)
    _write_generation_config(inputs.base.path, staging)
    copy_tokenizer_files(inputs.base.path, staging)
    (staging / "moekit-recipe.yaml").write_text(recipe_text if recipe_text is not None else _recipe_yaml(recipe), encoding="utf-8")
    routing = None
    if gate_pass.shares is not None:
        from moekit.build.report import write_routing_report

        routing = write_routing_report(staging / "routing", gate_pass.shares, recipe)
    _write_metadata(staging, inputs, build_plan, options, _gate_pass_record(gate_pass, options, device, calibration))
    from moekit.publish.card import write_model_card

    write_model_card(staging, license=recipe.moekit.license)
    return build_plan, routing


def _load_calibration(recipe: Recipe, tokenizer) -> list[list[torch.Tensor]] | None:
    """Each expert's calibration chunks (empty where it has none), or None when the gate mode does not use them."""
    if recipe.gate_mode != "calibrated" or not any(e.calibration for e in recipe.experts):
        return None
    from moekit.build.calibration import load_calibration

    return [load_calibration(e.calibration, tokenizer, f"{i} ({e.source_model})") if e.calibration else [] for i, e in enumerate(recipe.experts)]


def _gate_pass_record(gate_pass, options: BuildOptions, device: str, calibration) -> dict:
    """How the routers were made, for moekit.json: the same recipe gives the same routers on any device in float32."""
    record = {
        "device": device,
        "forward_dtype": options.gate_dtype if gate_pass.shares is not None else None,
        "router_dtype": "float32",
        "batch_size": options.gate_batch_size,
        "texts": gate_pass.texts,
        "tokens": gate_pass.tokens,
    }
    if calibration is not None:
        record["calibration_tokens"] = [sum(len(chunk) for chunk in chunks) for chunks in calibration]
    return record


def _write_weights(build_plan: BuildPlan, staging: Path, shard_size: int, dtype: torch.dtype) -> None:
    from moekit.build.writer import write_sharded

    write_sharded(build_plan.tensors, staging, dtype=dtype, shard_size=shard_size)


def _write_generation_config(base: Path, staging: Path) -> None:
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", staging / "generation_config.json")


def _recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(exclude_defaults=True), sort_keys=False)


def _write_metadata(staging: Path, inputs: BuildInputs, build_plan: BuildPlan, options: BuildOptions, gate_pass: dict) -> None:
    from importlib.metadata import version

    import mergekit.common  # noqa: F401  (version lookup below needs the package importable)

    recipe = inputs.recipe
    sources = {}
    for source in [inputs.base, *inputs.experts, *inputs.shared_experts]:
        sources[source.ref] = {"path": str(source.path), "license": source.license, "architecture": source.architecture}
    metadata = {
        "moekit_version": __version__,
        "mergekit_version": version("mergekit"),
        "kind": "build",
        "architecture": build_plan.architecture,
        "base_model": recipe.base_model,
        "experts": [_expert_record(e) for e in recipe.experts],
        **({"shared_experts": [_expert_record(e) for e in recipe.shared_experts]} if recipe.shared_experts else {}),
        "gate_mode": recipe.gate_mode,
        "gate_pass": gate_pass,
        "experts_per_token": recipe.experts_per_token,
        "num_experts": len(recipe.experts),
        "dtype": str(inputs.dtype).removeprefix("torch."),
        "parameters": {"total": build_plan.parameters_total, "active": build_plan.parameters_active},
        "sources": sources,
        "trust_remote_code": build_plan.architecture not in ("mixtral", "qwen2_moe"),
    }
    (staging / "moekit.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")


def _expert_record(expert) -> dict:
    record = {"source_model": expert.source_model, "positive_prompts": expert.positive_prompts or [], "negative_prompts": expert.negative_prompts or []}
    if expert.calibration:
        record["calibration"] = expert.calibration.model_dump()
    return record


__all__ = ["BuildPlan", "BuildResult", "build", "plan", "prepare"]
