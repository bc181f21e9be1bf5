"""moekit plan: arithmetic against hand-computed values, against the real quantized model and trainable
table on tiny configs, the options shared with `moekit finetune`, and the CLI's answers to bad input."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.errors import PlanError
from moekit.finetune.options import TrainingOptions
from moekit.plan import estimate, nf4_bytes
from moekit.plan.memory import RESERVED_FACTOR
from moekit.testing import tiny_config

VOCAB = 384
# the tiny Mixtral: hidden 64, intermediate 128, 2 layers, 4 heads of 16 (2 kv heads), 4 experts, top-2
H, I, L, KV, E = 64, 128, 2, 32, 4  # noqa: E741 (I = intermediate size, as in the memory formulas)


@pytest.fixture(scope="module")
def mixtral_config():
    return tiny_config("mixtral", VOCAB, architectures=["MixtralForCausalLM"], head_dim=16)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, mixtral_config):
    path = tmp_path_factory.mktemp("plan") / "mixtral"
    mixtral_config.save_pretrained(path)
    return path


def opts(**changes) -> TrainingOptions:
    """TrainingOptions within the tiny models' 256 positions."""
    return TrainingOptions(**{"max_seq_len": 128, **changes})


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --- arithmetic against hand-computed values -------------------------------------------------------


def test_nf4_bytes_match_bitsandbytes_storage_by_hand():
    # 64x128 values: 4096 packed bytes, 128 absmax (8-bit), 1 fp32 nested absmax, 256+1+16 fp32 constants
    assert nf4_bytes(64 * 128) == 4096 + 128 + 4 + (256 + 1 + 16) * 4
    # 64x32 values: 1024 bytes, 32 absmax, 1 nested absmax
    assert nf4_bytes(64 * 32) == 1024 + 32 + 4 + 1092
    # 257 blocks of 64 need 2 nested fp32 absmax
    assert nf4_bytes(257 * 64) == 257 * 32 + 257 + 8 + 1092


def test_weights_trainable_and_optimizer_states_by_hand(mixtral_config):
    plan = estimate(mixtral_config, opts(target=["attn", "experts", "gate"], lora_r=16, optimizer="adamw_torch"))
    # attention: q (64x64), k (32x64), v (32x64), o (64x64) per layer, 4-bit
    assert plan.part("weights", "attention") == L * (2 * 64 * 64 + 2 * 32 * 64) // 2
    assert plan.part("weights", "experts") == L * E * 3 * H * I // 2
    assert plan.part("weights", "routers") == L * E * H * 2  # bf16
    assert plan.part("weights", "embeddings + lm_head") == 2 * VOCAB * H * 2  # untied, bf16
    assert plan.part("weights", "norms") == (L * 2 * H + H) * 2
    # experts: one 4-bit tensor per projection for all experts (gate_up E x 2I x H, down E x H x I)
    constants = L * (
        2 * (nf4_bytes(64 * 64) - 2048) + 2 * (nf4_bytes(32 * 64) - 1024) + nf4_bytes(E * 2 * H * I) - E * H * I + nf4_bytes(E * H * I) - E * H * I // 2
    )
    assert plan.part("weights", "quantization constants") == constants
    # LoRA r=16: attention r*(in+out) summed = 16*(128+96+96+128); experts 16*((64+256) + (128+64)) per expert (fused gate_up)
    attn, experts, gate = L * 16 * 448, L * E * 16 * 512, L * E * H
    assert plan.trainable == {"attn": attn, "experts": experts, "gate": gate}
    lora = attn + experts
    assert plan.part("training", "LoRA adapters") == 4 * lora  # fp32
    assert plan.part("training", "gradients") == 4 * lora + 2 * gate  # routers train in bf16
    assert plan.part("training", "optimizer states") == 8 * lora + 4 * gate  # two states in the parameter dtype


