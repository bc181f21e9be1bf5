"""`moekit eval` on tiny local models: numbers checked against direct transformers computations."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.cli import main
from moekit.errors import DataError, SourceError
from moekit.eval.compare import evaluate, model_entry
from moekit.eval.data import EvalSet, load_set, render, training_overlap
from moekit.eval.metrics import perplexity
from moekit.eval.options import EvalOptions
from moekit.eval.report import markdown_table, routing_chart, write_report
from moekit.eval.routing import routing_stats
from moekit.recipe import parse_recipe

PROMPTS = {
    "e0": ["def add(a, b): return a + b", "for i in range(10): pass"],
    "e1": ["The quick brown fox jumps over the lazy dog.", "Write a poem about the sea."],
    "e2": ["12 + 30 = 42", "7 * 6 = 42"],
}
CODE_TEXT = "def add(a, b):\n    return a + b\n\nimport os\nprint(os.getcwd())\n\nfor i in range(10):\n    print(i * 2)\n"
CHATS = [
    {"messages": [{"role": "user", "content": "Write a poem about the sea."}, {"role": "assistant", "content": "The sea and the sky."}]},
    {"text": "The quick brown fox jumps over the lazy dog. 12 + 30 = 42"},
]


def recipe(models: dict, experts: list[str], top_k: int) -> str:
    lines = [f"base_model: {models['base']}", "gate_mode: hidden", "dtype: float32", f"experts_per_token: {top_k}", "experts:"]
    for index, name in enumerate(experts):
        lines += [f"  - source_model: {models[name]}", f"    positive_prompts: {json.dumps(PROMPTS[list(PROMPTS)[index]])}"]
    return "\n".join(lines) + "\n"


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def direct_loss(path, texts: list[str]) -> tuple[float, int]:
    """Summed NLL and token count, one unpadded document at a time, with transformers' own loss."""
    model, tokenizer = load(path)
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]  # the tiny tokenizer adds BOS itself
        loss = model(ids, labels=ids).loss.item()  # mean over the len-1 predicted tokens
        total += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return total, tokens


