"""4-bit loading of MoEs (experts really quantized), exact unfusing, targets, change checks, router files, adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moekit.errors import SourceError, TargetError, TrainingError
from moekit.finetune.experts import ExpertBlock, path_counts
from moekit.finetune.loading import load_for_training
from moekit.finetune.options import TrainingOptions
from moekit.finetune.quantize import count_quantized, quantize_moe
from moekit.finetune.targets import (
    apply_targets,
    load_routers,
    save_routers,
    snapshot_trainable,
    verify_changed,
)

NUM_EXPERTS, NUM_LAYERS, HIDDEN, INTERMEDIATE = 3, 2, 64, 128


@pytest.fixture(scope="module")
def moe_dir(llama_family, tmp_path_factory):
    """A tiny 3-expert Mixtral written by `moekit build` (random routers, so every expert gets tokens)."""
    from moekit.build.options import BuildOptions
    from moekit.build.pipeline import build
    from moekit.recipe import parse_recipe

    lines = [f"base_model: {llama_family['base']}", "gate_mode: random", "dtype: float32", "experts_per_token: 2", "experts:"]
    for name in ("e0", "e1", "e2"):
        lines += [f"  - source_model: {llama_family[name]}", '    positive_prompts: ["hello"]']
    out = tmp_path_factory.mktemp("finetune") / "moe"
    build(parse_recipe("\n".join(lines) + "\n"), out, BuildOptions(device="cpu"))
    return out


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    text = ["def add(a, b): the quick brown fox 12 + 30 = 42", "Write a poem about the sea and the sky. 7 * 6 = 42"]
    return tiny_tokenizer(text, return_tensors="pt", padding=True)["input_ids"]


@pytest.fixture(scope="module")
def reference_logits(moe_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_all_expert_weights_are_4bit_after_loading(moe_dir):
    from moekit.finetune.expert_storage import NF4Storage

    model = load_for_training(moe_dir, bits=4, device_map="cpu")
    counts = count_quantized(model)
    # per layer: one 4-bit tensor per expert projection (gate_up, down) for all experts + q/k/v/o
    assert counts["params4bit"] == NUM_LAYERS * (2 + 4)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert isinstance(experts, ExpertBlock) and experts.num_experts == NUM_EXPERTS
        assert experts.storage("gate_up_proj").shape == (NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN)
        assert experts.storage("down_proj").shape == (NUM_EXPERTS, HIDDEN, INTERMEDIATE)
        for name in experts.projections:
            storage = experts.storage(name)
            assert isinstance(storage, NF4Storage) and storage.weight.dtype == torch.uint8
            assert storage.absmax.dtype == torch.uint8  # double quantization: absmax itself 8-bit
        router = layer.mlp.gate.weight
        assert type(router) is nn.Parameter and router.dtype == torch.bfloat16  # routers never quantized
    expert_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    bf16_expert_bytes = NUM_LAYERS * NUM_EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2
    assert expert_bytes == bf16_expert_bytes // 4  # two 4-bit values per byte
    assert model.config.use_cache is False


def test_bits16_model_equals_the_original(moe_dir, input_ids, reference_logits):
    model = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu")
    assert count_quantized(model)["params4bit"] == 0
    assert model.model.layers[0].mlp.experts.storage("gate_up_proj").bits == 16
    torch.testing.assert_close(logits_of(model, input_ids), reference_logits, atol=2e-5, rtol=1e-5)
    assert path_counts(model)["grouped"] > 0 and path_counts(model)["per_expert"] == 0


def _cpu_repack_settings() -> list[bool]:
    """bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 kernel at the first CPU forward (eval mode,
    no grad) on CPUs that have the instruction set; test with the repack off everywhere and on where it can run."""
    from bitsandbytes.functional import has_avx512bf16

    return [False, True] if has_avx512bf16() else [False]


@pytest.mark.parametrize("cpu_repack", _cpu_repack_settings(), ids=lambda on: "repack" if on else "no-repack")
def test_4bit_model_computes_with_its_dequantized_weights_and_stays_close(moe_dir, input_ids, reference_logits, cpu_repack):
    import bitsandbytes as bnb

    model = load_for_training(moe_dir, bits=4, device_map="cpu")
    layers = [(parent, name, child) for parent in list(model.modules()) for name, child in parent.named_children() if isinstance(child, bnb.nn.Linear4bit)]
    # dequantized before the first forward: after a repack, `weight.data` is in the CPU kernel's layout and
    # `dequantize_4bit(weight.data, quant_state)` would return another matrix
    dequantized = [bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(torch.bfloat16) for _, _, child in layers]
    for _, _, child in layers:
        child.support_avx512bf16_for_cpu = cpu_repack
    quantized = logits_of(model, input_ids)
    repacked = [getattr(child.weight.quant_state, "packing_format_for_cpu", False) for _, _, child in layers]
    assert all(repacked) if cpu_repack else not any(repacked)  # the path under test really ran
    # the same model with every 4-bit layer replaced by a bf16 nn.Linear holding its dequantized weight
    for (parent, name, child), weight in zip(layers, dequantized):
        dense = nn.Linear(child.in_features, child.out_features, bias=False, dtype=torch.bfloat16)
        dense.weight.data = weight
        setattr(parent, name, dense)
    # elementwise, but for a few logits: the repacked CPU kernel rounds differently from dequantize + matmul, and
    # a near-tie in a router's top-k then sends a token to another expert (2 of 13,752 logits seen here)
    close = torch.isclose(logits_of(model, input_ids), quantized, atol=0.05, rtol=0.02)
    assert close.float().mean() > 0.999, f"{(~close).sum()} of {close.numel()} logits differ"
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(), reference_logits.flatten(), dim=0)
    assert cosine > 0.9, f"4-bit logits far from the original (cosine {cosine:.3f})"  # tiny random weights: 0.95 here


def test_8bit_loading_is_int8(moe_dir, input_ids, reference_logits):
    model = load_for_training(moe_dir, bits=8, device_map="cpu")
    assert count_quantized(model)["int8"] == NUM_LAYERS * (2 + 4)
    cosine = torch.nn.functional.cosine_similarity(logits_of(model, input_ids).flatten(), reference_logits.flatten(), dim=0)
    assert cosine > 0.98


def test_phixtral_experts_quantized_and_16bit_exact(tiny_tokenizer):
    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM
    from moekit.testing import tiny_config

    settings = {
        k: v for k, v in tiny_config("phi", len(tiny_tokenizer)).to_dict().items() if k not in ("model_type", "architectures", "transformers_version", "dtype")
    }
    torch.manual_seed(0)
    model = PhixtralForCausalLM(PhixtralConfig(**settings, num_local_experts=3)).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    reference = logits_of(model, ids)
    import copy

    exact = quantize_moe(copy.deepcopy(model), bits=16, compute_dtype=torch.float32)
    torch.testing.assert_close(logits_of(exact, ids), reference)
    parameters = sum(p.numel() for p in model.parameters())
    quantize_moe(model, bits=4)
    assert count_quantized(model)["params4bit"] == NUM_LAYERS * (2 + 4)  # fc1/fc2 of all experts + q/k/v/dense
    assert isinstance(model.model.layers[0].mlp.experts, ExpertBlock)
    assert type(model.model.layers[0].mlp.gate) is nn.Linear
    _, table = apply_targets(model, TrainingOptions(target="experts,gate", experts="1", lora_r=2))
    assert set(table.by("expert")) == {1} and set(table.by("kind")) == {"experts", "gate"}
    assert table.total_params == parameters + table.by("kind")["experts"]  # 4-bit weights counted unpacked
    assert table.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params_per_expert(r: int) -> int:
    # PEFT's parameterisation of the fused experts: one rank-r LoRA on gate_up (H -> 2I), one on down (I -> H)
    return r * (HIDDEN + 2 * INTERMEDIATE) + r * (INTERMEDIATE + HIDDEN)


def lora_params_attention(r: int, kv_out: int = 32) -> int:
    # q (64->64), k (64->32), v (64->32), o (64->64): r*(in+out) each
    return r * ((HIDDEN + HIDDEN) + (HIDDEN + kv_out) * 2 + (HIDDEN + HIDDEN))


@pytest.mark.parametrize(
    "target, experts, layers",
    [
        ("attn", None, None),
        ("experts", None, None),
        ("experts", "0,2", None),
        ("experts,attn", None, "1"),
        ("gate", None, None),
        ("all", "1", "0"),
    ],
)
def test_trainable_table_matches_request(moe_dir, target, experts, layers):
    r = 4
    options = TrainingOptions(target=target, experts=experts, layers=layers, lora_r=r)
    model, table = apply_targets(load_for_training(moe_dir, bits=4, device_map="cpu"), options)
    chosen_layers = options.layers or list(range(NUM_LAYERS))
    chosen_experts = options.experts or list(range(NUM_EXPERTS))
    expected_kinds = {}
    if "attn" in options.target:
        expected_kinds["attn"] = lora_params_attention(r) * len(chosen_layers)
    if "experts" in options.target:
        expected_kinds["experts"] = lora_params_per_expert(r) * len(chosen_experts) * len(chosen_layers)
    if "gate" in options.target:
        expected_kinds["gate"] = NUM_EXPERTS * HIDDEN * len(chosen_layers)
    assert table.by("kind") == expected_kinds
    assert set(table.by("layer")) == set(chosen_layers)
    assert set(table.by("expert")) == (set(chosen_experts) if "experts" in options.target else set())
    # counted from the model: everything trainable is in the table, nothing else trains
    assert table.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    rendered = table.render()
    for kind in expected_kinds:
        assert kind in rendered
    assert json.loads(json.dumps(table.to_dict()))["trainable_params"] == table.trainable_params
    if "attn" in options.target:
        assert not model.peft_config["default"].target_parameters  # PEFT took the names literally


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "experts", "experts": "3"}, "expert index 3 is out of range"),
        ({"target": "attn", "layers": "2"}, "layer index 2 is out of range"),
        ({"target": "attn", "experts": "0"}, "--experts only applies"),
    ],
)
def test_bad_targets_raise(moe_dir, kwargs, message):
    model = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu")
    with pytest.raises(TargetError, match=message):
        apply_targets(model, TrainingOptions(**kwargs))


@pytest.mark.parametrize("target", ["experts", "gate"])
def test_dense_model_with_moe_targets_raises(llama_family, target):
    model = load_for_training(llama_family["base"], bits=16, compute_dtype=torch.float32, device_map="cpu")
    with pytest.raises(TargetError, match="not a mixture of experts"):
        apply_targets(model, TrainingOptions(target=target))


def test_fused_experts_are_refused(moe_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TargetError, match="not moekit's quantized expert block"):
        apply_targets(AutoModelForCausalLM.from_pretrained(moe_dir), TrainingOptions(target="experts"))


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(SourceError):
        load_for_training(tmp_path / "nothing", bits=16, device_map="cpu")


def train_steps(model, input_ids, steps: int, params=None, lr: float = 1e-2):
    model.train()
    optimizer = torch.optim.AdamW(params if params is not None else [p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def trained(moe_dir, input_ids):
    """4-bit model, LoRA on attention and experts 0 and 2 + all routers, a few optimizer steps with gradient checkpointing."""
    model = load_for_training(moe_dir, bits=4, device_map="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model, _ = apply_targets(model, TrainingOptions(target="attn,experts,gate", experts="0,2", lora_r=4))
    assert peft_model.get_base_model().is_gradient_checkpointing
    snapshot = snapshot_trainable(peft_model)
    train_steps(peft_model, input_ids, steps=3)
    return peft_model, snapshot, before


def test_training_changes_exactly_the_targets(trained):
    peft_model, snapshot, before = trained
    verify_changed(snapshot, peft_model)  # every LoRA B of experts 0/2 and every router moved
    assert any("expert 0]" in name for name in snapshot) and any("expert 2]" in name for name in snapshot)
    assert not any("expert 1]" in name for name in snapshot)
    for layer in peft_model.get_base_model().model.layers:
        assert layer.mlp.experts.adapted_experts == [0, 2]  # expert 1 has no LoRA parameters at all
        assert layer.mlp.experts.lora_B_down_proj.shape[0] == 2
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        original = before[name.replace(".base_layer", "")]
        if name.endswith("mlp.gate.weight"):
            assert not torch.equal(param, original), f"router {name} did not train"
        else:
            assert torch.equal(param, original), f"{name} changed but was not targeted"


def test_verify_changed_names_untouched_targets(moe_dir, input_ids):
    model, _ = apply_targets(load_for_training(moe_dir, bits=4, device_map="cpu"), TrainingOptions(target="experts,gate", lora_r=4))
    snapshot = snapshot_trainable(model)
    # the optimizer leaves out layer 1's down_proj adapters and layer 0's router, as a broken trainer might
    params = [
        p for name, p in model.named_parameters() if p.requires_grad and "layers.1.mlp.experts.lora_B_down" not in name and "layers.0.mlp.gate" not in name
    ]
    train_steps(model, input_ids, steps=1, params=params)
    with pytest.raises(TrainingError) as error:
        verify_changed(snapshot, model)
    message = str(error.value)
    assert "layer 0 router" in message and "layer 1 router" not in message
    assert "layer 1 expert 1 down_proj (LoRA)" in message and "layer 1 expert 2 down_proj (LoRA)" in message
    assert "layer 0 expert" not in message and "gate_up_proj" not in message


def test_routers_saved_under_checkpoint_keys_and_reloaded(trained, moe_dir, tmp_path):
    from safetensors import safe_open

    peft_model, _, _ = trained
    path = save_routers(peft_model, tmp_path / "routers.safetensors")
    index = json.loads((moe_dir / "model.safetensors.index.json").read_text())["weight_map"] if (moe_dir / "model.safetensors.index.json").exists() else None
    with safe_open(str(path), "pt") as saved:
        keys = set(saved.keys())
    assert keys == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(NUM_LAYERS)}
    if index is not None:
        assert keys <= set(index)
    fresh = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu")
    load_routers(fresh, path)
    trained_router = peft_model.get_base_model().model.layers[1].mlp.gate.weight
    assert torch.equal(fresh.model.layers[1].mlp.gate.weight, trained_router.float())
    dense = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu")
    dense.model.layers = dense.model.layers[:1]
    with pytest.raises(TargetError, match="does not match"):
        load_routers(dense, path)


def run_stock_peft(moe, adapter, input_ids, tmp_path, *extra) -> tuple[torch.Tensor, dict]:
    """(logits, report) of tests/stock_peft.py: stock transformers + PEFT in a process that never imports moekit."""
    import subprocess
    import sys
    from pathlib import Path

    torch.save(input_ids, tmp_path / "ids.pt")
    script = Path(__file__).with_name("stock_peft.py")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(moe), str(adapter), str(tmp_path / "ids.pt"), str(tmp_path / "stock.pt"), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["moekit_imported"] is False
    return torch.load(tmp_path / "stock.pt"), report


def test_adapter_is_peft_format_and_loads_with_stock_peft(trained, moe_dir, tmp_path, input_ids):
    """In a process that never imports moekit, stock transformers + PEFT give moekit's fine-tuned logits."""
    from safetensors.torch import load_file

    from moekit.finetune.adapter import load_adapter, save_adapter
    from moekit.finetune.trainer import _router_modules

    peft_model, _, _ = trained
    save_adapter(peft_model, tmp_path / "adapter", routers=_router_modules(peft_model))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(NUM_LAYERS) for p in ("gate_up_proj", "down_proj"))
    assert sorted(config["modules_to_save"]) == [f"model.layers.{i}.mlp.gate" for i in range(NUM_LAYERS)]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    gate_up_b = saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]  # (2I, r * E): expert e at [:, e::E]
    assert gate_up_b.shape == (2 * INTERMEDIATE, 4 * NUM_EXPERTS)
    assert torch.count_nonzero(gate_up_b[:, 1::NUM_EXPERTS]) == 0 and torch.count_nonzero(gate_up_b[:, 0::NUM_EXPERTS]) > 0  # --experts 0,2

    stock, report = run_stock_peft(moe_dir, tmp_path / "adapter", input_ids, tmp_path)
    # attention q/k/v/o + both fused expert parameters (two nested wrappers), per layer: nothing dropped
    assert len(report["adapted"]) == NUM_LAYERS * (4 + 2) and report["tensors"] == len(saved)

    ours, counts = load_adapter(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"), tmp_path / "adapter")
    assert counts == {"lora_modules": 4 * NUM_LAYERS, "expert_blocks": NUM_LAYERS, "routers": NUM_LAYERS, "tensors": len(saved)}
    torch.testing.assert_close(stock, logits_of(ours, input_ids), atol=1e-4, rtol=1e-4)
    base_logits = logits_of(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"), input_ids)
    assert not torch.allclose(stock, base_logits, atol=1e-3)  # the adapter is active


def test_adapter_names_that_match_nothing_are_refused(trained, moe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from moekit.finetune.adapter import load_adapter, save_adapter

    peft_model, _, _ = trained
    save_adapter(peft_model, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.experts.7.w_misc.lora_A.weight"] = torch.zeros(4, HIDDEN)
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    model = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu")
    with pytest.raises(TargetError, match="1 adapter tensor\\(s\\) match no module"):
        load_adapter(model, tmp_path / "adapter")


def test_legacy_adapter_loads_exactly(moe_dir, tmp_path):
    """An adapter of moekit <= 01160b1 (per-expert w_gate/w_up/w_down LoRA) gives the same merged weights."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from moekit.finetune.adapter import convert_legacy_adapter, load_adapter

    r, alpha = 2, 4
    torch.manual_seed(0)
    tensors, targets = {}, []
    shapes = {"w_gate": (HIDDEN, INTERMEDIATE), "w_up": (HIDDEN, INTERMEDIATE), "w_down": (INTERMEDIATE, HIDDEN)}
    for expert in (0, 2):
        for projection, (inputs, outputs) in shapes.items():
            module = f"model.layers.1.mlp.experts.{expert}.{projection}"
            targets.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inputs)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(outputs, r)
    targets.append("model.layers.0.self_attn.q_proj")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(r, HIDDEN)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(HIDDEN, r)
    legacy = tmp_path / "legacy"
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(str(legacy))
    save_file(tensors, str(legacy / "adapter_model.safetensors"))

    model, _ = load_adapter(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"), legacy)
    block = model.get_base_model().model.layers[1].mlp.experts
    base = load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu").model.layers[1].mlp.experts
    merged, original = block.dequantized("gate_up_proj", merge_lora=True), base.dequantized("gate_up_proj")
    scaling = alpha / r

    def delta(expert, projection):
        prefix = f"base_model.model.model.layers.1.mlp.experts.{expert}.{projection}"
        return scaling * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]

    for expert in (0, 2):
        torch.testing.assert_close(merged[expert, :INTERMEDIATE], original[expert, :INTERMEDIATE] + delta(expert, "w_gate"))
        torch.testing.assert_close(merged[expert, INTERMEDIATE:], original[expert, INTERMEDIATE:] + delta(expert, "w_up"))
        torch.testing.assert_close(block.dequantized("down_proj", merge_lora=True)[expert], base.dequantized("down_proj")[expert] + delta(expert, "w_down"))
    assert torch.equal(merged[1], original[1])
    # and one command writes it in the current format, which loads the same
    converted = convert_legacy_adapter(legacy, tmp_path / "converted", num_experts=NUM_EXPERTS)
    again, _ = load_adapter(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"), converted)
    torch.testing.assert_close(again.get_base_model().model.layers[1].mlp.experts.dequantized("gate_up_proj", merge_lora=True), merged)


@pytest.mark.parametrize("bits", [16, 4])
def test_grouped_experts_equal_the_expert_by_expert_path(moe_dir, input_ids, bits):
    """The whole model: grouped expert blocks (LoRA included) give the logits and gradients of the per-expert path."""
    compute_dtype = torch.float32 if bits == 16 else torch.bfloat16
    model, _ = apply_targets(
        load_for_training(moe_dir, bits=bits, compute_dtype=compute_dtype, device_map="cpu"),
        TrainingOptions(target="attn,experts,gate", lora_r=8),
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.1)  # B starts at zero: make the adapters matter
    model.train()
    blocks = [module for module in model.modules() if isinstance(module, ExpertBlock)]
    results = {}
    for grouped in (True, False):
        for block in blocks:
            block.grouped = grouped
            block.path_counts.clear()
        model.zero_grad()
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        assert path_counts(model) == (
            {"grouped": 2 * NUM_LAYERS, "per_expert": 0} if grouped else {"grouped": 0, "per_expert": 2 * NUM_LAYERS}
        )  # checkpointing recomputes
        results[grouped] = output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    tol = {"atol": 1e-5, "rtol": 1e-4} if bits == 16 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(results[True][0], results[False][0], **tol)
    for name, grad in results[False][1].items():
        scale = grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(results[True][1][name] / scale, grad / scale, **tol, msg=f"gradient of {name}")


def test_tied_embeddings_stay_tied(tiny_tokenizer):
    from transformers import MixtralForCausalLM

    from moekit.testing import tiny_config

    model = MixtralForCausalLM(tiny_config("mixtral", len(tiny_tokenizer), tie_word_embeddings=True))
    quantize_moe(model, bits=4)  # fp32 -> bf16 converts every unquantized parameter
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_layer_and_expert_subsets_survive_stock_peft(moe_dir, tmp_path, input_ids):
    """--layers 1 --experts 1: PEFT's format names only layer 1's fused experts, expert 1's slices alone are non-zero,
    and stock PEFT (no moekit in the process) computes what moekit's loader computes."""
    from moekit.finetune.adapter import load_adapter, save_adapter

    model, _ = apply_targets(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"),
                             TrainingOptions(target="experts", experts="1", layers="1", lora_r=4))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert not config["target_modules"] and not config["modules_to_save"]
    stock, report = run_stock_peft(moe_dir, tmp_path / "adapter", input_ids, tmp_path)
    assert len(report["adapted"]) == 2  # the two nested wrappers of layer 1's experts
    ours, counts = load_adapter(load_for_training(moe_dir, bits=16, compute_dtype=torch.float32, device_map="cpu"), tmp_path / "adapter")
    assert counts["expert_blocks"] == 1 and counts["lora_modules"] == 0
    block = ours.model.layers[1].mlp.experts
    lora_b = block.lora_factors("down_proj")[1]
    assert [int(torch.count_nonzero(lora_b[e])) > 0 for e in range(NUM_EXPERTS)] == [False, True, False]
    torch.testing.assert_close(stock, logits_of(ours, input_ids), atol=1e-4, rtol=1e-4)
