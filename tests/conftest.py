"""Shared fixtures: tiny local checkpoints made once per test session (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_configure(config):
    # Tiny models run many times faster on one intra-op thread than on two here (OpenMP
    # synchronisation dominates), and pytest-xdist already runs one worker per core.
    import torch

    from moekit.models import register_phixtral

    torch.set_num_threads(1)
    # tests load moekit's Phixtral through the Auto classes, as a user does after this call
    register_phixtral()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with one reason, where there is no CUDA GPU; `python -m pytest -m gpu tests` runs them."""
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (the GPU lane: python -m pytest -m gpu tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from moekit.testing import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it (MLPs perturbed): {'base', 'e0', 'e1', 'e2'}."""
    from moekit.testing import make_dense_checkpoint

    root = tmp_path_factory.mktemp("llama")
    base = make_dense_checkpoint(root / "base", "llama", seed=0, tokenizer=tiny_tokenizer)
    models = {"base": base}
    for i in range(3):
        models[f"e{i}"] = make_dense_checkpoint(root / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5)
    return models


@pytest.fixture(scope="session")
def random_moe(tmp_path_factory, llama_family) -> Path:
    """A Mixtral of `llama_family`'s three fine-tunes with random routers, built once (tests only read it)."""
    from test_build import recipe_text

    from moekit.build.options import BuildOptions
    from moekit.build.pipeline import build
    from moekit.recipe import parse_recipe

    out = tmp_path_factory.mktemp("random_moe") / "moe"
    build(parse_recipe(recipe_text(llama_family, "random")), out, BuildOptions(device="cpu"))
    return out


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    from moekit.testing import make_dense_checkpoint

    root = tmp_path_factory.mktemp("mistral")
    base = make_dense_checkpoint(root / "base", "mistral", seed=10, tokenizer=tiny_tokenizer)
    return {"base": base, "e0": make_dense_checkpoint(root / "e0", base=base, seed=11, mlp_noise=0.5)}
