"""The build recipe: a superset of mergekit-moe's YAML.

Every mergekit-moe key is accepted with its meaning unchanged; moekit's own settings live under the
single extra key `moekit:` (at the top, and in an expert for its calibration data) so that a
mergekit-moe recipe builds as it is and a moekit recipe says plainly what mergekit-moe would not
understand. Keys that mergekit-moe reads nowhere (it ignores them, e.g. a top-level `tokenizer:`)
are dropped with a warning that names them, except a near-miss of a known key, which is refused
with a did-you-mean: a typo should not silently build something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from moekit.errors import RecipeError, did_you_mean

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random", "calibrated"]
PROMPT_GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "calibrated")
RANDOM_GATE_MODES = ("random", "uniform_random")


class CalibrationData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Text this expert should receive: a local .txt / .jsonl file, or `hf:dataset[:split]` (from the local Hugging Face cache).")
    max_tokens: int = Field(default=16384, ge=1, description="Token budget taken from the data (in chunks of up to `chunk_tokens`).")
    chunk_tokens: int = Field(default=256, ge=8, description="Longest chunk of the data run through the base model at once.")
    text_field: str | None = Field(
        default=None, description="Field of a JSONL record or dataset row that holds the text; `text` or the first string field when omitted."
    )


class ExpertSettings(BaseModel):
    """An expert's settings mergekit-moe does not have."""

    model_config = ConfigDict(extra="forbid")

    calibration: CalibrationData | None = Field(
        default=None, description="Data whose router inputs `calibrated` mode fits this expert's router row on, besides its prompts."
    )


DType = Literal["float32", "float16", "bfloat16"]


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str = Field(description="Local directory, Hub id (`org/name[@revision]`) or `zoo:NAME` of the dense model whose MLPs become this expert.")
    positive_prompts: list[str] | None = Field(default=None, description="Text that should be routed to this expert.")
    negative_prompts: list[str] | None = Field(default=None, description="Text that should not be routed to this expert.")
    noise_scale: float | None = Field(default=None, description="Standard deviation of Gaussian noise added to this expert's MLP weights.")
    residual_scale: float | None = Field(default=None, description="Factor applied to this expert's down projection (its contribution to the residual stream).")
    moekit: ExpertSettings | None = Field(default=None, description="moekit's own settings for this expert (calibration data).")

    @property
    def calibration(self) -> CalibrationData | None:
        return self.moekit.calibration if self.moekit else None

    @field_validator("positive_prompts", "negative_prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str] | None) -> list[str] | None:
        # An empty prompt has no token to route (NaN shares in the report); NUL and lone surrogates cannot be tokenized.
        for index, prompt in enumerate(prompts or []):
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty; remove it or write the text it stands for")
            if "\0" in prompt:
                raise ValueError(f"prompt {index} holds a NUL character")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"prompt {index} holds a lone surrogate (an invalid \\u escape), which is not text") from None
        return prompts


class CalibrationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=300, ge=1, description="Optimisation steps of the per-layer router fit in `calibrated` mode.")
    learning_rate: float = Field(default=0.05, gt=0, description="Learning rate of the router fit.")
    weight_decay: float = Field(default=1e-3, ge=0, description="L2 penalty that keeps fitted routers small.")
    max_fit_tokens: int = Field(
        default=4096,
        ge=1,
        description="Tokens per expert (for and against it, each) whose router inputs the fit keeps; a seeded random sample when there are more.",
    )


