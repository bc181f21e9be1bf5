"""Loading an MoE for (Q)LoRA training with every expert really quantized.

transformers 5 stores Mixtral experts as fused 3-D parameters (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)). bitsandbytes only replaces `nn.Linear`, so a plain
`BitsAndBytesConfig(load_in_4bit=True)` load leaves every expert in bf16. Here the fused experts are
replaced by `MixtralExpertList`: one small MLP of three linear layers per expert
(`mlp.experts.E.w_gate` / `w_up` / `w_down`), which bitsandbytes can quantize, with the same routing math
(the router module itself is kept, so top-k, softmax and renormalisation are transformers' own).

The per-expert names are chosen so that PEFT takes them literally: PEFT >= 0.18 rewrites the legacy Mixtral
names `w1`/`w2`/`w3` (and `gate`), and for Qwen-MoE-like models `gate_proj`/`up_proj`/`down_proj`, into
targets on the fused parameters (see `peft.utils.transformers_weight_conversion`), so per-expert modules
named that way would silently get no adapter.

Phixtral's experts are already `nn.ModuleList`s of `fc1`/`fc2` linear layers; only quantization is needed.
Routers (`mlp.gate`) and `lm_head` stay in the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.errors import DependencyError, TrainingError

# per-expert projection names of the unfused Mixtral experts -> legacy checkpoint names (`experts.E.w1` ...)
MIXTRAL_EXPERT_PROJECTIONS: dict[str, str] = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
# module names never quantized: routers must stay precise, lm_head is conventionally kept (as bitsandbytes does)
KEEP_FULL_PRECISION = ("lm_head",)


class MixtralExpertMLP(nn.Module):
    """One Mixtral expert: w_down(act(w_gate(x)) * w_up(x))."""

    def __init__(self, w_gate: nn.Module, w_up: nn.Module, w_down: nn.Module, act_fn):
        super().__init__()
        self.w_gate = w_gate
        self.w_up = w_up
        self.w_down = w_down
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act_fn(self.w_gate(hidden_states)) * self.w_up(hidden_states))


def _grouped_mm(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(tokens, in) rows grouped by expert @ (experts, in, out) -> (tokens, out); offsets = cumulative rows per expert.

    torch's grouped GEMM where it has a kernel for these tensors (CUDA bf16 on sm80+, CPU on torch >= 2.11),
    else one matmul per expert.
    """
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if inputs.device.type == "cuda":
        native = (
            inputs.dtype == weight.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(inputs.device) >= (8, 0)
            and all(size % 8 == 0 for size in weight.shape[1:])  # 16-byte aligned rows
        )
    else:
        native = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11) and inputs.dtype == weight.dtype
    if grouped is not None and native:
        return grouped(inputs, weight, offs=offsets)
    outputs, start = [], 0
    for expert_idx, end in enumerate(offsets.tolist()):
        outputs.append(inputs[start:end] @ weight[expert_idx].to(inputs.dtype))
        start = end
    return torch.cat(outputs)


def _stacked_weight(layers: tuple[nn.Module, ...], dtype: torch.dtype) -> torch.Tensor:
    """The frozen weights of same-shaped linear layers (4-bit ones dequantized) as one (experts, out, in) tensor."""
    first = layers[0]
    stacked = torch.empty((len(layers), first.out_features, first.in_features), dtype=dtype, device=first.weight.device)
    for expert_idx, layer in enumerate(layers):
        weight = layer.weight
        if weight.__class__.__name__ == "Params4bit":
            import bitsandbytes as bnb

            # straight into the stack, no temporary copy (bitsandbytes has the `out=` kernel on CUDA only)
            if weight.quant_state.dtype == dtype and stacked.device.type == "cuda":
                bnb.functional.dequantize_4bit(weight.data, weight.quant_state, out=stacked[expert_idx])
                continue
            weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        stacked[expert_idx].copy_(weight.detach())
    return stacked


