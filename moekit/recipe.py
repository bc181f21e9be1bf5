"""The build recipe: a superset of mergekit-moe's YAML.

Every mergekit-moe key is accepted with its meaning unchanged; moekit's own settings live under the
single extra key `moekit:` so that a mergekit-moe recipe builds as it is and a moekit recipe says
plainly what mergekit-moe would not understand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moekit.errors import RecipeError, did_you_mean

GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random", "calibrated"]
PROMPT_GATE_MODES = ("hidden", "cheap_embed", "calibrated")
DType = Literal["float32", "float16", "bfloat16"]


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str = Field(description="Local directory, Hub id (`org/name[@revision]`) or `zoo:NAME` of the dense model whose MLPs become this expert.")
    positive_prompts: list[str] | None = Field(default=None, description="Text that should be routed to this expert.")
    negative_prompts: list[str] | None = Field(default=None, description="Text that should not be routed to this expert.")
    noise_scale: float | None = Field(default=None, description="Standard deviation of Gaussian noise added to this expert's MLP weights.")
    residual_scale: float | None = Field(default=None, description="Factor applied to this expert's down projection (its contribution to the residual stream).")

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
    architecture: Literal["mixtral", "phixtral"] | None = Field(default=None, description="Output architecture; chosen from the inputs when omitted.")
    shared_experts: list[Expert] | None = Field(default=None, description="mergekit-moe key for Qwen2-MoE/DeepSeek outputs; no moekit output supports shared experts yet.")
    moekit: MoekitSettings = Field(default_factory=MoekitSettings, description="moekit's own settings.")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        n = len(self.experts)
        if not 1 <= self.experts_per_token <= n:
            raise ValueError(f"experts_per_token must be between 1 and the number of experts ({n}), got {self.experts_per_token}")
        if self.shared_experts:
            raise ValueError("shared_experts are not supported: moekit writes Mixtral or Phixtral MoEs, which have no shared experts")
        if self.gate_mode in PROMPT_GATE_MODES:
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(f"expert {i} ({expert.source_model}) has no positive_prompts, which gate_mode '{self.gate_mode}' needs; add prompts or use gate_mode 'random'")
            if n > 1:
                prompt_sets = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
                if len(prompt_sets) == 1:
                    raise ValueError("all experts have identical prompts, so no router could tell them apart; give each expert prompts for its own speciality")
        return self

    @property
    def source_models(self) -> list[str]:
        """Base model and experts, base first, without duplicates."""
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in self.experts]))


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
        for candidate in (Expert, MoekitSettings, CalibrationSettings):
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
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, path)) from None


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return parse_recipe(text, path)