class MoekitSettings(BaseModel):
    """Settings mergekit-moe does not have."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, description="Seed for random gate modes and expert noise, so a build is reproducible.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings, description="Settings of the `calibrated` gate mode.")
    router_jitter_noise: float = Field(default=0.0, ge=0, description="Router jitter noise written into the output config (used during training only).")
    router_aux_loss_coef: float = Field(default=0.02, ge=0, description="Load-balancing loss coefficient written into the output config.")
    license: str | None = Field(default=None, description="License for the model card when the sources disagree or say nothing.")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="Model whose attention, norms and embeddings the MoE keeps; local directory or Hub id.")
    experts: list[Expert] = Field(min_length=1, description="One entry per expert, in router order.")
    gate_mode: GateMode = Field(default="hidden", description="How routers are initialised: hidden, cheap_embed, random, uniform_random or calibrated.")
    dtype: DType | None = Field(default=None, description="Output dtype; the base model's dtype when omitted.")
    experts_per_token: int = Field(default=2, description="Experts each token is routed to (top-k).")
    architecture: str | None = Field(
        default=None,
        description="Output architecture (mixtral, phixtral, qwen2_moe; mergekit's names and "
        "prefixes such as 'qwen' work too); chosen from the inputs when omitted.",
    )
    shared_experts: list[Expert] | None = Field(
        default=None, description="Experts every token goes through (mergekit-moe's key); one, for a Qwen2-MoE output from Qwen2 models."
    )
    moekit: MoekitSettings = Field(default_factory=MoekitSettings, description="moekit's own settings.")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        n = len(self.experts)
        if not 1 <= self.experts_per_token <= n:
            raise ValueError(f"experts_per_token must be between 1 and the number of experts ({n}), got {self.experts_per_token}")
        if self.gate_mode in PROMPT_GATE_MODES:
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts and not (self.gate_mode == "calibrated" and expert.calibration):
                    needs = "positive_prompts or calibration data (under its `moekit:` key)" if self.gate_mode == "calibrated" else "positive_prompts"
                    raise ValueError(
                        f"expert {i} ({expert.source_model}) has no {needs}, which gate_mode '{self.gate_mode}' needs; add prompts or use gate_mode 'random'"
                    )
            for i, expert in enumerate(self.shared_experts or []):
                if not expert.positive_prompts:
                    raise ValueError(
                        f"shared expert {i} ({expert.source_model}) has no positive_prompts, which "
                        f"its gate needs under gate_mode '{self.gate_mode}' (as in mergekit-moe)"
                    )
            if n > 1:
                prompt_sets = {
                    (tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()), e.calibration and e.calibration.model_dump_json()) for e in self.experts
                }
                if len(prompt_sets) == 1:
                    raise ValueError("all experts have identical prompts, so no router could tell them apart; give each expert prompts for its own speciality")
        return self

    @property
    def gated_experts(self) -> list[Expert]:
        """Every expert that gets a router row: the routed experts, then the shared experts (each has its own gate)."""
        return self.experts + (self.shared_experts or [])

    @property
    def upcycling(self) -> bool:
        """Every expert is the same model and the routers or noise still make them differ (mergekit's sparse upcycling)."""
        same = len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1
        return same and (self.gate_mode in RANDOM_GATE_MODES or any(e.noise_scale for e in self.experts))

    @property
    def notes(self) -> list[str]:
        """Things the user should know about this recipe that are not errors."""
        notes = [f"ignored key '{key}' (mergekit-moe ignores it too)" for key in self._ignored_keys]
        if self.upcycling:
            notes.append(
                f"all {len(self.experts)} experts are the same model ({self.experts[0].source_model}): sparse upcycling. "
                "Until it is trained the MoE computes about what that model computes, at a higher cost"
            )
        if self.gate_mode != "calibrated" and any(e.calibration for e in self.experts):
            notes.append(f"calibration data is used only by gate_mode 'calibrated'; gate_mode '{self.gate_mode}' ignores it")
        return notes

    _ignored_keys: list[str] = PrivateAttr(default_factory=list)

    @property
    def source_models(self) -> list[str]:
        """Base model, experts and shared experts, base first, without duplicates."""
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in self.gated_experts]))


def _format_validation_error(err: ValidationError, path: Path) -> str:
    lines = [f"invalid recipe {path}:"]
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            key = str(problem["loc"][-1])
            model = _model_at(problem["loc"][:-1])
            lines.append(f"  {where}: unknown key '{key}'{did_you_mean(key, model.model_fields)}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that a location inside a recipe refers to, for did-you-mean suggestions."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        for candidate in (Expert, ExpertSettings, CalibrationData, MoekitSettings, CalibrationSettings):
            if candidate is annotation or candidate in getattr(annotation, "__args__", ()) or str(candidate.__name__) in str(annotation):
                model = candidate
                break
    return model


def parse_recipe(text: str, path: Path | str = "<recipe>") -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping with base_model and experts, got {type(data).__name__}")
    ignored = _drop_keys_mergekit_ignores(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, path)) from None
    recipe._ignored_keys = ignored
    return recipe


def _drop_keys_mergekit_ignores(data: dict) -> list[str]:
    """Remove, in place, the keys mergekit-moe's config would ignore (its models allow extra keys) and return
    them by location; a near-miss of a known key stays, so that validation refuses it with a did-you-mean."""
    ignored = []

    def drop(mapping, model: type[BaseModel], where: str) -> None:
        if not isinstance(mapping, dict):
            return
        for key in list(mapping):
            if key in model.model_fields or not isinstance(key, str) or did_you_mean(key, model.model_fields):
                continue
            del mapping[key]
            ignored.append(where + key)

    drop(data, Recipe, "")
    for list_key in ("experts", "shared_experts"):
        for index, expert in enumerate(data.get(list_key) or [] if isinstance(data.get(list_key), list) else []):
            drop(expert, Expert, f"{list_key}.{index}.")
    return ignored


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return parse_recipe(text, path)