def test_eight_bit_optimizer_states_by_hand(mixtral_config):
    plan = estimate(mixtral_config, opts(target=["attn"], lora_r=8, optimizer="adamw_8bit"))
    # LoRA A/B sizes r*in / r*out: 512 and 256 are below 4096 (fp32 states); none reaches 4096 here
    assert plan.part("training", "optimizer states") == 2 * 4 * L * 8 * 448
    big = estimate(mixtral_config, opts(target=["attn"], lora_r=64, optimizer="adamw_8bit"))
    # r=64: q/o A and B are 4096 values (8-bit: 2 bytes + 2 fp32 absmax per 256), k/v B 2048 (fp32)
    per_layer = 6 * (2 * 4096 + 8 * 16) + 2 * (2 * 4 * 2048)
    assert big.part("training", "optimizer states") == L * per_layer
    assert estimate(mixtral_config, opts(target=["attn"], optimizer="sgd")).part("training", "optimizer states") == 0


def test_parameter_counts_equal_the_model_and_the_build(mixtral_config):
    from moekit.build.arch.mixtral import MixtralArchitecture

    plan = estimate(mixtral_config, opts())
    model = _meta_model(mixtral_config)
    assert plan.parameters_total == sum(p.numel() for p in model.parameters())
    assert (plan.parameters_total, plan.parameters_active) == MixtralArchitecture().active_parameters(mixtral_config)
    assert plan.checkpoint_bytes == 2 * plan.parameters_total


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "phi"])
def test_dense_parameter_counts_equal_the_model(arch):
    config = tiny_config(arch, VOCAB)
    plan = estimate(config, opts(target=["attn"]))
    assert plan.parameters_total == plan.parameters_active == sum(p.numel() for p in _meta_model(config).parameters())


