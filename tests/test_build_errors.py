"""Bad input to `moekit build`: one clear message, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_build import recipe_text

from moekit.testing import run_cli


def assert_refused(tmp_path: Path, text: str | None, capsys, *expected: str, extra_args=(), recipe_name="r.yaml") -> str:
    recipe = tmp_path / recipe_name
    if text is not None:
        recipe.write_text(text)
    out = tmp_path / "out"
    code, output = run_cli(["build", str(recipe), "-o", str(out), *extra_args], capsys)
    assert code != 0
    assert "Traceback" not in output
    for fragment in expected:
        assert fragment in output, output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind
    return output


def test_missing_recipe(tmp_path, capsys):
    assert_refused(tmp_path, None, capsys, "does not exist", recipe_name="missing.yaml")


def test_unparseable_yaml(tmp_path, capsys):
    assert_refused(tmp_path, "base_model: [unclosed\n", capsys, "not valid YAML")


def test_unknown_key_suggests_the_right_one(tmp_path, capsys, llama_family):
    text = recipe_text(llama_family).replace("experts_per_token", "experts_per_tokens")
    assert_refused(tmp_path, text, capsys, "unknown key 'experts_per_tokens'", "did you mean 'experts_per_token'")


def test_missing_source_offline(tmp_path, capsys, llama_family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    text = recipe_text(llama_family).replace(str(llama_family["e1"]), "nobody/no-such-model")
    assert_refused(tmp_path, text, capsys, "nobody/no-such-model", "does not exist locally")


def test_mismatched_hidden_size(tmp_path, capsys, llama_family, tiny_tokenizer):
    from moekit.testing import make_dense_checkpoint

    other = make_dense_checkpoint(tmp_path / "wide", "llama", tokenizer=tiny_tokenizer, hidden_size=96)
    models = dict(llama_family, e1=other)
    assert_refused(tmp_path, recipe_text(models), capsys, "expert 1", "hidden_size=96", "hidden_size=64")


def test_mixed_architectures(tmp_path, capsys, llama_family, mistral_family):
    models = dict(llama_family, e2=mistral_family["e0"])
    assert_refused(tmp_path, recipe_text(models), capsys, "expert 2", "MistralForCausalLM", "LlamaForCausalLM")


def test_unsupported_architecture_lists_supported(tmp_path, capsys, tiny_tokenizer):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path / "qwen")
    tiny_tokenizer.save_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen2").symlink_to(tmp_path / "qwen")
    models = {"base": tmp_path / "qwen", "e0": tmp_path / "qwen", "e1": tmp_path / "qwen2", "e2": tmp_path / "qwen"}
    assert_refused(tmp_path, recipe_text(models, experts=("e0", "e1")), capsys, "Qwen2ForCausalLM", "supported input architectures", "LlamaForCausalLM")


@pytest.mark.parametrize("top_k", [0, 4])
def test_experts_per_token_out_of_range(tmp_path, capsys, llama_family, top_k):
    assert_refused(tmp_path, recipe_text(llama_family, top_k=top_k), capsys, "experts_per_token must be between 1 and the number of experts (3)")


def test_prompt_mode_needs_positive_prompts(tmp_path, capsys, llama_family):
    text = textwrap.dedent(f"""
        base_model: {llama_family["base"]}
        gate_mode: hidden
        experts:
          - source_model: {llama_family["e0"]}
            positive_prompts: ["code"]
          - source_model: {llama_family["e1"]}
    """)
    assert_refused(tmp_path, text, capsys, "expert 1", "has no positive_prompts")


def test_identical_prompts_for_all_experts(tmp_path, capsys, llama_family):
    text = recipe_text(llama_family, experts=("e0", "e1")).replace(
        json.dumps(["The quick brown fox jumps over the lazy dog.", "Write a poem about the sea.", "Once upon a time"]),
        json.dumps(["def add(a, b): return a + b", "import os\nprint(os.getcwd())", "for i in range(10): pass"]),
    )
    assert_refused(tmp_path, text, capsys, "identical prompts")


def test_same_model_for_every_expert_needs_flag(tmp_path, capsys, llama_family):
    models = dict(llama_family, e1=llama_family["e0"], e2=llama_family["e0"])
    assert_refused(tmp_path, recipe_text(models), capsys, "are the same model", "--allow-same-experts")


def test_pickle_only_checkpoint_refused(tmp_path, capsys, llama_family):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(llama_family["e1"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    models = dict(llama_family, e1=pickled)
    assert_refused(tmp_path, recipe_text(models), capsys, "pickle", "--allow-pickle")


def test_existing_output_needs_overwrite(tmp_path, capsys, llama_family):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (tmp_path / "r.yaml").write_text(recipe_text(llama_family))
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(out)], capsys)
    assert code != 0 and "--overwrite" in output and "Traceback" not in output
    assert (out / "keep.txt").read_text() == "precious"


def test_dry_run_writes_nothing(tmp_path, capsys, llama_family):
    (tmp_path / "r.yaml").write_text(recipe_text(llama_family))
    out = tmp_path / "out"
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(out), "--dry-run"], capsys)
    assert code == 0
    assert "mixtral (3 experts, top-2" in output and "each expert's MLP" in output and "active per token" in output
    assert not out.exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_write_leaves_nothing(tmp_path, capsys, llama_family, monkeypatch, failure):
    """Ctrl-C or a full disk in the middle of writing shards: OUT never appears, the staging dir is removed."""
    import builtins

    from moekit.build import writer

    calls = {"n": 0}

    class FailingFile:
        def __init__(self, *args, **kwargs):
            self.file = builtins.open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == 10:
                raise failure
            return self.file.write(data)

    monkeypatch.setattr(writer, "open", FailingFile, raising=False)
    assert_refused(
        tmp_path,
        recipe_text(llama_family, "random"),
        capsys,
        "interrupted: nothing was written; the output directory is as it was before" if failure is KeyboardInterrupt else "disk is full",
    )
    assert calls["n"] == 10
