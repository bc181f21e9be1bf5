"""The parameters a fine-tune trains: LoRA matrices per targeted linear, expert and layer; routers in full."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import PlanError
from moekit.finetune.options import TrainingOptions
from moekit.plan.shape import ModelShape


@dataclass
class Trainable:
    lora_numels: list[int]  # one entry per LoRA A or B matrix
    router_numels: list[int]
    by_kind: dict[str, int]
    lora_inputs_per_token: dict[str, int]  # kind -> input features of the targeted linears (dropout copies)


def trainable_parameters(shape: ModelShape, options: TrainingOptions) -> Trainable:
    layers = options.layers if options.layers is not None else list(range(shape.layers))
    if layers and max(layers) >= shape.layers:
        raise PlanError(f"layer index {max(layers)} is out of range: the model has {shape.layers} layers (0-{shape.layers - 1})")
    if not shape.is_moe and {"experts", "gate"} & set(options.target):
        raise PlanError(
            f"--target {','.join(t for t in options.target if t != 'attn')} needs an MoE, but this {shape.model_type} model is dense",
            hint="use --target attn, or plan the MoE that `moekit build` makes from it",
        )
    experts = options.experts if options.experts is not None else list(range(shape.experts))
    if shape.is_moe and experts and max(experts) >= shape.experts:
        raise PlanError(f"expert index {max(experts)} is out of range: the model has {shape.experts} experts (0-{shape.experts - 1})")
    r = options.lora_r
    lora: list[int] = []
    by_kind = {kind: 0 for kind in options.target}
    inputs: dict[str, int] = {"attn": 0, "experts": 0}
    for _layer in layers:
        if "attn" in options.target:
            for lin in shape.attention:
                lora += [r * lin.in_features, r * lin.out_features]
        if "experts" in options.target:
            for _expert in experts:
                for lin in shape.expert_mlp:
                    lora += [r * lin.in_features, r * lin.out_features]
    if "attn" in options.target:
        by_kind["attn"] = len(layers) * sum(r * (lin.in_features + lin.out_features) for lin in shape.attention)
        inputs["attn"] = sum(lin.in_features for lin in shape.attention)
    if "experts" in options.target:
        by_kind["experts"] = len(layers) * len(experts) * sum(r * (lin.in_features + lin.out_features) for lin in shape.expert_mlp)
        inputs["experts"] = sum(lin.in_features for lin in shape.expert_mlp)
    routers = [shape.experts * shape.hidden] * len(layers) if "gate" in options.target else []
    if routers:
        by_kind["gate"] = sum(routers)
    return Trainable(lora, routers, by_kind, inputs)