def test_phixtral_counts_equal_the_model_and_the_build():
    from moekit.build.arch.phixtral import PhixtralArchitecture
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

    phi = {key: value for key, value in tiny_config("phi", VOCAB).to_dict().items() if key != "model_type"}
    config = PhixtralConfig(**phi, num_local_experts=4, num_experts_per_tok=2)
    plan = estimate(config, opts())
    assert plan.parameters_total == sum(p.numel() for p in _meta_model(config).parameters())
    assert (plan.parameters_total, plan.parameters_active) == PhixtralArchitecture().active_parameters(config)
    # fc1/fc2 experts with biases (bf16 biases beside the 4-bit weights)
    assert plan.part("weights", "experts") == L * 4 * (2 * H * I // 2 + (I + H) * 2)


@pytest.mark.parametrize("family", ["mixtral", "phixtral"])
@pytest.mark.parametrize("intermediate", [128, 36])
def test_expert_linears_and_grouped_path_come_from_the_expert_block(family, intermediate):
    """The plan's expert linears are the projections the expert block stores, and its grouped-GEMM prediction is
    the block's own rule: what the block decides here (CPU, bf16) follows from the plan's shapes the same way."""
    from transformers import AutoModelForCausalLM

    from moekit.finetune.expert_layout import GROUPED_CUDA_CAPABILITY, runs_grouped
    from moekit.finetune.experts import _torch_version, expert_blocks
    from moekit.finetune.quantize import quantize_moe
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
    from moekit.plan.activations import grouped_experts
    from moekit.plan.shape import shape_from_config

    if family == "mixtral":
        config = tiny_config("mixtral", VOCAB, intermediate_size=intermediate)
    else:
        phi = {key: value for key, value in tiny_config("phi", VOCAB).to_dict().items() if key != "model_type"}
        config = PhixtralConfig(**{**phi, "intermediate_size": intermediate}, num_local_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    skeleton.to_empty(device="cpu")
    block = next(iter(expert_blocks(quantize_moe(skeleton, bits=16, device="cpu")).values()))
    shape = shape_from_config(config)

    assert [(lin.name, lin.out_features, lin.in_features, lin.bias) for lin in shape.expert_mlp] == [
        (name, *block.storage(name).shape[1:], hasattr(block, f"{name}_bias")) for name in block.projections
    ]
    dims = [size for lin in shape.expert_mlp for size in (lin.out_features, lin.in_features)]
    inputs = torch.zeros(2, config.hidden_size, dtype=torch.bfloat16)
    if hasattr(torch.nn.functional, "grouped_mm"):
        assert block._grouped_kernel_available(inputs) == runs_grouped(dims, 2, "cpu", bf16=True, torch_version=_torch_version())
    # 128 x 2 bytes is 16-byte aligned, 36 x 2 is not: the plan then counts the expert-by-expert path
    assert grouped_experts(shape) == runs_grouped(dims, 2, "cuda", bf16=True, cuda_capability=GROUPED_CUDA_CAPABILITY) == (intermediate == 128)


def test_activations_scale_with_tokens(mixtral_config):
    one = estimate(mixtral_config, opts(batch_size=1, max_seq_len=128))
    two = estimate(mixtral_config, opts(batch_size=2, max_seq_len=128))
    # checkpointed layer inputs: layers x tokens x hidden x 2 bytes
    assert one.part("activations", "checkpointed layer inputs") == L * 128 * H * 2
    assert two.part("activations", "checkpointed layer inputs") == 2 * one.part("activations", "checkpointed layer inputs")
    assert two.peak_bytes > one.peak_bytes
    # without checkpointing every layer keeps its activations
    off = estimate(mixtral_config, opts(batch_size=1, max_seq_len=128, gradient_checkpointing=False))
    assert off.part("activations", "all layers") > one.part("activations", "one layer recomputed") * L * 0.5
    # 4-bit weights lower the peak (8-bit optimizer states do not here: tensors under 4096 values keep fp32 states)
    assert estimate(mixtral_config, opts(bits=16)).peak_bytes > estimate(mixtral_config, opts(bits=4)).peak_bytes


def test_four_by_seven_b_shape_matches_the_measured_gpu_peak():
    """The H100 measurement of benchmarks/plan_accuracy.py (4x7B, seq 1024, batch 2, r=16 on attn+experts)."""
    from transformers import MixtralConfig

    config = MixtralConfig(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    plan = estimate(config, opts(target=["attn", "experts"], batch_size=2, max_seq_len=1024))
    # counted byte for byte on the quantized GPU model (12,850,931,712 with per-expert 4-bit tensors before the
    # expert block stored one tensor per projection; the CPU tests below check the count against the module)
    assert plan.group_bytes("weights") == 12_850_582_272
    # the trainable table of apply_targets (126,877,696 with per-expert w1/w2/w3 LoRA; gate and up now share one)
    assert sum(plan.trainable.values()) == 118_489_088
    assert abs(plan.peak_bytes - 16_681_171_968) / 16_681_171_968 < 0.10  # measured max_memory_allocated


@pytest.mark.parametrize(
    "changes, measured",
    [({"nf4_gemm": True}, 15_723_740_672), ({"nf4_gemm": True, "optimizer": "adamw_8bit", "offload_activations": True}, 14_981_318_144)],
    ids=["nf4-gemm", "nf4-gemm+8bit+offload"],
)
def test_four_by_seven_b_with_nf4_gemm_matches_the_measured_gpu_peak(changes, measured):
    """benchmarks/finetune_memory.py's 4x7b row on an H200 (seventh session): --paths moekit-nf4-gemm, and
    moekit-nf4-gemm-offload with --optimizer adamw_8bit (max_memory_allocated)."""
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    plan = estimate(config, opts(target=["attn", "experts"], batch_size=2, max_seq_len=1024, **changes))
    assert abs(plan.peak_bytes - measured) / measured < 0.05


# --- against the real quantized model and trainable table (CPU) ------------------------------------


def _stored_bytes(model) -> int:
    """Bytes of every parameter and its quantization state (4-bit absmax, nested absmax, codes, offset; int8 row scales)."""
    from moekit.finetune.expert_storage import ExpertStorage

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, ExpertStorage):  # the expert block's quantization constants are buffers
            for tensor in module.buffers():
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    for param in model.parameters():
        tensors = [param, getattr(param, "SCB", None)]
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_weights_equal_the_bytes_of_the_quantized_model(mixtral_config, bits):
    from transformers import AutoModelForCausalLM

    from moekit.finetune.quantize import quantize_moe

    torch.manual_seed(0)
    model = quantize_moe(AutoModelForCausalLM.from_config(mixtral_config, dtype=torch.bfloat16), bits=bits, device="cpu")
    assert model.moekit_bits == bits
    assert _stored_bytes(model) == estimate(mixtral_config, opts(bits=bits)).group_bytes("weights")


@pytest.mark.parametrize(
    "request_",
    [
        {"target": ["gate"]},
        {"target": ["attn", "experts"], "experts": [0, 2], "lora_r": 4},
        {"target": ["experts", "gate"], "layers": [1], "lora_r": 8},
    ],
)
def test_trainable_counts_equal_apply_targets(mixtral_config, request_):
    from transformers import AutoModelForCausalLM

    from moekit.finetune.quantize import quantize_moe
    from moekit.finetune.targets import apply_targets

    options = opts(**request_)
    model = quantize_moe(AutoModelForCausalLM.from_config(mixtral_config, dtype=torch.bfloat16), bits=16, device="cpu")
    _, table = apply_targets(model, options)
    plan = estimate(mixtral_config, options)
    assert plan.trainable == table.by("kind")


# --- fit search ----------------------------------------------------------------------------------------


def test_fit_verdict_and_largest_settings(mixtral_config):
    roomy = estimate(mixtral_config, opts(batch_size=2, max_seq_len=128), gpu_memory=80 * 10**9)
    assert roomy.fits and roomy.largest_batch_size >= 2 and roomy.advice.startswith("nothing needed")
    # a GPU just below what batch 2 needs: batch 1 fits, and the advice says so
    need_one = estimate(mixtral_config, opts(batch_size=1, max_seq_len=256)).gpu_bytes_needed
    need_two = estimate(mixtral_config, opts(batch_size=2, max_seq_len=256)).gpu_bytes_needed
    tight = estimate(mixtral_config, opts(batch_size=2, max_seq_len=256), gpu_memory=(need_one + need_two) // 2)
    assert not tight.fits and tight.largest_batch_size == 1
    assert "--batch-size 1" in tight.advice or "adamw_8bit" in tight.advice
    hopeless = estimate(mixtral_config, opts(), gpu_memory=10**6)
    assert not hopeless.fits and hopeless.largest_batch_size is None and hopeless.advice.startswith("no setting fits")


def test_advice_adds_memory_only_changes_before_it_shortens_the_sequence():
    """On a GPU that 8-bit states, offloading and --memory-limit together make fit at the requested batch and sequence,
    that is the advice; a sequence cut below half is never offered alone."""
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32768)  # fmt: skip
    options = TrainingOptions(target=["attn", "experts"], batch_size=2, max_seq_len=1024)
    needed = estimate(config, options.model_copy(update={"optimizer": "adamw_8bit", "offload_activations": True, "memory_limit": "24GB"}))
    plan = estimate(config, options, gpu_memory=needed.gpu_bytes_needed)
    assert not plan.fits
    limit = f"{needed.gpu_bytes_needed / 1e9:.2f}GB"
    assert plan.advice == f"--optimizer adamw_8bit, then --offload-activations, then --memory-limit {limit}", plan.advice
    # at the limit a projection is dequantized 64 rows of every expert at a time: the dequantized weight of the
    # backward pass is then attention's largest (4096 x 4096), as with --nf4-gemm, instead of 4 experts' gate_up_proj
    memory_only = options.model_copy(update={"optimizer": "adamw_8bit", "offload_activations": True})
    whole = estimate(config, memory_only).gpu_bytes_needed
    assert whole - needed.gpu_bytes_needed == int((4 * 2 * 14336 * 4096 - 4096 * 4096) * 2 * RESERVED_FACTOR)  # reserved by the allocator
    assert estimate(config, memory_only.model_copy(update={"nf4_gemm": True})).gpu_bytes_needed == needed.gpu_bytes_needed
    for gpu_memory in range(needed.gpu_bytes_needed, estimate(config, options).gpu_bytes_needed, 200_000_000):
        advice = estimate(config, options, gpu_memory=gpu_memory).advice
        cut = [int(word) for word in advice.replace(",", " ").split() if word.isdigit()] if "--max-seq-len" in advice else []
        assert not cut or cut[-1] >= 512, advice


def test_render_and_to_dict(mixtral_config):
    plan = estimate(mixtral_config, opts(), gpu_memory=24 * 10**9)
    text = plan.render()
    for part in (
        "attention",
        "experts",
        "routers",
        "embeddings + lm_head",
        "quantization constants",
        "LoRA adapters",
        "optimizer states",
        "checkpointed layer inputs",
        "predicted peak",
        "on a 24.00 GB GPU: fits",
    ):
        assert part in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["peak_bytes"] == plan.peak_bytes and data["fits"] is True
    assert data["parameters"]["total"] == plan.parameters_total


# --- errors ------------------------------------------------------------------------------------------


def test_refusals(mixtral_config):
    with pytest.raises(PlanError, match="beyond the model's max_position_embeddings.*"):
        estimate(mixtral_config, opts(max_seq_len=512))
    with pytest.raises(PlanError, match="needs an MoE"):
        estimate(tiny_config("llama", VOCAB), opts(target=["experts"]))
    with pytest.raises(PlanError, match="expert index 4 is out of range"):
        estimate(mixtral_config, opts(experts=[4]))
    with pytest.raises(PlanError, match="layer index 2 is out of range"):
        estimate(mixtral_config, opts(layers=[2]))
    with pytest.raises(PlanError, match="not a causal language model"):
        estimate({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64}, opts())
    with pytest.raises(PlanError, match="does not know the architecture 'gpt2'"):
        estimate({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, opts())
    with pytest.raises(PlanError, match="GPU memory must be positive"):
        estimate(mixtral_config, opts(), gpu_memory=0)


def test_training_state_equals_a_real_adamw_step(mixtral_config):
    """LoRA weights, gradients and AdamW states after one real step on the CPU, byte for byte."""
    from transformers import AutoModelForCausalLM

    from moekit.finetune.quantize import quantize_moe
    from moekit.finetune.targets import apply_targets

    options = opts(target=["attn", "experts", "gate"], lora_r=4, layers=[1])
    torch.manual_seed(0)
    model = quantize_moe(AutoModelForCausalLM.from_config(mixtral_config, dtype=torch.bfloat16), bits=16, device="cpu")
    wrapped, _ = apply_targets(model, options)
    trainable = [param for param in wrapped.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, VOCAB, (2, 16))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    plan = estimate(mixtral_config, options)
    lora = [param for name, param in wrapped.named_parameters() if param.requires_grad and ".lora_" in name]
    assert nbytes(lora) == plan.part("training", "LoRA adapters")
    assert nbytes(param.grad for param in trainable) == plan.part("training", "gradients")
    states = [optimizer.state[param][key] for param in trainable for key in ("exp_avg", "exp_avg_sq")]
    assert nbytes(states) == plan.part("training", "optimizer states")


def test_memory_limit_is_read_as_a_size_and_refused_when_not_positive():
    assert TrainingOptions(memory_limit="15GB").memory_limit == 15 * 10**9
    assert TrainingOptions(memory_limit="1.5GiB").memory_limit == int(1.5 * 2**30)
    for bad in ("0GB", "lots"):
        with pytest.raises(ValueError, match="memory_limit"):
            TrainingOptions(memory_limit=bad)
