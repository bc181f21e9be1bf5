"""Model cards written by `moekit build` and `moekit publish`: Hub metadata, body, licenses, adapters, eval results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import (
    eval_results_to_model_index,
    model_index_to_eval_results,
)

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.errors import PublishError
from moekit.publish import model_card, validate_card, write_model_card
from moekit.recipe import parse_recipe

HUB_SOURCES = {  # repo id -> (tiny model in llama_family, license in its card)
    "acme/tiny-base": ("base", "apache-2.0"),
    "acme/tiny-code": ("e0", "apache-2.0"),
    "acme/tiny-story": ("e1", "apache-2.0"),
    "other/tiny-poem": ("e2", "mit"),
}


def hub_recipe(base: str, experts: list[str], extra: str = "") -> str:
    lines = [f"base_model: {base}", "gate_mode: hidden", "dtype: float32", "experts_per_token: 1", "experts:"]
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: [{json.dumps(['def add(a, b)', 'once upon a time', '7 * 6 = 42'][index % 3])}]"]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, llama_family):
    """A Hugging Face cache holding the tiny models under Hub ids, each with a licensed model card."""
    import huggingface_hub.constants

    from moekit.testing import populate_hub_cache

    cache = tmp_path_factory.mktemp("hub-cache")
    for repo_id, (name, license_) in HUB_SOURCES.items():
        snapshot = populate_hub_cache(cache, repo_id, llama_family[name])
        (snapshot / "README.md").write_text(f"---\nlicense: {license_}\n---\n# {repo_id}\n")
    saved = huggingface_hub.constants.HF_HUB_CACHE
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)  # where snapshot_download looks when given no cache_dir
    yield cache
    huggingface_hub.constants.HF_HUB_CACHE = saved


@pytest.fixture(scope="module")
def hub_build(hub_cache, tmp_path_factory) -> Path:
    """A build from Hub-id sources that agree on apache-2.0 (one expert pinned to a revision)."""
    out = tmp_path_factory.mktemp("hub-build") / "tiny-moe"
    text = hub_recipe("acme/tiny-base", ["acme/tiny-code@main", "acme/tiny-story"])
    build(parse_recipe(text), out, BuildOptions(device="cpu"), recipe_text=text)
    return out


@pytest.fixture(scope="module")
def conflicting_build(hub_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conflict") / "moe"
    text = hub_recipe("acme/tiny-base", ["acme/tiny-code", "other/tiny-poem"])
    build(parse_recipe(text), out, BuildOptions(device="cpu"), recipe_text=text)
    return out


def test_build_card_metadata_links_sources_and_validates(hub_build):
    metadata = metadata_load(hub_build / "README.md")
    assert metadata["base_model"] == ["acme/tiny-base", "acme/tiny-code", "acme/tiny-story"]  # revision stripped, Hub ids only
    assert metadata["base_model_relation"] == "merge"
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"moe", "merge", "moekit", "mergekit"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"  # the sources agree
    card = ModelCard.load(hub_build / "README.md")
    validate_card(card)  # huggingface_hub re-parses the header into the same ModelCardData
    assert card.data.to_dict() == metadata


def test_build_card_body(hub_build):
    text = (hub_build / "README.md").read_text()
    moekit_json = json.loads((hub_build / "moekit.json").read_text())
    assert "# tiny-moe" in text  # named after OUT, not the temporary directory the build wrote into
    assert "[`acme/tiny-code@main`](https://huggingface.co/acme/tiny-code/tree/main), license apache-2.0" in text
    assert '(positive prompts: "def add(a, b)")' in text
    assert "| Gate mode | `hidden` |" in text and "| Experts | 2 |" in text and "| Experts per token | 1 |" in text
    assert f"({moekit_json['parameters']['total']:,})" in text and f"({moekit_json['parameters']['active']:,})" in text
    assert (hub_build / "moekit-recipe.yaml").read_text().strip() in text  # the recipe as written
    assert "![routing](routing/routing.png)" in text and (hub_build / "routing" / "routing.png").is_file()
    assert 'from_pretrained("tiny-moe", dtype="auto")' in text and "trust_remote_code" not in text


def test_disagreeing_licenses_build_with_other_and_a_visible_note(conflicting_build):
    metadata = metadata_load(conflicting_build / "README.md")
    assert metadata["license"] == "other"
    text = (conflicting_build / "README.md").read_text()
    assert "License not decided" in text and "`other/tiny-poem`: mit" in text and "--license" in text
    chosen = model_card(conflicting_build, license="apache-2.0")
    assert chosen.data.license == "apache-2.0" and "License not decided" not in str(chosen)


def test_recipe_license_settles_a_disagreement(conflicting_build, tmp_path):
    model_dir = tmp_path / "moe"
    shutil.copytree(conflicting_build, model_dir)
    recipe = model_dir / "moekit-recipe.yaml"
    recipe.write_text(recipe.read_text() + "moekit:\n  license: mit\n")  # the recipe key a build reads
    write_model_card(model_dir)
    assert metadata_load(model_dir / "README.md")["license"] == "mit"
    assert "License not decided" not in (model_dir / "README.md").read_text()


def test_local_sources_are_named_in_the_body_but_not_in_base_model(llama_family, tmp_path):
    text = hub_recipe(str(llama_family["base"]), [str(llama_family["e0"]), str(llama_family["e1"])])
    build(parse_recipe(text), tmp_path / "local", BuildOptions(device="cpu"), recipe_text=text)
    metadata = metadata_load(tmp_path / "local" / "README.md")
    assert "base_model" not in metadata  # the Hub rejects local paths there
    assert "license" not in metadata
    body = (tmp_path / "local" / "README.md").read_text()
    assert f"`{llama_family['e1']}`" in body and "state no license" in body


def test_eval_report_becomes_model_index_table_and_charts(hub_build, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = tmp_path / "moe"
    shutil.copytree(hub_build, model_dir)
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    report = {
        "models": [
            {
                "name": "tiny-moe",
                "path": str(model_dir),
                "role": "moe",
                "metrics": {"code": {"perplexity": 12.3456, "loss": 2.5133, "tokens": 900}, "prose": {"perplexity": 20.5, "loss": 3.02, "tokens": 800}},
            },
            {
                "name": "acme/tiny-code",
                "path": "x",
                "role": "source",
                "metrics": {"code": {"perplexity": 11.0, "loss": 2.4, "tokens": 900}, "prose": {"perplexity": 31.0, "loss": 3.4, "tokens": 800}},
            },
        ],
        "routing": {},
    }
    (report_dir / "report.json").write_text(json.dumps(report))
    plt.figure(figsize=(2, 2))
    plt.plot([1, 2])
    plt.savefig(report_dir / "perplexity.png")
    plt.close()

    card = write_model_card(model_dir, report=report_dir / "report.json", repo_id="me/tiny-moe")
    assert (model_dir / "eval" / "perplexity.png").is_file() and (model_dir / "eval" / "report.json").is_file()
    name, results = model_index_to_eval_results(metadata_load(model_dir / "README.md")["model-index"])
    assert name == "me/tiny-moe"
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in results}
    assert values == {("code", "perplexity"): 12.3456, ("code", "loss"): 2.5133, ("prose", "perplexity"): 20.5, ("prose", "loss"): 3.02}
    assert eval_results_to_model_index(name, results) == card.data.to_dict()["model-index"]  # huggingface_hub's own round trip
    text = (model_dir / "README.md").read_text()
    assert "| tiny-moe | moe | 12.346 | 20.500 |" in text and "| acme/tiny-code | source | 11.000 | 31.000 |" in text
    assert "![perplexity](eval/perplexity.png)" in text
    validate_card(card)
    # the report now inside the folder is found by default the next time the card is written
    assert "model-index" in model_card(model_dir).data.to_dict()


def test_adapter_card_states_its_base_and_training(hub_build, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    finetune_dir = tmp_path / "ft"
    model = AutoModelForCausalLM.from_pretrained(hub_build, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(finetune_dir / "adapter")
    (finetune_dir / "moekit-finetune.json").write_text(
        json.dumps(
            {
                "kind": "finetune",
                "base_model": str(hub_build),
                "base_model_path": str(hub_build),
                "datasets": ["acme/chat-data", "data/train.jsonl"],
                "options": {"learning_rate": 0.0002, "lora_r": 2, "target": ["attention", "gate"], "bits": 4},
                "losses": {"first": 3.25, "last": 1.5},
            }
        )
    )
    card = model_card(finetune_dir, base_model="me/tiny-moe")
    data = card.data.to_dict()
    assert data["base_model"] == ["me/tiny-moe"] and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and data["datasets"] == ["acme/chat-data"]  # local files are not Hub datasets
    assert data["license"] == "apache-2.0"  # inherited from the MoE it was trained on
    text = str(card)
    assert "| learning_rate | 0.0002 |" in text and "| target | attention, gate |" in text
    assert "3.2500 at the first step, 1.5000 at the last" in text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-moe", dtype="auto")' in text
    assert 'PeftModel.from_pretrained(base, "ft", subfolder="adapter")' in text
    assert "| Experts | 2 |" in text  # architecture read from the base MoE's moekit.json
    validate_card(card)
    # without a Hub id for the base, the local path stays out of the metadata
    assert "base_model" not in model_card(finetune_dir).data.to_dict()


def test_phixtral_usage_needs_remote_code(tmp_path, tiny_tokenizer):
    from moekit.testing import make_dense_checkpoint

    base = make_dense_checkpoint(tmp_path / "phi", "phi", tokenizer=tiny_tokenizer)
    expert = make_dense_checkpoint(tmp_path / "phi-e", base=base, seed=3, mlp_noise=0.5)
    text = hub_recipe(str(base), [str(base), str(expert)])
    build(parse_recipe(text), tmp_path / "phixtral", BuildOptions(device="cpu"), recipe_text=text)
    card = (tmp_path / "phixtral" / "README.md").read_text()
    assert 'from_pretrained("phixtral", dtype="auto", trust_remote_code=True)' in card
    assert "| Architecture | Phixtral |" in card


def test_validate_card_rejects_broken_metadata():
    broken = ModelCard("---\nbase_model:\n- /home/me/model\n---\n# x\n")
    with pytest.raises(PublishError, match="not Hub ids"):
        validate_card(broken)
    with pytest.raises(PublishError, match="base_model_relation"):
        validate_card(ModelCard("---\nbase_model_relation: blend\n---\n# x\n"))


def test_a_card_shows_its_own_models_rows_and_marks_sets_overlapping_training(hub_build, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    finetune_dir = tmp_path / "ft"
    model = AutoModelForCausalLM.from_pretrained(hub_build, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(finetune_dir / "adapter")
    (finetune_dir / "moekit-finetune.json").write_text(
        json.dumps({"kind": "finetune", "base_model": str(hub_build), "base_model_path": str(hub_build), "datasets": ["train.jsonl"]})
    )
    metrics = lambda chat, held: {"chat": {"perplexity": chat, "loss": 1.0}, "held": {"perplexity": held, "loss": 1.0}}  # noqa: E731
    report = {
        "model": {"name": "tiny-moe"},
        "routing": {"model": "tiny-moe"},
        "models": [
            {"name": "tiny-moe", "path": str(hub_build), "role": "moe", "metrics": metrics(10.0, 11.0)},
            {"name": "tiny-moe+ft", "path": str(finetune_dir), "adapter": str(finetune_dir), "role": "moe", "metrics": metrics(5.0, 10.5)},
            {"name": "acme/tiny-code", "path": "x", "role": "source", "metrics": metrics(12.0, 12.5)},
        ],
        "data": {
            "chat": {"source": "train.jsonl", "overlaps_training": {"model": "tiny-moe+ft", "training_data": "train.jsonl", "documents": 8, "of": 8}},
            "held": {"source": "held.jsonl"},
        },
    }

    build_card = model_card(hub_build, report=report)
    text = str(build_card)
    assert "| tiny-moe | moe | 10.000 | 11.000 |" in text and "| acme/tiny-code | source | 12.000 | 12.500 |" in text
    assert "tiny-moe+ft" not in text and "‡" not in text  # the fine-tune's row and its training-data mark are not this model's
    _, results = model_index_to_eval_results(build_card.data.to_dict()["model-index"])
    assert {(r.dataset_name, r.metric_type): r.metric_value for r in results if r.metric_type == "perplexity"} == {
        ("chat", "perplexity"): 10.0,
        ("held", "perplexity"): 11.0,
    }

    text = str(model_card(finetune_dir, report=report, base_model="me/tiny-moe"))
    assert "| tiny-moe+ft | moe | 5.000 | 10.500 |" in text
    assert "| tiny-moe | moe before fine-tuning | 10.000 | 11.000 |" in text
    assert "| chat perplexity ‡ | held perplexity |" in text and "not held out: `chat` shares 8 of its 8 documents" in text
