"""`moekit demo` end to end on the quick preset: the headline facts are checked from report.json.

The demo makes its own zoo in a per-session cache (MOEKIT_CACHE), so this file exercises zoo
training, `build` (hidden and calibrated routers, with and without calibration data), `eval` and
`finetune` exactly as a user's run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.zoo.corpora import DOMAINS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, MOEKIT_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    out = root / "out"
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "demo", "--preset", "quick", "-o", str(out)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "report": report, "stdout": result.stdout, "cache": root / "cache"}


def _models(report):
    return {model["name"]: model for model in report["models"]}


def test_report_has_the_eval_schema_with_mixed_and_domain_sets(demo_run):
    report = demo_run["report"]
    sets = {"mixed", "chat", *DOMAINS}
    roles = {model["name"]: model["role"] for model in report["models"]}
    assert {"base", *DOMAINS} <= {name for name, role in roles.items() if role == "source"}
    assert sum(role == "moe" for role in roles.values()) == 4  # three router variants and the fine-tuned MoE
    for model in report["models"]:
        assert set(model["metrics"]) == sets, model["name"]
        for values in model["metrics"].values():
            assert values["perplexity"] > 1 and values["tokens"] > 0
    assert set(report["routing"]["per_set"]) == sets
    for name in ("report.md", "perplexity.png", "routing.png"):
        assert (demo_run["out"] / name).stat().st_size > 0


def test_moe_beats_every_source_on_mixed_held_out_data(demo_run):
    report = demo_run["report"]
    moe = report["models"][0]
    assert moe["role"] == "moe" and moe["name"] == f"moe-{report['demo']['chosen']}"
    sources = [m for m in report["models"] if m["role"] == "source"]
    for source in sources:
        assert moe["metrics"]["mixed"]["perplexity"] < source["metrics"]["mixed"]["perplexity"], source["name"]
    assert report["demo"]["facts"]["moe_beats_every_source_on_mixed"] is True


def test_moe_is_close_to_the_best_expert_on_each_domain(demo_run):
    from moekit.demo import PRESETS

    report = demo_run["report"]
    moe = report["models"][0]
    sources = [m for m in report["models"] if m["role"] == "source"]
    tolerance = PRESETS["quick"].close_to_expert
    for domain in DOMAINS:
        best = min(source["metrics"][domain]["perplexity"] for source in sources)
        assert moe["metrics"][domain]["perplexity"] <= (1 + tolerance) * best, domain
        # ... and better than the dense base it was built from.
        base = _models(report)["base"]["metrics"][domain]["perplexity"]
        assert moe["metrics"][domain]["perplexity"] < base, domain
    assert report["demo"]["facts"]["close_to_best_expert"] is True
    # Each expert really is the specialist of its own domain (the zoo trained them so).
    models = _models(report)
    for domain in DOMAINS:
        own = models[domain]["metrics"][domain]["perplexity"]
        assert all(own < models[other]["metrics"][domain]["perplexity"] for other in ("base", *DOMAINS) if other != domain), domain


def test_routing_sends_each_domain_mostly_to_its_expert(demo_run):
    routing = demo_run["report"]["routing"]
    for domain in DOMAINS:
        shares = routing["per_set"][domain]["share"]  # (layers, experts)
        mean = [sum(layer[e] for layer in shares) / len(shares) for e in range(len(routing["experts"]))]
        assert routing["experts"][mean.index(max(mean))] == domain, (domain, mean)


def test_router_variants_are_chosen_on_the_validation_split_only(demo_run):
    """The choice reads the validation split's figures, from evaluations that saw no test set."""
    from moekit.demo import VARIANTS

    out, demo = demo_run["out"], demo_run["report"]["demo"]
    assert set(demo["variants"]) == set(VARIANTS) and demo["selection"]["set"] == "validation"
    validation = {}
    for name in VARIANTS:
        selection_report = json.loads((out / "eval" / "validation" / name / "report.json").read_text())
        assert list(selection_report["data"]) == ["validation"]  # the only set these evaluations read
        (moe,) = selection_report["models"]  # the MoE alone: no source is compared there
        assert moe["role"] == "moe" and set(moe["metrics"]) == {"validation"}
        validation[name] = moe["metrics"]["validation"]["perplexity"]
    assert demo["chosen"] == min(validation, key=validation.get)
    assert demo["selection"]["perplexity"] == pytest.approx(validation, rel=1e-3)
    # The validation text is none of the test sets' text.
    validation_texts = {json.loads(line)["text"] for line in (out / "data" / "validation" / "validation.jsonl").read_text().splitlines()}
    for name, info in demo_run["report"]["data"].items():
        texts = [json.loads(line).get("text", "") for line in Path(info["source"]).read_text().splitlines()]
        assert not validation_texts & set(texts), name
    models = _models(demo_run["report"])
    for name, summary in demo["variants"].items():
        assert models[f"moe-{name}"]["metrics"]["mixed"]["perplexity"] == pytest.approx(summary["perplexity"]["mixed"], rel=1e-3)


def test_choice_follows_validation_where_the_test_sets_disagree():
    from moekit.demo import choose_variant

    def report(validation: float, mixed: float) -> dict:
        return {"models": [{"role": "moe", "name": "moe", "metrics": {"validation": {"perplexity": validation}, "mixed": {"perplexity": mixed}}}]}

    assert choose_variant({"hidden": report(10.0, 5.0), "calibrated": report(9.0, 6.0)}) == "calibrated"
    with pytest.raises(KeyError):  # a report without the validation set cannot be chosen on
        choose_variant({"hidden": {"models": [{"role": "moe", "name": "moe", "metrics": {"mixed": {"perplexity": 1.0}}}]}})


