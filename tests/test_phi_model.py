"""moekit's Phixtral model code: exactness against Phi-2, routing, training hooks, loading with and without moekit."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.models import PHIXTRAL_AUTO_MAP, PHIXTRAL_CODE_DIR, PHIXTRAL_CODE_FILES, write_phixtral_code
from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM, PhixtralSparseMoeBlock

REPO = Path(__file__).resolve().parents[1]


def phixtral_from_phi(phi, experts: list, top_k: int = 2, seed: int = 0) -> PhixtralForCausalLM:
    """A Phixtral whose attention/norms are `phi`'s and whose expert E is the MLP of `experts[E]`; random routers."""
    settings = {k: v for k, v in phi.config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version", "dtype")}
    config = PhixtralConfig(**settings, num_local_experts=len(experts), num_experts_per_tok=top_k)
    model = PhixtralForCausalLM(config).eval()
    state = {name: tensor for name, tensor in phi.state_dict().items() if ".mlp." not in name}
    generator = torch.Generator().manual_seed(seed)
    for layer in range(config.num_hidden_layers):
        state[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(len(experts), config.hidden_size, generator=generator)
        for index, expert in enumerate(experts):
            for name, tensor in expert.model.layers[layer].mlp.state_dict().items():
                state[f"model.layers.{layer}.mlp.experts.{index}.{name}"] = tensor
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def phi_models(tiny_tokenizer):
    """A tiny Phi-2 (partial rotary 0.5, biases, GELU fc1/fc2) and two variants with different MLPs."""
    from transformers import AutoModelForCausalLM

    from moekit.testing import tiny_config

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("phi", len(tiny_tokenizer)), dtype=torch.float32).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.08)
        models.append(model)
    return models


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    return tiny_tokenizer(["def add(a, b): the quick brown fox 12 + 30", "Write a poem about the sea and"], return_tensors="pt", padding=True)["input_ids"]


@pytest.fixture(scope="module")
def phixtral_dir(phi_models, tiny_tokenizer, tmp_path_factory) -> Path:
    """A saved Phixtral of three different experts, with its code files and auto_map, as a build writes it."""
    base, *others = phi_models
    model = phixtral_from_phi(base, [base, *others])
    model.config.auto_map = dict(PHIXTRAL_AUTO_MAP)
    out = tmp_path_factory.mktemp("phixtral") / "model"
    model.save_pretrained(out)
    write_phixtral_code(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def test_identical_experts_reproduce_phi2_logits_and_generation(phi_models, input_ids):
    base = phi_models[0]
    moe = phixtral_from_phi(base, [base, base, base])
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids).logits, base(input_ids).logits, atol=1e-5, rtol=1e-5)
    prompt = input_ids[:1, :6]
    expected = base.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    for use_cache in (True, False):
        generated = moe.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, use_cache=use_cache)
        assert torch.equal(generated, expected), f"use_cache={use_cache}"


@pytest.mark.parametrize("chosen", [0, 2])
def test_forced_top1_routing_gives_that_experts_mlp(phi_models, chosen):
    base, *others = phi_models
    experts = [base, *others]
    block: PhixtralSparseMoeBlock = phixtral_from_phi(base, experts, top_k=1).model.layers[1].mlp
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
    with torch.no_grad():
        # every token has a positive component along `direction`, so the chosen row always wins
        block.gate.weight.copy_(-direction.expand(3, 64))
        block.gate.weight[chosen] = direction
        hidden = torch.randn(2, 5, 64) * 0.1 + direction
        output, router_logits = block(hidden)
        assert (router_logits.argmax(dim=-1) == chosen).all()
        torch.testing.assert_close(output, experts[chosen].model.layers[1].mlp(hidden), atol=1e-6, rtol=1e-6)


