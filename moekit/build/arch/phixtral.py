"""Phixtral output: Phi-2 (PhiForCausalLM) experts in moekit's own Phixtral model.

Phi-2 cannot be Mixtral: attention and MLP run in parallel from one LayerNorm, every projection has a
bias, the rotary embedding covers part of each head and the MLP is a non-gated GELU fc1/fc2. The
output keeps the base's tensors under their Phi names and adds, per layer,
`mlp.gate.weight` (experts, hidden) and `mlp.experts.E.fc1/fc2.weight/bias` from each expert. The
model code (`moekit/models/phixtral`) is written next to the weights with an `auto_map`, so the
output loads with `trust_remote_code=True` where moekit is not installed, and without it where it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moekit.build.arch.base import BuildInputs, OutputArchitecture, PlannedTensor

PHI_ARCHITECTURE = "PhiForCausalLM"
EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(fc[12])\.(weight|bias)$")
ROUTER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


class PhixtralArchitecture(OutputArchitecture):
    name = "phixtral"
    input_architectures = (PHI_ARCHITECTURE,)

    def supports(self, inputs: BuildInputs) -> str | None:
        if inputs.recipe.shared_experts:
            return "Phixtral has no shared experts"
        if inputs.base.architecture != PHI_ARCHITECTURE:
            return f"Phixtral is built from Phi-2 ({PHI_ARCHITECTURE}) models, not {inputs.base.architecture}"
        return None

    def output_config(self, inputs: BuildInputs):
        from moekit.models import PHIXTRAL_AUTO_MAP
        from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

        recipe = inputs.recipe
        base = inputs.base.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
            base.pop(key, None)
        config = PhixtralConfig(
            **base,
            num_local_experts=len(recipe.experts),
            num_experts_per_tok=recipe.experts_per_token,
            router_aux_loss_coef=recipe.moekit.router_aux_loss_coef,
            router_jitter_noise=recipe.moekit.router_jitter_noise,
        )
        config.architectures = ["PhixtralForCausalLM"]
        config.auto_map = dict(PHIXTRAL_AUTO_MAP)
        config.dtype = inputs.dtype
        return config

    def tensors(self, inputs: BuildInputs, routers: Callable[[int], torch.Tensor]) -> Iterator[PlannedTensor]:
        config = self.output_config(inputs)
        cast = lambda t: t.to(inputs.dtype)  # noqa: E731
        for name, shape in _state_shapes(config).items():
            if match := ROUTER_TENSOR.match(name):
                layer = int(match.group(1))
                yield PlannedTensor(name, shape, f"router ({inputs.recipe.gate_mode})", lambda layer=layer: cast(routers(layer)))
            elif match := EXPERT_TENSOR.match(name):
                layer, index, projection, kind = match.groups()
                expert, spec = inputs.experts[int(index)], inputs.recipe.experts[int(index)]
                source_name = f"model.layers.{layer}.mlp.{projection}.{kind}"
                yield PlannedTensor(
                    name,
                    shape,
                    f"expert {index} ({expert.ref})",
                    lambda expert=expert, spec=spec, source_name=source_name, projection=projection: cast(
                        _expert_tensor(expert, spec, source_name, is_residual=projection == "fc2")
                    ),
                )
            else:
                yield PlannedTensor(name, shape, "base", lambda name=name: cast(inputs.base.tensor(name)))

    def write_extra_files(self, out: Path) -> None:
        from moekit.models import write_phixtral_code

        write_phixtral_code(out)

    def active_parameters(self, config) -> tuple[int, int]:
        shapes = _state_shapes(config)
        numel = lambda shape: torch.Size(shape).numel()  # noqa: E731
        total = sum(numel(shape) for shape in shapes.values())
        expert_total = sum(numel(shape) for name, shape in shapes.items() if EXPERT_TENSOR.match(name))
        active = total - expert_total + expert_total * config.num_experts_per_tok // config.num_local_experts
        return total, active


def _state_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a Phixtral checkpoint stores, from the model code itself (on meta)."""
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

    with torch.device("meta"):
        model = PhixtralForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied to the embeddings; the bias stays
    return shapes


def _expert_tensor(expert, spec, name: str, is_residual: bool) -> torch.Tensor:
    """One expert tensor with the recipe's noise and residual scale (mergekit's code).

    The residual scale applies to fc2's weight and bias alike: both are the expert's contribution to the residual.
    """
    from mergekit.moe.common import noise_and_scale

    return noise_and_scale(expert.tensor(name), spec, is_residual=is_residual)