class _GroupedFrozenLinear(torch.autograd.Function):
    """Grouped matmul with frozen (e.g. 4-bit) expert weights, re-materialised in the backward pass instead of kept."""

    @staticmethod
    def forward(ctx, inputs, offsets, layers):
        ctx.layers = layers
        ctx.save_for_backward(offsets)
        weight = _stacked_weight(layers, inputs.dtype)  # (experts, out, in)
        return _grouped_mm(inputs, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_output):
        (offsets,) = ctx.saved_tensors
        weight = _stacked_weight(ctx.layers, grad_output.dtype)
        return _grouped_mm(grad_output.contiguous(), weight, offsets), None, None


def _plain_lora(module: nn.Module):
    """(base layer, adapter name) if `module` is a PEFT LoRA layer doing plain LoRA right now, else None."""
    if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return None
    adapters = [name for name in module.active_adapters if name in module.lora_A]
    if module.merged or module.disable_adapters or len(adapters) != 1:
        return None
    name = adapters[0]
    if name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None:
        return None
    return module.base_layer, name


def _groupable_base(layer: nn.Module) -> bool:
    return layer.bias is None and (type(layer) is nn.Linear or layer.weight.__class__.__name__ == "Params4bit")


class MixtralExpertList(nn.ModuleList):
    """Drop-in for transformers' fused `MixtralExperts`: same call signature, one module per expert.

    When every expert's projection is a frozen 4-bit/16-bit linear layer, either bare or with the same plain
    LoRA adapter on all experts (what `apply_targets` makes), the experts run (on CUDA) as grouped GEMMs (one call per
    projection for all experts, LoRA included) with no host synchronisation; otherwise expert by expert. Both
    compute w_down(act(w_gate(x)) * w_up(x)) + LoRA exactly as the per-expert modules and PEFT would.
    """

    # None: grouped GEMMs on CUDA, where launching many small per-expert ops is what limits speed, and the
    # expert-by-expert path elsewhere (the same math; CPU runs then draw LoRA dropout exactly as PEFT does);
    # True / False force one path
    grouped: bool | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (tokens, hidden); top_k_index / top_k_weights (tokens, top_k)
        top_k = top_k_index.shape[-1]
        final_hidden_states = torch.zeros_like(hidden_states)
        flat_experts = top_k_index.reshape(-1)  # (tokens * top_k,)
        # group the (token, slot) pairs by expert with one sort
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=len(self))  # (experts,)
        token_index = order // top_k  # (tokens * top_k,) sorted by expert
        weights = top_k_weights.reshape(-1)[order]
        grouped = hidden_states.device.type == "cuda" if self.grouped is None else self.grouped
        projections = [self._grouped_projection(name) for name in ("w_gate", "w_up", "w_down")] if grouped else [None]
        if all(projection is not None for projection in projections):
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            gate, up, down = projections
            expert_inputs = hidden_states[token_index]  # (tokens * top_k, hidden)
            intermediate = self[0].act_fn(gate(expert_inputs, offsets)) * up(expert_inputs, offsets)
            expert_outputs = down(intermediate, offsets) * weights[:, None]
            return final_hidden_states.index_add_(0, token_index, expert_outputs.to(final_hidden_states.dtype))
        start = 0
        for expert_idx, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            chosen = token_index[start : start + count]
            expert_output = self[expert_idx](hidden_states[chosen])  # (count, hidden)
            expert_output = expert_output * weights[start : start + count, None]
            final_hidden_states.index_add_(0, chosen, expert_output.to(final_hidden_states.dtype))
            start += count
        return final_hidden_states

    def _grouped_projection(self, name: str):
        """A function (inputs, offsets) -> outputs computing projection `name` of all experts at once, or None."""
        modules = [getattr(expert, name) for expert in self]
        loras = [_plain_lora(module) for module in modules]
        if all(lora is None for lora in loras):
            bases, adapter = tuple(modules), None
        elif all(lora is not None for lora in loras) and len({lora[1] for lora in loras}) == 1:
            bases, adapter = tuple(lora[0] for lora in loras), loras[0][1]
            if len({module.scaling[adapter] for module in modules}) != 1:
                return None
        else:
            return None
        if not all(hasattr(base, "weight") and _groupable_base(base) for base in bases):
            return None

        def project(inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            result = _GroupedFrozenLinear.apply(inputs, offsets, bases)
            if adapter is None:
                return result
            first = modules[0]
            lora_a = torch.stack([module.lora_A[adapter].weight for module in modules])  # (experts, r, in)
            lora_b = torch.stack([module.lora_B[adapter].weight for module in modules])  # (experts, out, r)
            # PEFT computes LoRA in the adapter's dtype unless autocast is on; do the same
            compute_dtype = inputs.dtype if torch.is_autocast_enabled() else lora_a.dtype
            lora_inputs = first.lora_dropout[adapter](inputs).to(compute_dtype)
            hidden = _grouped_mm(lora_inputs, lora_a.to(compute_dtype).transpose(1, 2), offsets)  # (rows, r)
            delta = _grouped_mm(hidden, lora_b.to(compute_dtype).transpose(1, 2), offsets) * first.scaling[adapter]
            return result + delta.to(result.dtype)

        return project


def _require_bitsandbytes(device: torch.device, compute_dtype: torch.dtype):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise DependencyError(
            f"bitsandbytes is not installed ({err})", hint="pip install bitsandbytes, or use --bits 16"
        ) from None
    try:
        bnb.functional.quantize_4bit(torch.zeros(64, dtype=compute_dtype, device=device), quant_type="nf4")
    except Exception as err:  # noqa: BLE001  (any backend failure means the quantized path cannot run here)
        raise DependencyError(
            f"bitsandbytes cannot quantize on {device.type} here: {err}", hint="use --bits 16, or a supported GPU"
        ) from None
    return bnb


def _new_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A linear layer holding `weight` (out, in) at `bits`, built on `device` (quantized there)."""
    out_features, in_features = weight.shape
    weight = weight.detach().to(compute_dtype)
    bias = None if bias is None else nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    if bits == 16:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=compute_dtype)
        # a copy: the slice of a fused expert tensor would otherwise keep the whole fused tensor alive
        layer.weight = nn.Parameter(weight.to(device=device, copy=True), requires_grad=False)
    elif bits == 4:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
            compress_statistics=True, quant_type="nf4", quant_storage=quant_storage, device="meta",
        )  # fmt: skip
        # moving a Params4bit to a device is what quantizes it (NF4, double-quantized absmax)
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
            quant_storage=quant_storage, module=layer,
        ).to(device)  # fmt: skip
    elif bits == 8:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if bias is not None:
        layer.bias = bias
    return layer


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3


def _unfuse_experts(fused: nn.Module, make_linear) -> MixtralExpertList:
    """Per-expert modules from fused (E, 2I, H) / (E, H, I) parameters, one expert at a time."""
    if getattr(fused, "is_transposed", False) or not getattr(fused, "is_concatenated", True) or getattr(fused, "has_bias", False):
        raise TrainingError(f"unsupported fused experts layout in {type(fused).__name__} (transposed, interleaved or biased)")
    intermediate = fused.down_proj.shape[-1]
    experts = MixtralExpertList()
    for expert_idx in range(fused.gate_up_proj.shape[0]):
        gate_up = fused.gate_up_proj[expert_idx]  # (2I, H): gate rows first, then up rows
        experts.append(
            MixtralExpertMLP(
                w_gate=make_linear(gate_up[:intermediate], None),
                w_up=make_linear(gate_up[intermediate:], None),
                w_down=make_linear(fused.down_proj[expert_idx], None),  # (H, I)
                act_fn=fused.act_fn,
            )
        )
    return experts


def is_router(name: str, module: nn.Module) -> bool:
    """Routers are the `gate` of an MoE block (Mixtral `mlp.gate` / legacy `block_sparse_moe.gate`, Phixtral `mlp.gate`)."""
    return name.rsplit(".", 1)[-1] == "gate" and not hasattr(module, "gate_up_proj")


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, dict):
        if set(device) != {""}:
            raise TrainingError("only single-device loading is supported (device_map={'': device} or a device name)")
        device = device[""]
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


@torch.no_grad()
def quantize_moe(
    model: nn.Module,
    bits: int = 4,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize `model` in place: every linear layer to `bits`, the fused Mixtral experts unfused first.

    bits=4: NF4 with double quantization (bitsandbytes Linear4bit); bits=8: LLM.int8 (Linear8bitLt);
    bits=16: plain `nn.Linear` in `compute_dtype` with the same per-expert structure, so adapter names
    are the same for all bits. Routers and lm_head stay unquantized in `compute_dtype`. Modules are
    converted one at a time and moved to `device` (default: where the model is), so a model loaded on the
    CPU never has all its experts in bf16 on the GPU. Returns the model.
    """
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    target = _resolve_device(device) if device is not None else next(model.parameters()).device
    if bits != 16:
        _require_bitsandbytes(target, compute_dtype)

    def make_linear(weight, bias):
        return _new_linear(weight, bias, bits=bits, compute_dtype=compute_dtype, quant_storage=quant_storage, device=target)

    # children are replaced while walking, so list the parents first
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _is_fused_experts(child):
                setattr(parent, child_name, _unfuse_experts(child, make_linear))
            elif _is_plain_linear(child) and not is_router(full_name, child) and child_name not in KEEP_FULL_PRECISION:
                setattr(parent, child_name, make_linear(child.weight, child.bias))
    # everything left (embeddings, norms, routers, lm_head) in the compute dtype on the target device;
    # buffers such as rotary frequencies keep their dtype
    converted: dict[int, nn.Parameter] = {}  # tied parameters (embeddings = lm_head) stay one parameter
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.__class__.__name__ in ("Params4bit", "Int8Params"):
                continue
            dtype = compute_dtype if param.is_floating_point() else param.dtype
            if id(param) in converted:
                module._parameters[name] = converted[id(param)]
            elif param.device != target or param.dtype != dtype:
                new_param = nn.Parameter(param.data.to(device=target, dtype=dtype), requires_grad=param.requires_grad)
                converted[id(param)] = module._parameters[name] = new_param
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != target:
                module._buffers[name] = buffer.to(target)
    model.is_loaded_in_4bit = bits == 4
    model.is_loaded_in_8bit = bits == 8
    model.moekit_bits = bits
    return model


def load_moe_for_training(
    path: str | Path,
    *,
    bits: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    device_map=None,
    quant_storage: torch.dtype = torch.uint8,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Mixtral/Phixtral (or dense) checkpoint for training with every linear layer at `bits`.

    The checkpoint is streamed tensor by tensor onto the device (`device_map`: a device, {"": device} or
    None for the GPU if there is one) and quantized on the way, so neither the CPU nor the GPU ever
    holds it whole in bf16: `moekit.finetune.loading.load_for_training`, which gives the same model as
    `from_pretrained` + `quantize_moe`. `config.use_cache` is turned off for training; the router
    auxiliary loss (`output_router_logits`) is left to the trainer.
    """
    from moekit.finetune.loading import load_for_training

    return load_for_training(
        path, bits=bits, compute_dtype=compute_dtype, device_map=device_map, quant_storage=quant_storage, trust_remote_code=trust_remote_code
    )


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """What `peft.prepare_model_for_kbit_training` does, minus upcasting weights to fp32.

    Freezes every weight, and turns on non-reentrant gradient checkpointing (which needs no
    `requires_grad` on the inputs, unlike the reentrant variant that frozen embeddings would break).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # transformers >= 5.2x renamed it; the GPU image's 5.17 only has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def count_quantized(model: nn.Module) -> dict[str, int]:
    """Numbers of 4-bit, 8-bit and plain floating-point weight tensors, and the bytes of all parameters."""
    counts = {"params4bit": 0, "int8": 0, "float": 0, "bytes": 0}
    for param in model.parameters():
        kind = param.__class__.__name__
        if kind == "Params4bit":
            counts["params4bit"] += 1
        elif kind == "Int8Params":
            counts["int8"] += 1
        elif param.is_floating_point():
            counts["float"] += 1
        counts["bytes"] += param.numel() * param.element_size()
    return counts