def test_router_logits_aux_loss_and_gradient_checkpointing(phi_models, input_ids):
    base, *others = phi_models
    moe = phixtral_from_phi(base, [base, *others])
    out = moe(input_ids, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (input_ids.numel(), 3)
    plain = moe(input_ids, labels=input_ids).loss
    torch.testing.assert_close(out.loss, plain + moe.config.router_aux_loss_coef * out.aux_loss)

    def gate_gradients(checkpointing: bool) -> torch.Tensor:
        moe.zero_grad()
        if checkpointing:
            moe.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            moe.gradient_checkpointing_disable()
        moe.train()
        moe(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
        return torch.stack([layer.mlp.gate.weight.grad.clone() for layer in moe.model.layers])

    without = gate_gradients(False)
    with_checkpointing = gate_gradients(True)
    assert moe.model.layers[0].gradient_checkpointing
    assert without.abs().sum() > 0  # the aux loss and the LM loss both reach the routers
    torch.testing.assert_close(with_checkpointing, without, atol=1e-6, rtol=1e-5)


def test_model_files_import_only_torch_and_transformers():
    for name in PHIXTRAL_CODE_FILES:
        tree = ast.parse((PHIXTRAL_CODE_DIR / name).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {"torch", "transformers"}, f"{name} imports {roots}"


LOAD_AND_SAVE_LOGITS = """
import sys, torch
{prelude}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32{kwargs})
ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
torch.save({{"logits": logits, "generated": generated, "module": type(model).__module__}}, sys.argv[2])
"""


def run_python(code: str, *args, isolated: bool = False) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, *(["-I"] if isolated else []), "-c", code, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=args[0] if isolated else REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def test_loads_with_remote_code_where_moekit_is_missing(phixtral_dir, tmp_path):
    """trust_remote_code=True in an isolated process where `import moekit` fails, vs moekit's registered classes."""
    remote, registered = tmp_path / "remote.pt", tmp_path / "registered.pt"
    # -I drops the repo and user site from sys.path; sys.modules['moekit'] = None makes `import moekit` fail anyway
    prelude = "sys.modules['moekit'] = None\ntry:\n    import moekit\n    raise SystemExit('moekit importable')\nexcept ImportError:\n    pass"
    run_python(LOAD_AND_SAVE_LOGITS.format(prelude=prelude, kwargs=", trust_remote_code=True"), phixtral_dir, remote, isolated=True)
    run_python(LOAD_AND_SAVE_LOGITS.format(prelude="import moekit\nmoekit.register_phixtral()", kwargs=""), phixtral_dir, registered)
    remote, registered = torch.load(remote), torch.load(registered)
    assert remote["module"].startswith("transformers_modules.")
    assert registered["module"] == "moekit.models.phixtral.modeling_phixtral"
    torch.testing.assert_close(remote["logits"], registered["logits"], atol=0, rtol=0)
    assert torch.equal(remote["generated"], registered["generated"])


def test_moekit_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\nfrom moekit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    run_python(code)


def test_import_moekit_changes_nothing_until_register_phixtral(phixtral_dir):
    """`import moekit` leaves the import system and transformers alone; `register_phixtral()` (idempotent) then
    makes the Auto classes load moekit's Phixtral without trust_remote_code."""
    code = (
        "import sys\nfinders = list(sys.meta_path)\nimport moekit\n"
        "assert sys.meta_path == finders, 'import moekit changed sys.meta_path'\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "try:\n    AutoConfig.from_pretrained(sys.argv[1])\nexcept ValueError as err:\n    assert 'trust_remote_code' in str(err), err\n"
        "else:\n    raise AssertionError('a Phixtral config loaded before register_phixtral()')\n"
        "moekit.register_phixtral()\nmoekit.register_phixtral()\n"
        "config = AutoConfig.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert type(model).__name__ == 'PhixtralForCausalLM' and type(config).__module__.startswith('moekit.'), type(model)"
    )
    run_python(code, phixtral_dir)


def test_moekit_loaders_register_phixtral_themselves(phixtral_dir):
    """In a fresh process that never calls register_phixtral(), moekit's own paths take a Phixtral without
    trust_remote_code: the plan's config reader and the fine-tune loader."""
    code = (
        "import sys, torch\nfrom moekit.plan import estimate\nfrom moekit.finetune.loading import load_for_training\n"
        "assert estimate(sys.argv[1]).shape.model_type == 'phixtral'\n"
        "model = load_for_training(sys.argv[1], bits=16, compute_dtype=torch.float32, device_map='cpu')\n"
        "assert type(model).__name__ == 'PhixtralForCausalLM', type(model)"
    )
    run_python(code, phixtral_dir)


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_decoding_with_either_cache_argument_equals_the_full_forward(phi_models, input_ids, cache_name):
    """transformers 5.2x passes the KV cache as `cache`, earlier 5.x as `past_key_values`: both must be used."""
    from transformers.cache_utils import DynamicCache

    model = phixtral_from_phi(phi_models[0], phi_models)
    ids = input_ids[:1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], use_cache=True, **{cache_name: cache}).logits]
        for position in range(4, ids.shape[1]):
            steps.append(model(ids[:, position : position + 1], use_cache=True, **{cache_name: cache}).logits)
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
