"""Loading an MoE for (Q)LoRA training with every expert really quantized.

transformers 5 stores Mixtral experts as fused 3-D parameters (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)), and bitsandbytes only replaces `nn.Linear`, so a plain
`BitsAndBytesConfig(load_in_4bit=True)` load leaves every expert in bf16. Here each layer's experts (Mixtral's
fused ones, Phixtral's list of fc1/fc2 MLPs) are replaced by one `experts.ExpertBlock`, built by
`experts.build_expert_block` (the one factory; the streaming loader uses it too), which stores each projection of
all experts as one quantized tensor. The router module is kept, so top-k, softmax and renormalisation are the
model's own. Attention and dense MLP linear layers become bitsandbytes `Linear4bit` / `Linear8bitLt`; routers
(`mlp.gate`) and `lm_head` stay in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.errors import DependencyError, TrainingError
from moekit.finetune.expert_storage import ExpertStorage
from moekit.finetune.experts import build_expert_block, expert_blocks

# module names never quantized: routers must stay precise, lm_head is conventionally kept (as bitsandbytes does)
KEEP_FULL_PRECISION = ("lm_head",)


def _require_bitsandbytes(device: torch.device, compute_dtype: torch.dtype):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise DependencyError(f"bitsandbytes is not installed ({err})", hint="pip install bitsandbytes, or use --bits 16") from None
    try:
        bnb.functional.quantize_4bit(torch.zeros(64, dtype=compute_dtype, device=device), quant_type="nf4")
    except Exception as err:  # noqa: BLE001  (any backend failure means the quantized path cannot run here)
        raise DependencyError(f"bitsandbytes cannot quantize on {device.type} here: {err}", hint="use --bits 16, or a supported GPU") from None
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

        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if bias is not None:
        layer.bias = bias
    return layer


def expert_tensors(module: nn.Module) -> tuple[str, dict[str, torch.Tensor], nn.Module] | None:
    """(family, canonical fused tensors, activation) of a model's experts module, or None if it is not one.

    transformers 5's `MixtralExperts` already holds the fused layout; Phixtral's `nn.ModuleList` of `PhiMLP`
    experts is stacked (one layer's experts at a time).
    """
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3:
        if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True) or getattr(module, "has_bias", False):
            raise TrainingError(f"unsupported fused experts layout in {type(module).__name__} (transposed, interleaved or biased)")
        return "mixtral", {"gate_up_proj": module.gate_up_proj.data, "down_proj": module.down_proj.data}, module.act_fn
    if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(e, "fc1") and hasattr(e, "fc2") for e in module):
        tensors = {
            f"{proj}.{kind}": torch.stack([getattr(getattr(e, proj), kind).data for e in module]) for proj in ("fc1", "fc2") for kind in ("weight", "bias")
        }
        return "phixtral", tensors, module[0].activation_fn
    return None


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
    """Quantize `model` in place: every linear layer to `bits`, each layer's experts into one `ExpertBlock`.

    bits=4: NF4 with double quantization (bitsandbytes Linear4bit, the experts through bitsandbytes' functional
    API); bits=8: LLM.int8; bits=16: `compute_dtype`, with the same module structure, so adapter names are the
    same for all bits. Routers and lm_head stay unquantized in `compute_dtype`. Modules are
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

    # children are replaced while walking, so list the parents first (and skip what was replaced)
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        if any(parent_name == name or parent_name.startswith(name + ".") for name in replaced):
            continue
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            found = expert_tensors(child) if child_name == "experts" else None
            if found is not None:
                family, tensors, act_fn = found
                block = build_expert_block(family, tensors, bits=bits, compute_dtype=compute_dtype, quant_storage=quant_storage, device=target, act_fn=act_fn)
                setattr(parent, child_name, block)
                replaced.append(full_name)
            elif _is_plain_linear(child) and not is_router(full_name, child) and child_name not in KEEP_FULL_PRECISION:
                setattr(parent, child_name, make_linear(child.weight, child.bias))
    # everything left (embeddings, norms, routers, lm_head) in the compute dtype on the target device;
    # buffers such as rotary frequencies keep their dtype
    converted: dict[int, nn.Parameter] = {}  # tied parameters (embeddings = lm_head) stay one parameter
    for module in model.modules():
        if isinstance(module, ExpertStorage):
            continue  # stored as built
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


@torch.no_grad()
def dequantize_moe(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Turn a model quantized by `quantize_moe` / `loading.load_for_training` into the module structure of bits=16, in
    place, holding the weights the quantized model computes with: each bitsandbytes `Linear4bit` / `Linear8bitLt`
    becomes an `nn.Linear` with its dequantized weight (PEFT's `dequantize_bnb_weight`), each quantized expert
    projection a dense storage of its dequantized tensor. Returns the names of the modules it changed (linear
    layers and expert blocks).

    Call it before any forward: on a CPU with avx512_bf16, bitsandbytes repacks a 4-bit weight at its first
    eval-mode forward, after which it can no longer be dequantized exactly (refused here).
    """
    from peft.utils.integrations import dequantize_bnb_weight

    from moekit.finetune.expert_storage import DenseStorage

    changed: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            kind = type(child).__name__
            if kind not in ("Linear4bit", "Linear8bitLt"):
                continue
            if getattr(child.weight.quant_state if kind == "Linear4bit" else None, "packing_format_for_cpu", False):
                raise TrainingError(
                    f"{full_name}: bitsandbytes repacked this 4-bit weight for its CPU inference kernel; it cannot be dequantized exactly any more",
                    hint="dequantize a freshly loaded model, before any forward in eval mode",
                )
            weight = dequantize_bnb_weight(child.weight, state=getattr(child, "state", None)).to(dtype)  # (out, in)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta", dtype=dtype)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(parent, child_name, linear)
            changed.append(full_name)
    for name, block in expert_blocks(model).items():
        quantized = [projection for projection in block.projections if block.storage(projection).bits != 16]
        for projection in quantized:
            storage = block.storage(projection)
            setattr(block, projection, DenseStorage(storage.dequantize(dtype), dtype, storage.weight.device))
        if quantized:
            changed.append(name)
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    model.moekit_bits = 16
    return changed


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """What `peft.prepare_model_for_kbit_training` does, minus upcasting weights to fp32.

    Freezes every weight, and turns on non-reentrant gradient checkpointing (which needs no
    `requires_grad` on the inputs, unlike the reentrant variant that frozen embeddings would break).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    return model


def checkpointing_kwargs(preserve_rng_state: bool = True) -> dict:
    """torch.utils.checkpoint's arguments for moekit: non-reentrant. preserve_rng_state=False: the CUDA RNG state is
    not saved and restored around a recomputation (it cannot be during CUDA graph capture); exact as long as nothing
    in a checkpointed layer draws random numbers."""
    return {"use_reentrant": False} if preserve_rng_state else {"use_reentrant": False, "preserve_rng_state": False}


def enable_checkpointing(model: nn.Module, preserve_rng_state: bool = True) -> None:
    """Gradient checkpointing on `model` with `checkpointing_kwargs(preserve_rng_state)`."""
    kwargs = checkpointing_kwargs(preserve_rng_state)
    # transformers >= 5.23 renamed it; the GPU image's 5.17 only has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_quantized(model: nn.Module) -> dict[str, int]:
    """Numbers of 4-bit, 8-bit and plain floating-point weight tensors, and the bytes of all parameters."""
    counts = {"params4bit": 0, "int8": 0, "float": 0, "bytes": 0}
    expert_weights = {id(block.storage(name).weight): block.storage(name).bits for block in expert_blocks(model).values() for name in block.projections}
    for param in model.parameters():
        if id(param) in expert_weights:
            counts[{4: "params4bit", 8: "int8", 16: "float"}[expert_weights[id(param)]]] += 1
            counts["bytes"] += param.numel() * param.element_size()
            continue
        kind = param.__class__.__name__
        if kind == "Params4bit":
            counts["params4bit"] += 1
        elif kind == "Int8Params":
            counts["int8"] += 1
        elif param.is_floating_point():
            counts["float"] += 1
        counts["bytes"] += param.numel() * param.element_size()
    return counts
