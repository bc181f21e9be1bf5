"""Activation memory of a training step: one decoder layer, the chunked loss, the router buffers, and the
transients of a layer's backward pass (which depend on whether the experts run grouped)."""

from __future__ import annotations

from moekit.finetune.expert_layout import GROUPED_CUDA_CAPABILITY, SLICE_ROWS, runs_grouped
from moekit.finetune.options import TrainingOptions
from moekit.plan.shape import ModelShape
from moekit.plan.storage import COMPUTE_BYTES
from moekit.plan.trainable import Trainable

# TRL's SFTTrainer scores tokens with a chunked ("fused") LM head: the (tokens, vocab) logits never exist
# whole, only one bf16 tile of LOSS_TOKEN_CHUNK tokens x LOSS_VOCAB_CHUNK vocabulary entries at a time
LOSS_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
LOSS_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
LOSS_PER_TOKEN_BYTES = 40  # fp32 running max, sums, target logit, log-probs, entropy per scored token


def layer_activation_bytes(shape: ModelShape, options: TrainingOptions, tokens: int, targets: Trainable) -> int:
    """Bytes one decoder layer keeps for its backward pass (bf16 compute, autocast), for `tokens` tokens."""
    h, inter, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    dropout = 3 if options.lora_dropout > 0 else 0  # a bf16 copy of the LoRA input and its bool mask
    norm = 10 * h  # the norm's fp32 input and normalized values and its bf16 output
    # attention: q/k/v outputs, rotated q/k, attention output (+ softmax stats), o output, residual
    attention = norm + 2 * (q + 2 * kv) + 4 * (q + kv) + 2 * q + 4 * h + dropout * targets.lora_inputs_per_token["attn"]
    per_token = attention
    if shape.is_moe:
        per_token += norm + shape.experts * 10  # router logits (bf16), fp32 softmax, routing weights
        experts_targeted = targets.lora_inputs_per_token["experts"] > 0
        if shape.gated_mlp:
            # per routed token: silu input, silu output, up output (kept by the product), weighted output
            routed = 6 * inter + 2 * h
            if experts_targeted:
                routed += (2 * 3 * h + 3 * inter) if dropout else (2 * h + 2 * inter)
        else:
            # fc1 output, gelu_new's intermediates, weighted fc2 output
            routed = 12 * inter + 2 * h
            if experts_targeted:
                routed += (3 * h + 3 * inter) if dropout else (2 * h + 2 * inter)
        per_token += shape.top_k * routed
    else:
        per_token += norm + (6 * inter + 2 * h if shape.gated_mlp else 12 * inter + 2 * h)
    return tokens * per_token


def grouped_experts(shape: ModelShape) -> bool:
    """Whether the experts run as grouped GEMMs when training on a GPU (bf16 compute, sm80+): the expert block's
    own rule (`expert_layout.runs_grouped`) for its projections (`shape.expert_mlp`), at any --bits and --experts."""
    if not shape.is_moe:
        return False
    dims = [size for lin in shape.expert_mlp for size in (lin.out_features, lin.in_features)]
    return runs_grouped(dims, COMPUTE_BYTES, "cuda", bf16=True, cuda_capability=GROUPED_CUDA_CAPABILITY)


# dimensions that the NF4 grouped GEMM tiles whole in both directions (`nf4_grouped_mm.fits` with its CONFIGS)
NF4_GEMM_TILE = 128


def nf4_gemm_runs_for(shape: ModelShape) -> bool:
    """Whether --nf4-gemm's kernel runs for every expert projection: all their dimensions in whole tiles."""
    return all(size % NF4_GEMM_TILE == 0 for lin in shape.expert_mlp for size in (lin.out_features, lin.in_features))


def activations(shape: ModelShape, options: TrainingOptions, batch: int, seq: int, targets: Trainable) -> dict[str, int]:
    tokens = batch * seq
    h = shape.hidden
    layer = layer_activation_bytes(shape, options, tokens, targets)
    checkpoint_input = tokens * h * COMPUTE_BYTES
    # the loss: TRL's chunked LM head over the scored tokens (every position but each sequence's last)
    scored = batch * (seq - 1)
    tile = min(scored, LOSS_TOKEN_CHUNK) * min(shape.vocab, LOSS_VOCAB_CHUNK) * COMPUTE_BYTES
    final_hidden = tokens * h * (8 + COMPUTE_BYTES)  # final norm (fp32 input, bf16 output) and its output
    loss_forward = final_hidden + tile + scored * (h * COMPUTE_BYTES + LOSS_PER_TOKEN_BYTES)
    # backward: the fp32 hidden-state gradient, its bf16 copy, the saved scored hidden states, the tile
    loss_backward = final_hidden + tile + scored * (h * (4 + 2 * COMPUTE_BYTES) + LOSS_PER_TOKEN_BYTES) + tokens * h * COMPUTE_BYTES
    # load-balancing loss: every layer's router logits (kept), concatenated, fp32 softmax, top-k one-hot (int64)
    routing = 0
    if shape.is_moe:
        routing = shape.layers * tokens * shape.experts * (2 * COMPUTE_BYTES + 2 * 4 + shape.top_k * 8)
    # transient in a layer's backward: dequantized frozen weights and the gradients of the intermediate
    # activations. Grouped experts re-materialise one projection of every expert at once and take the
    # gradients of all routed tokens together; otherwise one linear layer and one expert at a time.
    largest = max(lin.weight_numel for lin in shape.attention + shape.expert_mlp)
    if grouped_experts(shape):  # bf16 expert weights are used as they are
        dequantized = shape.experts * largest
        if options.nf4_gemm and nf4_gemm_runs_for(shape):  # only attention's linears are dequantized, one at a time
            dequantized = max(lin.weight_numel for lin in shape.attention)
        elif options.memory_limit is not None:  # at the limit, projections are dequantized down to SLICE_ROWS rows at a time
            dequantized = max(max(lin.weight_numel for lin in shape.attention), shape.experts * SLICE_ROWS * max(lin.in_features for lin in shape.expert_mlp))
        weights_at_once, rows_at_once = (dequantized if options.bits < 16 else 0), tokens * shape.top_k
    else:
        weights_at_once = largest if options.bits < 16 else 0  # bf16 weights are used as they are
        rows_at_once = -(-tokens * shape.top_k // max(shape.experts, 1))
    backward_transient = (weights_at_once + 3 * rows_at_once * shape.intermediate) * COMPUTE_BYTES
    # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.tensors), not as a saved
    # tensor, so gradient checkpointing cannot drop it: every int8 layer's inputs stay for the whole step
    int8_inputs = 0
    if options.bits == 8:
        # MoE experts are int8 tensors of the expert block, whose backward keeps only the row offsets
        mlp_inputs = 0 if shape.is_moe else 2 * h + 2 * shape.intermediate  # the MLP's input and the down input
        int8_inputs = shape.layers * tokens * (2 * h + 2 * shape.q_dim + shape.top_k * mlp_inputs)
    return {
        "int8_inputs": int8_inputs,
        # offloaded: only the input whose copy to the CPU is in flight stays on the GPU (`finetune/offload.py`)
        "checkpoints": (checkpoint_input if options.offload_activations else shape.layers * checkpoint_input) if options.gradient_checkpointing else 0,
        "layer": layer,
        "all_layers": shape.layers * layer,
        "loss_forward": loss_forward,
        "loss_backward": loss_backward,
        "routing": routing,
        "backward_transient": backward_transient,
        "checkpoint_input": checkpoint_input,
    }