def test_calibration_data_variant_is_reported_with_routing_accuracy(demo_run):
    """Prompts alone vs prompts + calibration data: routing accuracy on held-out domain text and mixed perplexity,
    taken from each variant's own evaluation and printed by the command."""
    out, demo, stdout = demo_run["out"], demo_run["report"]["demo"], demo_run["stdout"]
    assert demo["variants"]["calibrated-data"]["calibration_data"]["max_tokens"] > 0
    assert demo["variants"]["calibrated"]["calibration_data"] is None
    built = json.loads((out / "moe-calibrated-data" / "moekit.json").read_text())
    assert "train.jsonl" in json.dumps(built) and "heldout.jsonl" not in json.dumps(built) and "validation.jsonl" not in json.dumps(built)
    for name, variant in demo["variants"].items():
        own = json.loads((out / "eval" / name / "report.json").read_text())["routing"]["own_expert_share"]
        accuracy = {domain: own[domain]["top1_mean"] for domain in DOMAINS}
        assert {d: variant["routing_accuracy"][d] for d in DOMAINS} == accuracy
        assert variant["routing_accuracy"]["mean"] == pytest.approx(sum(accuracy.values()) / len(accuracy), abs=1e-4)
        line = next(line for line in stdout.splitlines() if line.startswith(f"routers {name}:"))
        assert f"held-out mixed ppl {variant['perplexity']['mixed']:.2f}" in line and f"routing accuracy {variant['routing_accuracy']['mean']:.1%}" in line
    # Fitting on router inputs routes held-out text far better than mergekit's hidden-state average (chance: 25%).
    for name in ("calibrated", "calibrated-data"):
        assert demo["variants"][name]["routing_accuracy"]["mean"] > max(0.5, demo["variants"]["hidden"]["routing_accuracy"]["mean"] + 0.2), name


def test_qlora_fine_tune_ran_and_was_evaluated_with_its_adapter(demo_run):
    report = demo_run["report"]
    finetune = report["demo"]["finetune"]
    assert finetune["steps"] == 20  # the quick preset
    assert (Path(finetune["directory"]) / "adapter" / "adapter_config.json").is_file()
    tuned = [m for m in report["models"] if m.get("adapter")]
    assert len(tuned) == 1 and tuned[0]["name"] == f"moe-{report['demo']['chosen']}+finetune"
    before, after = report["models"][0]["metrics"]["chat"]["perplexity"], tuned[0]["metrics"]["chat"]["perplexity"]
    assert after < before  # it learnt the chat format of its training set, on held-out conversations


def test_recorded_paths_point_into_out_not_into_its_staging_directory(demo_run):
    """The demo is written into a staging directory and moved into place: every path it recorded is OUT's."""
    out = demo_run["out"]
    texts = {p: p.read_text(encoding="utf-8") for p in out.rglob("*") if p.suffix in (".json", ".jsonl", ".md") and p.is_file()}
    assert texts and not [p for p, text in texts.items() if "moekit-staging" in text]
    finetune = json.loads((out / "finetune" / "moekit-finetune.json").read_text())
    assert Path(finetune["base_model_path"]).is_dir() and Path(finetune["base_model_path"]).parent == out.resolve()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no staging or lock left


def test_fine_tuned_moe_has_one_name_and_its_own_routing(demo_run):
    from moekit.eval.report import ROUTING_CHART, routing_chart

    out, report = demo_run["out"], demo_run["report"]
    tuned = next(m for m in report["models"] if m.get("adapter"))
    directory = out / "eval" / f"{report['demo']['chosen']}+finetune"
    eval_report = json.loads((directory / "report.json").read_text())
    assert tuned["name"] in [m["name"] for m in eval_report["models"]]  # the same name in `moekit eval` and the demo
    assert f"| {tuned['name']} |" in demo_run["stdout"]
    chart = directory / routing_chart(tuned["name"])
    assert chart.is_file() and chart.read_bytes() != (directory / ROUTING_CHART).read_bytes()  # the trained routers' own
    assert tuned["routing"]["layers"] != report["routing"]["layers"]
    assert routing_chart(tuned["name"]) in report["charts"] and (out / routing_chart(tuned["name"])).is_file()


def test_cli_prints_the_headline_table(demo_run):
    stdout = demo_run["stdout"]
    assert "| model | role |" in stdout and "ppl mixed" in stdout
    assert "lower than every source" in stdout and "NOT lower" not in stdout


def test_second_zoo_use_is_a_cache_hit(demo_run):
    from moekit.zoo import PRESETS, ensure_zoo

    zoo_dir = Path(demo_run["report"]["demo"]["zoo"]["directory"])
    stamp = (zoo_dir / "zoo.json").stat().st_mtime_ns
    zoo = ensure_zoo(PRESETS["quick"], demo_run["cache"])
    assert zoo.directory == zoo_dir and (zoo_dir / "zoo.json").stat().st_mtime_ns == stamp  # read, not rebuilt


def test_demo_refuses_a_non_empty_output_without_touching_it(tmp_path, capsys):
    from moekit.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "-o", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_default_recipe_ships_in_the_wheel_and_is_the_one_in_recipes():
    # A wheel install has no recipes/ folder: the demo's recipe must be package data.
    import fnmatch
    import tomllib

    import moekit
    from moekit.demo import RECIPE

    package = Path(moekit.__file__).resolve().parent
    relative = RECIPE.relative_to(package).as_posix()
    root = package.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moekit"]
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), (relative, patterns)
    assert (root / "recipes" / "tiny-4x.yaml").resolve() == RECIPE