@pytest.fixture(scope="module")
def moe(llama_family, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "moe"
    text = recipe(llama_family, ["e0", "e1", "e2"], top_k=2)
    build(parse_recipe(text), out, BuildOptions(device="cpu"), recipe_text=text)
    return out


@pytest.fixture(scope="module")
def other_tokenizer_model(llama_family, tmp_path_factory) -> Path:
    from moekit.testing import make_dense_checkpoint, make_tokenizer

    tokenizer = make_tokenizer(vocab_size=300, corpus=["completely different text for a smaller vocabulary", CODE_TEXT])
    return make_dense_checkpoint(tmp_path_factory.mktemp("other") / "other", "llama", seed=5, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    (root / "code.txt").write_text(CODE_TEXT, encoding="utf-8")
    (root / "mixed.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    return {"e0": str(root / "code.txt"), "mixed": str(root / "mixed.jsonl")}


@pytest.fixture(scope="module")
def report(moe, llama_family, other_tokenizer_model, data_files, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reports") / "report"
    options = EvalOptions(against=[str(llama_family["base"]), str(llama_family["e0"]), str(other_tokenizer_model)], data=data_files, batch_size=2, device="cpu")
    result = evaluate(moe, out, options)
    assert json.loads((out / "report.json").read_text()) == result.to_dict()
    return result.to_dict() | {"_out": str(out)}


def entry(report: dict, path) -> dict:
    return next(m for m in report["models"] if m["path"] == str(path))


def documents(spec: str, tokenizer) -> list[str]:
    return [render(d, tokenizer) for d in load_set("x", spec).documents]


def test_text_files_split_on_blank_lines_or_lines(tmp_path):
    (tmp_path / "blocks.txt").write_text("a b\nc\n\n\nd e\n", encoding="utf-8")
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_set("b", str(tmp_path / "blocks.txt")).documents == ["a b\nc", "d e"]
    assert load_set("l", str(tmp_path / "lines.txt"), limit=2).documents == ["one", "two"]


def test_hub_datasets_load_through_datasets(tmp_path):
    """`hf:NAME[:split]` goes through datasets.load_dataset; a local dataset folder stands in for a Hub id."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "validation.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    assert load_set("hub", f"hf:{tmp_path / 'ds'}:validation").documents == [CHATS[0]["messages"], CHATS[1]["text"]]
    with pytest.raises(DataError, match="split 'test'"):
        load_set("hub", f"hf:{tmp_path / 'ds'}")
    assert load_set("hub", f"hf:{tmp_path / 'ds'}:default:validation", limit=1).documents == [CHATS[0]["messages"]]  # name:config:split


def test_perplexity_equals_direct_transformers_computation(report, llama_family, data_files):
    _, tokenizer = load(llama_family["e0"])
    for name, spec in data_files.items():
        texts = documents(spec, tokenizer)
        total, tokens = direct_loss(llama_family["e0"], texts)
        metrics = entry(report, llama_family["e0"])["metrics"][name]
        assert metrics["tokens"] == tokens
        assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
        assert metrics["bits_per_byte"] == pytest.approx(total / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)


def test_chat_documents_use_the_chat_template(llama_family, data_files):
    _, tokenizer = load(llama_family["base"])
    rendered = documents(data_files["mixed"], tokenizer)
    assert rendered[0] == "<|user|>\nWrite a poem about the sea.</s><|assistant|>\nThe sea and the sky.</s>"
    assert rendered[1] == CHATS[1]["text"]


def test_moe_perplexity_equals_direct_computation_and_batching_does_not_matter(report, moe, data_files):
    model, tokenizer = load(moe)
    texts = documents(data_files["mixed"], tokenizer) + documents(data_files["e0"], tokenizer)
    total, tokens = direct_loss(moe, texts)
    for batch_size in (1, 3):
        assert perplexity(model, tokenizer, texts, batch_size=batch_size).loss == pytest.approx(total / tokens, rel=1e-5)
    assert entry(report, moe)["role"] == "moe"


def test_source_with_other_tokenizer_gets_its_own_tokenizer_and_a_mark(report, other_tokenizer_model, data_files):
    other = entry(report, other_tokenizer_model)
    assert other["same_tokenizer"] is False and all(m["same_tokenizer"] for m in report["models"] if m is not other)
    _, tokenizer = load(other_tokenizer_model)
    total, tokens = direct_loss(other_tokenizer_model, documents(data_files["e0"], tokenizer))
    assert other["metrics"]["e0"]["tokens"] == tokens
    assert other["metrics"]["e0"]["loss"] == pytest.approx(total / tokens, rel=1e-5)
    table = markdown_table(report)
    assert "bits/byte e0" in table and "†" in table


@torch.no_grad()
def hooked_routing(model, tokenizer, texts: list[str], top_k: int) -> list[tuple[list[float], float, list[float]]]:
    """(top-k shares, mean softmax entropy, top-1 shares) per layer from forward hooks on each router's input, BOS excluded."""
    router_inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: router_inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        for text in texts:  # one unpadded document at a time
            model(tokenizer(text, return_tensors="pt")["input_ids"])
    finally:
        for hook in hooks:
            hook.remove()
    result = []
    for layer_index in range(len(model.model.layers)):
        gate = model.model.layers[layer_index].mlp.gate.weight  # (experts, hidden)
        logits = torch.cat([x[1:] for x in router_inputs[layer_index]]) @ gate.T  # (tokens, experts)
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=gate.shape[0]).float()
        entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean().item()
        first = torch.bincount(logits.argmax(dim=-1), minlength=gate.shape[0]).float()
        result.append(((counts / counts.sum()).tolist(), entropy, (first / first.sum()).tolist()))
    return result


def test_routing_shares_sum_to_one_and_match_router_hooks(report, moe, data_files):
    routing = report["routing"]
    assert routing["experts"] == ["e0", "e1", "e2"] and routing["experts_per_token"] == 2
    for layer in routing["layers"]:
        assert sum(layer["share"]) == pytest.approx(1, abs=1e-3)
    model, tokenizer = load(moe)
    first_choice = {}
    for name, spec in data_files.items():
        for layer_index, (shares, entropy, first) in enumerate(hooked_routing(model, tokenizer, documents(spec, tokenizer), top_k=2)):
            assert routing["per_set"][name]["share"][layer_index] == pytest.approx(shares, abs=1e-4)
            assert routing["per_set"][name]["entropy"][layer_index] == pytest.approx(entropy, abs=1e-4)
            first_choice.setdefault(name, []).append(first)
    own = routing["own_expert_share"]["e0"]  # the --data set named like expert e0 is tied to it
    assert own["expert"] == 0 and own["per_layer"] == [row[0] for row in routing["per_set"]["e0"]["share"]]
    # Routing accuracy: the share of the set's tokens whose first choice is its expert.
    assert own["top1_per_layer"] == pytest.approx([layer[0] for layer in first_choice["e0"]], abs=1e-4)


def test_phixtral_routing_matches_router_hooks(tiny_tokenizer, tmp_path):
    from moekit.testing import make_dense_checkpoint

    base = make_dense_checkpoint(tmp_path / "base", "phi", seed=0, tokenizer=tiny_tokenizer)
    experts = [make_dense_checkpoint(tmp_path / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5) for i in range(2)]
    text = recipe({"base": base, "e0": experts[0], "e1": experts[1]}, ["e0", "e1"], top_k=1)
    build(parse_recipe(text), tmp_path / "phixtral", BuildOptions(device="cpu"), recipe_text=text)
    model, tokenizer = load(tmp_path / "phixtral")
    texts = [CODE_TEXT, "The quick brown fox jumps over the lazy dog."]
    stats = routing_stats(model, tokenizer, {"all": texts}, batch_size=2)
    for layer, (shares, entropy, _first) in zip(stats["layers"], hooked_routing(model, tokenizer, texts, top_k=1)):
        assert layer["share"] == pytest.approx(shares, abs=1e-4) and sum(layer["share"]) == pytest.approx(1, abs=1e-3)
        assert layer["entropy"] == pytest.approx(entropy, abs=1e-4)


def test_the_eval_command_loads_a_phixtral_in_a_fresh_process(tiny_tokenizer, data_files, tmp_path):
    """The CLI registers moekit's Phixtral itself: no trust_remote_code, no registration by the test process."""
    import subprocess

    from moekit.testing import make_dense_checkpoint

    base = make_dense_checkpoint(tmp_path / "base", "phi", seed=0, tokenizer=tiny_tokenizer)
    experts = [make_dense_checkpoint(tmp_path / f"e{i}", base=base, seed=i + 1, mlp_noise=0.5) for i in range(2)]
    text = recipe({"base": base, "e0": experts[0], "e1": experts[1]}, ["e0", "e1"], top_k=1)
    build(parse_recipe(text), tmp_path / "phixtral", BuildOptions(device="cpu"), recipe_text=text)
    name, path = next(iter(data_files.items()))
    done = subprocess.run([sys.executable, "-m", "moekit", "eval", str(tmp_path / "phixtral"), "--data", f"{name}={path}", "--limit", "1",
                           "--device", "cpu", "-o", str(tmp_path / "report")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "report" / "report.json").is_file()


def test_moe_of_identical_experts_has_the_base_perplexity(llama_family, data_files, tmp_path):
    text = recipe(llama_family, ["base", "base"], top_k=1)
    build(parse_recipe(text), tmp_path / "same", BuildOptions(device="cpu", allow_same_experts=True), recipe_text=text)
    result = evaluate(tmp_path / "same", tmp_path / "report", EvalOptions(data=data_files, device="cpu")).to_dict()
    moe_entry, base_entry = result["models"]
    assert base_entry["base"] and base_entry["experts"] == [0, 1]  # one source filling both slots, evaluated once
    for name in data_files:
        assert moe_entry["metrics"][name]["perplexity"] == pytest.approx(base_entry["metrics"][name]["perplexity"], rel=1e-4)


def test_cli_default_sets_are_the_experts_prompts(moe, tmp_path, capsys):
    main(["eval", str(moe), "--limit", "1", "--device", "cpu", "-o", str(tmp_path / "r")])
    result = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(result["data"]) == ["prompts:e0", "prompts:e1", "prompts:e2"]
    assert all(info["small"] and info["documents"] == 1 for info in result["data"].values())
    assert [m["name"] for m in result["models"]] == ["moe", "base", "e0", "e1", "e2"]  # sources from moekit.json
    assert set(result["routing"]["own_expert_share"]) == {"prompts:e0", "prompts:e1", "prompts:e2"}
    assert "sanity check" in (tmp_path / "r" / "report.md").read_text()
    assert "| Δ moe vs best source |" in capsys.readouterr().out


def run_failing(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_cli_bad_inputs_give_one_message_and_write_nothing(moe, tmp_path, capsys):
    out = tmp_path / "report"
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    (tmp_path / "wrong.jsonl").write_text('{"prompt": "no text field"}\n', encoding="utf-8")
    base = ["eval", str(moe), "--device", "cpu", "-o", str(out)]
    assert "cannot evaluate against " + str(tmp_path / "missing-model") in run_failing(base + ["--against", str(tmp_path / "missing-model")], capsys)
    assert "nope.txt does not exist" in run_failing(base + ["--data", f"x={tmp_path / 'nope.txt'}"], capsys)
    assert "bad.jsonl:2 is not valid JSON" in run_failing(base + ["--data", f"x={tmp_path / 'bad.jsonl'}"], capsys)
    assert "wrong.jsonl:1: expected a `text` string or a `messages` list, found ['prompt']" in run_failing(
        base + ["--data", f"x={tmp_path / 'wrong.jsonl'}"], capsys
    )
    assert "cannot evaluate" in run_failing(["eval", str(tmp_path / "no-moe"), "-o", str(out)], capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "moekit" in p.name]
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "--overwrite" in run_failing(base, capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_lm_eval_missing_names_the_install_command(moe, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    err = run_failing(["eval", str(moe), "--task", "arc_easy", "-o", str(tmp_path / "r")], capsys)
    assert "lm-eval is not installed" in err and "pip install 'moekit[lm-eval]'" in err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory) -> Path:
    """A local multiple-choice lm-eval task over a local JSONL file (answers filled in by the test)."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'tiny_choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return root


QUESTIONS = [
    ("12 + 30 =", ["42", "the sea", "fox"]),
    ("The quick brown", ["fox", "dog", "42"]),
    ("def add(a, b):", ["return a + b", "poem", "7 * 6"]),
    ("Write a poem about", ["the sea", "London", "a + b"]),
    ('{"name": "Ada", "age":', ["36", "fox", "sky"]),
    ("Solve the equation and", ["explain each step.", "jumps", "print"]),
]


@torch.no_grad()
def choice_scores(path) -> list[list[float]]:
    """Log-likelihood of ' ' + choice after the question, the way lm-eval splits context and continuation."""
    model, tokenizer = load(path)
    scores = []
    for question, choices in QUESTIONS:
        row = []
        for choice in choices:
            context = tokenizer(question)["input_ids"]
            whole = tokenizer(question + " " + choice)["input_ids"]
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)  # (seq, vocab)
            row.append(sum(logprobs[position - 1, whole[position]].item() for position in range(len(context), len(whole))))
        scores.append(row)
    return scores


def test_local_lm_eval_task_accuracy_equals_hand_computation(moe, llama_family, choice_task, tmp_path, capsys):
    moe_scores = choice_scores(moe)
    answers = []
    for index, row in enumerate(moe_scores):  # the MoE's own pick for half the questions, another choice for the rest
        best = max(range(len(row)), key=row.__getitem__)
        answers.append(best if index % 2 == 0 else (best + 1) % len(row))
    lines = [json.dumps({"question": q, "choices": c, "answer": a}) for (q, c), a in zip(QUESTIONS, answers)]
    (choice_task / "tiny_choice.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = EvalOptions(
        against=[str(llama_family["e0"])],
        tasks=["tiny_choice"],
        include_path=[str(choice_task)],
        device="cpu",
        data={"x": str(choice_task / "tiny_choice.yaml")},
    )
    result = evaluate(moe, tmp_path / "r", options).to_dict()
    for evaluated, scores in zip(result["models"], [moe_scores, choice_scores(llama_family["e0"])]):
        expected = sum(max(range(3), key=row.__getitem__) == answer for row, answer in zip(scores, answers)) / len(answers)
        assert evaluated["tasks"]["tiny_choice"]["acc"] == pytest.approx(expected)
    assert result["models"][0]["tasks"]["tiny_choice"]["acc"] == pytest.approx(0.5)
    assert "tiny_choice acc" in markdown_table(result)
    err = run_failing(["eval", str(moe), "--task", "tiny_choise", "--include-path", str(choice_task), "-o", str(tmp_path / "r2")], capsys)
    assert "unknown lm-eval task 'tiny_choise'; close matches: tiny_choice" in err
    assert not (tmp_path / "r2").exists()


def test_model_entry_of_a_loaded_model_reproduces_the_report(report, moe, data_files):
    """What the demo does for its fine-tuned model: score an already-loaded model into a report entry."""
    model, tokenizer = load(moe)
    sets = {name: load_set(name, spec).documents for name, spec in data_files.items()}
    again = model_entry(model, tokenizer, sets, name="moe", path=str(moe), role="moe", batch_size=2, expert_names=["e0", "e1", "e2"], expert_of_set={"e0": 0})
    assert again["metrics"] == entry(report, moe)["metrics"]
    assert again["routing"]["layers"] == report["routing"]["layers"] and again["routing"]["own_expert_share"] == report["routing"]["own_expert_share"]


def test_report_can_be_extended_and_rendered_again(report, tmp_path):
    extended = json.loads(json.dumps({k: v for k, v in report.items() if k != "_out"}))
    moe_entry = next(m for m in extended["models"] if m["role"] == "moe")
    tuned = json.loads(json.dumps(moe_entry)) | {"name": "moe+qlora"}
    for metrics in tuned["metrics"].values():
        metrics["perplexity"] = 1.5  # better than every real model
    extended["models"].append(tuned)
    files = write_report(extended, tmp_path / "again")
    assert {"report.json", "report.md", "perplexity.png", "routing.png"} <= set(files)
    row = next(line for line in (tmp_path / "again" / "report.md").read_text().splitlines() if line.startswith("| moe+qlora "))
    assert row.count("**1.50**") == len(tuned["metrics"])
    assert "| Δ moe+qlora vs best source |" in markdown_table(extended)
    assert all((tmp_path / "again" / name).stat().st_size > 1000 for name in ("perplexity.png", "routing.png"))


def test_adapter_model_is_evaluated_as_a_second_moe_entry(moe, data_files, tmp_path):
    from moekit.finetune.export import load_finetuned
    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import finetune

    chats = "".join(
        json.dumps({"messages": [{"role": "user", "content": f"{i} + 1 ="}, {"role": "assistant", "content": f"{i + 1}."}]}) + "\n" for i in range(8)
    )
    (tmp_path / "chat.jsonl").write_text(chats, encoding="utf-8")
    tuned = tmp_path / "tuned"
    finetune(
        moe,
        tuned,
        FinetuneOptions(data=str(tmp_path / "chat.jsonl"), max_steps=2, target="gate", batch_size=4, max_seq_len=64, learning_rate=5e-2, save_steps=1000),
    )
    data = {"e0": data_files["e0"], "train": str(tmp_path / "chat.jsonl")}  # the fine-tune's own training file as a set
    result = evaluate(moe, tmp_path / "r", EvalOptions(against=[], adapter=str(tuned), data=data, device="cpu")).to_dict()
    _, tuned_entry = result["models"]
    assert tuned_entry["role"] == "moe" and tuned_entry["name"] == "moe+tuned" and tuned_entry["adapter"] == str(tuned)
    model, tokenizer = load_finetuned(tuned, dtype=torch.float32, device="cpu")
    texts = documents(data_files["e0"], tokenizer)
    with torch.no_grad():
        losses = [(model(ids, labels=ids).loss.item(), ids.shape[1] - 1) for ids in (tokenizer(t, return_tensors="pt")["input_ids"] for t in texts)]
    assert tuned_entry["metrics"]["e0"]["loss"] == pytest.approx(sum(loss * n for loss, n in losses) / sum(n for _, n in losses), rel=1e-5)
    assert tuned_entry["routing"]["layers"] != result["routing"]["layers"]  # the routers were trained
    chart = tmp_path / "r" / routing_chart("moe+tuned")  # and their routing is reported, not only the first MoE's
    assert chart.is_file() and chart.read_bytes() != (tmp_path / "r" / "routing.png").read_bytes()
    report_md = (tmp_path / "r" / "report.md").read_text()
    assert "## Routing of moe+tuned" in report_md and "## Routing of moe\n" in report_md
    assert result["data"]["train"]["overlaps_training"] == {"model": "moe+tuned", "training_data": str(tmp_path / "chat.jsonl"), "documents": 8, "of": 8}
    assert "overlaps_training" not in result["data"]["e0"]
    assert "| ppl train ‡ |" in report_md and "`train` shares 8 of its 8 documents with the training data of moe+tuned" in report_md
    with pytest.raises(SourceError, match="not a moekit finetune output"):
        evaluate(moe, tmp_path / "r2", EvalOptions(adapter=str(tmp_path), device="cpu"))


def test_load_in_4bit_quantizes_the_moe_experts_too(report, moe, data_files):
    import bitsandbytes as bnb

    from moekit.eval.models import load_model, plan_models
    from moekit.finetune.expert_storage import NF4Storage

    options = EvalOptions(against=[], load_in_4bit=True, device="cpu")
    (spec,), _, _ = plan_models(moe, options)
    model, tokenizer = load_model(spec, options, "cpu", trust_remote_code=False)
    quantized = [name for name, module in model.named_modules() if isinstance(module, (bnb.nn.Linear4bit, NF4Storage))]
    assert any(".experts." in name for name in quantized) and any("self_attn" in name for name in quantized)
    result = perplexity(model, tokenizer, documents(data_files["e0"], tokenizer))
    float_perplexity = entry(report, moe)["metrics"]["e0"]["perplexity"]
    assert result.perplexity != pytest.approx(float_perplexity, rel=1e-6)  # really quantized
    assert result.perplexity == pytest.approx(float_perplexity, rel=0.1)  # and still the same model


def test_training_overlap_counts_documents_shared_with_training_data(tmp_path):
    chats = [[{"role": "user", "content": f"{i} + 1 ="}, {"role": "assistant", "content": f"{i + 1}."}] for i in range(6)]
    training = tmp_path / "train.jsonl"
    training.write_text(
        json.dumps({"messages": chats[0]})
        + "\n"
        + json.dumps({"prompt": "1 + 1 =", "completion": "2."})
        + "\n"
        + json.dumps({"text": "plain text seen in training"})
        + "\n",
        encoding="utf-8",
    )
    held_out = EvalSet("x", "x.jsonl", [chats[0], chats[1], chats[2], "plain text seen in training", "new text"])
    assert training_overlap(held_out, str(training)) == 3  # the chat, the prompt/completion pair and the text
    assert training_overlap(EvalSet("y", "y.jsonl", chats[3:]), str(training)) == 0
    assert training_overlap(held_out, "org/hub-dataset") == 0  # not a local file: nothing to compare here
