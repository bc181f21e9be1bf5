"""The zoo: deterministic, cached by a key that follows its settings, `zoo:NAME` resolution and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.errors import SourceError
from moekit.zoo import (
    MODEL_NAMES,
    ZooSettings,
    ensure_zoo,
    register,
    resolve,
    use_zoo,
    zoo_directory,
)
from moekit.zoo.corpora import DOMAINS, load_domains
from moekit.zoo.settings import PRESETS

# A zoo small enough to make twice in a test: one layer, a few steps.
MICRO = ZooSettings(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32, batch_size=4, base_steps=3, expert_steps=2, heldout_blocks=2
)


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    return ensure_zoo(MICRO, tmp_path_factory.mktemp("zoo-cache"))


def test_corpora_are_deterministic_and_held_out_and_validation_documents_are_not_trained_on():
    first, second = load_domains(seed=3), load_domains(seed=3)
    assert set(first) == set(DOMAINS)
    for name in DOMAINS:
        assert first[name] == second[name]
        train, validation, heldout = set(first[name].train), set(first[name].validation), set(first[name].heldout)
        assert train and validation and heldout
        assert not heldout & train and not validation & train and not validation & heldout, name
    assert load_domains(seed=4)["math"].train != first["math"].train


def test_zoo_has_every_model_data_split_and_summary(micro_zoo):
    for name in MODEL_NAMES:
        assert (micro_zoo.model(name) / "config.json").is_file()
        assert (micro_zoo.model(name) / "tokenizer.json").is_file()
    for domain in DOMAINS:
        for split in (micro_zoo.heldout(domain), micro_zoo.validation(domain)):
            rows = [json.loads(line) for line in split.read_text().splitlines()]
            assert len(rows) == MICRO.heldout_blocks and all(row["text"] for row in rows)
        assert not set(micro_zoo.heldout(domain).read_text().splitlines()) & set(micro_zoo.validation(domain).read_text().splitlines())
    summary = micro_zoo.summary
    assert set(summary["perplexity"]) == set(MODEL_NAMES)


def test_experts_differ_from_the_base_only_in_their_mlps(micro_zoo):
    from safetensors.torch import load_file

    base = load_file(micro_zoo.model("base") / "model.safetensors")
    for domain in DOMAINS:
        expert = load_file(micro_zoo.model(domain) / "model.safetensors")
        assert expert.keys() == base.keys()
        changed = {name for name in base if not (base[name] == expert[name]).all()}
        assert changed and all(".mlp." in name for name in changed), sorted(changed)


def test_second_ensure_is_a_cache_hit(micro_zoo):
    stamp = (micro_zoo.directory / "zoo.json").stat().st_mtime_ns
    again = ensure_zoo(MICRO, micro_zoo.directory.parent.parent)
    assert again.directory == micro_zoo.directory
    assert (again.directory / "zoo.json").stat().st_mtime_ns == stamp


def test_making_the_zoo_again_gives_identical_weights(micro_zoo, tmp_path):
    remade = ensure_zoo(MICRO, tmp_path)
    assert remade.directory.name == micro_zoo.directory.name
    for name in MODEL_NAMES:
        assert (remade.model(name) / "model.safetensors").read_bytes() == (micro_zoo.model(name) / "model.safetensors").read_bytes(), name
    assert remade.heldout("code").read_bytes() == micro_zoo.heldout("code").read_bytes()


def test_key_changes_with_settings_and_version(tmp_path, monkeypatch):
    import moekit.zoo

    key = zoo_directory(MICRO, tmp_path).name
    assert zoo_directory(MICRO.model_copy(update={"expert_steps": 3}), tmp_path).name != key
    assert zoo_directory(MICRO.model_copy(update={"seed": 1}), tmp_path).name != key
    assert zoo_directory(PRESETS["quick"], tmp_path).name != zoo_directory(PRESETS["standard"], tmp_path).name
    monkeypatch.setattr(moekit.zoo, "ZOO_VERSION", moekit.zoo.ZOO_VERSION + 1)
    assert zoo_directory(MICRO, tmp_path).name != key


def test_cache_location_follows_moekit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    assert zoo_directory(MICRO).parent == tmp_path / "zoo"


def test_zoo_refs_resolve_through_build_sources(micro_zoo):
    from moekit.build.sources import resolve_model

    with use_zoo(MICRO, micro_zoo.directory.parent.parent):
        assert resolve_model("zoo:math") == micro_zoo.model("math")
        assert resolve("base") == micro_zoo.model("base")


def test_unknown_zoo_model_is_a_clear_error_with_did_you_mean():
    from moekit.build.sources import resolve_model

    register()
    with pytest.raises(SourceError, match=r"'zoo:jsn' is not a zoo model \(did you mean 'json'\?\)"):
        resolve_model("zoo:jsn")
    with pytest.raises(SourceError, match="the zoo has base, code, prose, math, json"):
        resolve("unknown")


def test_zoo_refs_resolve_only_after_the_zoo_registers():
    """The build's sources do not import the zoo; importing it registers nothing; before `moekit.zoo.register()`
    a `zoo:` reference is one error that names that call."""
    code = (
        "import sys\nfrom moekit.build.sources import resolve_model\nfrom moekit.errors import SourceError\n"
        "def error(ref):\n    try:\n        resolve_model(ref)\n    except SourceError as err:\n        return err\n"
        "    raise AssertionError(f'{ref} resolved')\n"
        "assert 'moekit.zoo' not in sys.modules, 'moekit.build.sources imported the zoo'\n"
        "import moekit.zoo\n"
        "err = error('zoo:jsn')\n"
        "assert \"nothing resolves 'zoo:' references\" in err.message and 'moekit.zoo.register()' in err.hint, err\n"
        "moekit.zoo.register()\n"
        "assert 'is not a zoo model' in error('zoo:jsn').message\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_unknown_zoo_model_in_a_recipe_fails_the_cli_with_one_message(tmp_path, capsys):
    from moekit.cli import main

    recipe = tmp_path / "r.yaml"
    # The unknown name comes first, so no zoo is made before the error.
    recipe.write_text("base_model: zoo:bsae\ngate_mode: random\nexperts:\n  - source_model: zoo:code\n  - source_model: zoo:math\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(recipe), "-o", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "'zoo:bsae' is not a zoo model (did you mean 'base'?)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
