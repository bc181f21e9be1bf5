"""`moekit finetune` / `moekit export` on a tiny 3-expert MoE with NF4 experts (bitsandbytes on the CPU).

Training runs are module-scoped and reused: one full run (all targets), one expert-1-only run, one
router-only run; resume and distillation make short runs of their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moekit.cli import main
from moekit.finetune.options import FinetuneOptions
from moekit.finetune.trainer import finetune, partial_dir
from moekit.testing import run_cli

QUICK = {"batch_size": 4, "max_seq_len": 64, "lora_r": 8, "learning_rate": 5e-3, "save_steps": 1000}


def toy_conversations(count: int = 32) -> list[dict]:
    """A learnable task: the reply is a fixed sentence after the sum of the two numbers asked."""
    rows = []
    for i in range(count):
        a, b = i % 7, (i * 3) % 5
        rows.append({"messages": [{"role": "user", "content": f"{a} + {b} ="}, {"role": "assistant", "content": f"{a + b}. The quick brown fox."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def moe(random_moe) -> Path:
    return random_moe


@pytest.fixture(scope="module")
def chat_data(workdir) -> Path:
    return write_jsonl(workdir / "chat.jsonl", toy_conversations())


@pytest.fixture(scope="module")
def trained(moe, chat_data, workdir):
    """30 steps of QLoRA on attention, all experts and the routers."""
    out = workdir / "full"
    result = finetune(moe, out, FinetuneOptions(data=str(chat_data), max_steps=30, **QUICK))
    return out, result


@pytest.fixture(scope="module")
def expert1(moe, chat_data, workdir):
    """Trained through the real CLI (main() returns normally on success)."""
    out = workdir / "expert1"
    main(
        [
            "finetune",
            str(moe),
            "--data",
            str(chat_data),
            "-o",
            str(out),
            "--max-steps",
            "4",
            "--target",
            "experts",
            "--experts",
            "1",
            "--batch-size",
            "4",
            "--max-seq-len",
            "64",
            "--lora-r",
            "8",
            "--learning-rate",
            "5e-3",
        ]
    )
    return out


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def changed_tensors(base: Path, other: Path) -> set[str]:
    """Names of the tensors whose values differ between two checkpoints of the same layout."""

    def read(model_dir):
        tensors = {}
        for file in model_dir.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (safe_open is not a dict)
        return tensors

    a, b = read(base), read(other)
    assert set(a) == set(b)
    return {key for key in a if not torch.equal(a[key], b[key])}


# --- training ----------------------------------------------------------------------------------


def test_loss_goes_down_with_aux_loss_logged_apart(trained):
    out, result = trained
    assert result.steps == 30
    assert result.losses["lm_last"] < 0.6 * result.losses["lm_first"], result.losses
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(record["aux_loss"] > 0 for record in steps)


def test_logged_losses_match_an_independent_forward(moe, workdir):
    """The first step's logged loss, LM loss and aux loss, recomputed by a plain transformers forward of the
    untrained model on the same batch: LM loss = cross-entropy on the assistant tokens, aux loss = transformers'
    load-balancing loss, total = LM + coef * aux."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.finetune.data import load_training_data

    conversation = toy_conversations(1)[0]
    data = write_jsonl(workdir / "one_conversation.jsonl", [conversation] * 4)  # every batch is this batch
    out = workdir / "first_step"
    # routers only, in full precision: step 1 is logged before the first update, from the checkpoint itself
    options = FinetuneOptions(data=str(data), max_steps=2, warmup_ratio=0, bits=16, target="gate", **QUICK)
    finetune(moe, out, options)
    logged = json.loads((out / "training_log.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1

    tokenizer = AutoTokenizer.from_pretrained(moe)
    load_training_data(str(data), tokenizer)  # the chat template the trainer used
    tokens = tokenizer.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids = torch.tensor([tokens["input_ids"]])  # (1, seq)
    labels = torch.where(torch.tensor([tokens["assistant_masks"]]) == 1, input_ids, -100)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    with torch.no_grad():
        outputs = model(input_ids, output_router_logits=True)
    lm_loss = torch.nn.functional.cross_entropy(outputs.logits[0, :-1], labels[0, 1:], ignore_index=-100).item()
    aux_loss = outputs.aux_loss.item()
    assert logged["lm_loss"] == pytest.approx(lm_loss, rel=1e-4)
    assert logged["aux_loss"] == pytest.approx(aux_loss, rel=1e-4)
    assert logged["loss"] == pytest.approx(lm_loss + options.router_aux_loss_coef * aux_loss, rel=1e-4)


def test_output_files_and_metadata(trained, moe, chat_data):
    out, result = trained
    assert {"adapter", "routers.safetensors", "moekit-finetune.json", "training_log.jsonl", "loss.png", "checkpoints"} <= {p.name for p in out.iterdir()}
    assert not partial_dir(out).exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "chat_template.jinja").is_file()
    metadata = json.loads((out / "moekit-finetune.json").read_text())
    assert metadata["base_model_path"] == str(moe.resolve())
    assert metadata["datasets"] == [str(chat_data)]
    assert metadata["data"]["loss_on"] == "assistant turns"
    assert metadata["trainable"]["by_kind"].keys() == {"attn", "experts", "gate"}
    assert metadata["trainable"]["by_expert"].keys() == {"0", "1", "2"}
    # the expert blocks ran grouped throughout, never the expert-by-expert fallback
    assert metadata["expert_paths"]["grouped"] > 0 and metadata["expert_paths"]["per_expert"] == 0
    # with gradient checkpointing (the default), recomputations left the unsaved down_proj GEMM out
    assert metadata["options"]["gradient_checkpointing"] and metadata["recomputations_skipped"] > 0
    assert metadata["adapter_format"] == "peft"
    assert metadata["losses"]["last"] == result.last_loss


@pytest.mark.parametrize("form", ["messages", "prompt_completion", "unmarked_template"])
def test_loss_covers_exactly_the_assistant_reply(moe, tmp_path, form):
    """The labels TRL trains on are the reply and its EOS, nothing of the prompt or the chat markup."""
    from transformers import AutoTokenizer

    from moekit.finetune.data import load_training_data
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.targets import apply_targets
    from moekit.finetune.trainer import _make_trainer

    turns = [{"role": "user", "content": "2 + 3 ="}, {"role": "assistant", "content": "5. The quick brown fox."}]
    rows = [{"prompt": "2 + 3 =", "completion": "5. The quick brown fox."}] if form == "prompt_completion" else [{"messages": turns}]
    tokenizer = AutoTokenizer.from_pretrained(moe)
    if form == "unmarked_template":  # no {% generation %} markers: the last reply is trained as a completion
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
        )
    data = load_training_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer)
    options = FinetuneOptions(data="unused", target="attn", max_steps=1, **QUICK)
    model, _ = apply_targets(load_for_training(moe, bits=16, compute_dtype=torch.float32, device_map="cpu"), options)
    trainer = _make_trainer(model, tokenizer, data, tmp_path, options, torch.float32, teacher=None)
    labels = [t for t in trainer.train_dataset[0]["labels"] if t != -100]
    assert tokenizer.decode(labels) == "5. The quick brown fox.</s>"


def test_a_single_process_that_sees_several_gpus_trains_on_one(moe, chat_data, tmp_path):
    """Plain `moekit finetune` on a 2-GPU machine crashed in TRL (Trainer would use nn.DataParallel)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from moekit.finetune.data import load_training_data
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.targets import apply_targets
    from moekit.finetune.trainer import MoeSFTTrainer, train_on_one_gpu

    tokenizer = AutoTokenizer.from_pretrained(moe)
    data = load_training_data(str(chat_data), tokenizer)
    options = FinetuneOptions(data="unused", target="attn", max_steps=1, **QUICK)
    model, _ = apply_targets(load_for_training(moe, bits=16, compute_dtype=torch.float32, device_map="cpu"), options)

    def make(args):
        return MoeSFTTrainer(model=model, args=args, train_dataset=data.dataset, processing_class=tokenizer)

    def two_gpu_args():
        args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), use_cpu=True, max_steps=1, report_to=[])
        args._n_gpu = 2  # what transformers counts on a machine with two visible GPUs and no launcher
        return args

    with pytest.raises(ValueError, match="DataParallel"):  # what users met
        make(two_gpu_args())
    args = two_gpu_args()
    note = train_on_one_gpu(args)
    assert args.n_gpu == 1 and "2 GPUs" in note and "--ddp" in note and "--fsdp" in note
    make(args)  # no DataParallel, no error
    assert train_on_one_gpu(SFTConfig(output_dir=str(tmp_path / "c2"), use_cpu=True, report_to=[])) is None


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
def test_the_host_work_of_a_step_matches_the_trainers_own(moe, chat_data, tmp_path, optimizer):
    """moekit's cheaper bookkeeping around each step (clipping over the trainable parameters only, the parameter count
    of the FLOP estimate taken once, torch's fused AdamW) gives what the Trainer's own would."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from moekit.finetune.data import load_training_data
    from moekit.finetune.loading import load_for_training
    from moekit.finetune.targets import apply_targets
    from moekit.finetune.trainer import _make_trainer

    tokenizer = AutoTokenizer.from_pretrained(moe)
    data = load_training_data(str(chat_data), tokenizer)
    options = FinetuneOptions(data="unused", target="attn,experts,gate", max_steps=1, optimizer=optimizer, **QUICK)
    model, _ = apply_targets(load_for_training(moe, bits=4, compute_dtype=torch.float32, device_map="cpu"), options)
    trainer = _make_trainer(model, tokenizer, data, tmp_path, options, torch.float32, teacher=None)
    trainer.args.max_grad_norm = 1e-3  # so that clipping scales every gradient
    ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [param for param in model.parameters() if param.grad is not None]
    assert any("router" in name or "gate." in name for name, param in model.named_parameters() if param.grad is not None)
    before = [param.grad.clone() for param in trained]
    norm = trainer._clip_grad_norm(model)
    ours = [param.grad.clone() for param in trained]
    for param, grad in zip(trained, before, strict=True):
        param.grad.copy_(grad)
    assert torch.equal(norm, SFTTrainer._clip_grad_norm(trainer, model)) and norm > 1e-3
    for param, grad in zip(trained, ours, strict=True):
        assert torch.equal(param.grad, grad)
    assert trainer.floating_point_ops({"input_ids": ids}) == SFTTrainer.floating_point_ops(trainer, {"input_ids": ids}) > 0
    trainer.create_optimizer()
    assert trainer.optimizer.defaults.get("fused", False) is (optimizer == "adamw_torch")


def test_adapter_loads_with_stock_transformers_and_peft(trained, moe, tiny_tokenizer, tmp_path):
    """`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe), adapter)` in a process that never
    imports moekit reproduces load_finetuned: attention and expert LoRA, and the routers (modules_to_save)."""
    from test_finetune_quant import run_stock_peft

    from moekit.finetune.export import load_finetuned
    from moekit.finetune.loading import load_for_training

    out, _ = trained
    ids = tiny_tokenizer(["3 + 4 = 7. The quick brown fox."], return_tensors="pt").input_ids
    stock, report = run_stock_peft(moe, out / "adapter", ids, tmp_path)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] and config["target_parameters"] and config["lora_dropout"] == 0.0
    merged, _tokenizer = load_finetuned(out, dtype=torch.float32, device="cpu", merge_into="original")  # stock PEFT on the unquantized base
    torch.testing.assert_close(stock, logits(merged, ids), atol=1e-4, rtol=1e-4)
    base_logits = logits(load_for_training(moe, bits=16, compute_dtype=torch.float32, device_map="cpu"), ids)
    assert not torch.allclose(stock, base_logits, atol=1e-3)


def test_resume_continues_from_the_checkpoint(moe, chat_data, tmp_path, monkeypatch):
    from moekit.finetune import trainer as trainer_module

    options = dict(data=str(chat_data), max_steps=6, lora_dropout=0.0, **{**QUICK, "save_steps": 3})
    reference = finetune(moe, tmp_path / "reference", FinetuneOptions(**options))

    original_on_log = trainer_module.JsonlLogCallback.on_log

    def crash_after_step_4(self, args, state, control, logs=None, **kwargs):
        original_on_log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 4:
            raise KeyboardInterrupt  # as if the run were killed after the checkpoint at step 3

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module.JsonlLogCallback, "on_log", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(moe, out, FinetuneOptions(**options))
    monkeypatch.undo()
    assert not out.exists()
    assert (partial_dir(out) / "checkpoints" / "checkpoint-3").is_dir()

    resumed = finetune(moe, out, FinetuneOptions(**options, resume=True))
    assert resumed.steps == 6
    assert not partial_dir(out).exists()
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if "loss" in line]
    reference_log = [json.loads(line) for line in (tmp_path / "reference" / "training_log.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    ours = [r["loss"] for r in log if "loss" in r]
    theirs = [r["loss"] for r in reference_log if "loss" in r]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert resumed.last_loss == pytest.approx(reference.last_loss, rel=1e-4)


def test_router_only_training(moe, chat_data, tmp_path):
    out = tmp_path / "routers"
    result = finetune(moe, out, FinetuneOptions(data=str(chat_data), max_steps=3, target="gate", **QUICK))
    assert result.adapter_dir is None and not (out / "adapter").exists()
    assert result.trainable.to_dict()["by_kind"].keys() == {"gate"}
    exported = tmp_path / "exported"
    from moekit.finetune.export import export

    export(out, exported, merge_into="original")
    routers = {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)}
    assert changed_tensors(moe, exported) == routers
    export(out, tmp_path / "dequantized", merge_into="dequantized")  # the routers were trained against the 4-bit weights
    quantized = changed_tensors(moe, tmp_path / "dequantized") - routers
    assert quantized == changed_tensors(exported, tmp_path / "dequantized") and all(".self_attn." in key or ".experts." in key for key in quantized)


def test_distillation_from_a_dense_teacher(moe, chat_data, llama_family, tmp_path):
    out = tmp_path / "kd"
    result = finetune(moe, out, FinetuneOptions(data=str(chat_data), max_steps=3, teacher=str(llama_family["e0"]), kd_alpha=0.5, target="attn", **QUICK))
    steps = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(r["kd_loss"] > 0 and "lm_loss" in r and "aux_loss" in r for r in steps)
    assert result.losses["kd_first"] > 0
    assert json.loads((out / "moekit-finetune.json").read_text())["teacher"] == str(llama_family["e0"])


# --- export ------------------------------------------------------------------------------------


def test_export_changes_only_expert_1(expert1, moe, tmp_path, capsys, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from moekit.finetune.export import load_finetuned

    out = tmp_path / "merged"
    code, output = run_cli(["export", str(expert1), "-o", str(out), "--shard-size", "200KB", "--merge-into", "original"], capsys)
    assert code == 0, output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like `moekit build`
    assert changed_tensors(moe, out) == {f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight" for layer in range(2) for w in ("w1", "w2", "w3")}
    metadata = json.loads((out / "moekit.json").read_text())
    assert metadata["kind"] == "export" and metadata["architecture"] == "mixtral"
    assert (out / "moekit-finetune.json").is_file() and (out / "README.md").is_file()
    # the base's tokenizer files unchanged (transformers 4.x and llama.cpp read them), but for the chat template
    # the fine-tune was trained with
    from transformers import AutoTokenizer

    from moekit.build.sources import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if name == "tokenizer_config.json":
            without_template = [{k: v for k, v in json.loads((d / name).read_text()).items() if k != "chat_template"} for d in (out, moe)]
            assert without_template[0] == without_template[1]
        elif name != "chat_template.jinja" and (moe / name).is_file():
            assert (out / name).read_bytes() == (moe / name).read_bytes(), name
    trained_template = AutoTokenizer.from_pretrained(expert1 / "adapter").chat_template
    assert trained_template and AutoTokenizer.from_pretrained(out).chat_template == trained_template
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # legacy key for transformers 4.x readers

    ids = tiny_tokenizer(["1 + 2 = 3. The quick brown fox."], return_tensors="pt").input_ids
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged, _ = load_finetuned(expert1, dtype=torch.float32, device="cpu", merge_into="original")
    assert torch.allclose(logits(exported, ids), logits(merged, ids), atol=1e-5)

    # --merge-into dequantized (the 4-bit weights the adapter was trained against): it differs from the
    # original-weights export (the default) in every quantized tensor (attention and all experts), and nowhere else
    dequantized = tmp_path / "dequantized"
    code, output = run_cli(["export", str(expert1), "-o", str(dequantized), "--merge-into", "dequantized"], capsys)
    assert code == 0, output
    assert changed_tensors(out, dequantized) == {
        f"model.layers.{layer}.{name}"
        for layer in range(2)
        for name in [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(3) for w in ("w1", "w2", "w3")]
    }
    assert json.loads((dequantized / "moekit.json").read_text())["finetune"]["merge_into"] == "dequantized"


@pytest.mark.parametrize("base_has_jinja", [True, False])
def test_export_writes_the_trained_chat_template_into_the_base_tokenizer_files(tmp_path, base_has_jinja):
    from moekit.finetune.export import _write_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "chat_template": "old"}))
    if base_has_jinja:
        (tmp_path / "chat_template.jinja").write_text("old")
    _write_chat_template(tmp_path, "{{ messages }}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 64
    if base_has_jinja:  # transformers reads the file first: it carries the template, the config stays as it was
        assert (tmp_path / "chat_template.jinja").read_text() == "{{ messages }}" and config["chat_template"] == "old"
    else:
        assert config["chat_template"] == "{{ messages }}"


def test_export_refuses_an_adapter_that_did_not_train(expert1, tmp_path, capsys):
    """Zeroing the saved LoRA B matrices makes the merge a no-op: export must refuse and write nothing."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(expert1, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    out = tmp_path / "merged"
    code, output = run_cli(["export", str(broken), "-o", str(out)], capsys)
    assert code != 0 and "unchanged although trained" in output and "experts.1.w1" in output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


# --- bad input through the CLI -------------------------------------------------------------------


def assert_refused(args: list[str], out: Path, capsys, *expected: str) -> str:
    code, output = run_cli(["finetune", *args, "-o", str(out), "--max-seq-len", "64", "--max-steps", "2"], capsys)
    assert code != 0
    assert "Traceback" not in output
    for fragment in expected:
        assert fragment in output, output
    assert not out.exists() and not partial_dir(out).exists()
    return output


def test_refuses_expert_targets_on_a_dense_model(llama_family, chat_data, tmp_path, capsys):
    assert_refused([str(llama_family["base"]), "--data", str(chat_data), "--target", "experts"], tmp_path / "o", capsys, "needs an MoE")


def test_refuses_expert_index_out_of_range(moe, chat_data, tmp_path, capsys):
    assert_refused([str(moe), "--data", str(chat_data), "--experts", "0,3"], tmp_path / "o", capsys, "--experts 3 is out of range", "3 experts")


def test_refuses_dataset_without_expected_columns(moe, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "label": 1}])
    assert_refused([str(moe), "--data", str(data)], tmp_path / "o", capsys, "['text', 'label']", "`messages`", "`prompt` + `completion`")


def test_refuses_missing_dataset(moe, tmp_path, capsys):
    assert_refused([str(moe), "--data", str(tmp_path / "nope.jsonl")], tmp_path / "o", capsys, "does not exist")


def test_refuses_dataset_empty_after_length_filter(moe, tmp_path, capsys):
    long_prompt = " ".join(["the quick brown fox"] * 40)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long_prompt, "completion": "ok"}] * 4)
    assert_refused([str(moe), "--data", str(data)], tmp_path / "o", capsys, "no example", "--max-seq-len 64")


def test_refuses_a_chat_template_that_cannot_be_applied(moe, chat_data, tmp_path, capsys):
    broken = tmp_path / "moe"
    shutil.copytree(moe, broken)
    (broken / "chat_template.jinja").write_text("{{ raise_exception('only user turns, please') }}")
    assert_refused([str(broken), "--data", str(chat_data)], tmp_path / "o", capsys, "chat template cannot be applied", "only user turns")


def test_refuses_resume_without_checkpoint(moe, chat_data, tmp_path, capsys):
    assert_refused([str(moe), "--data", str(chat_data), "--resume"], tmp_path / "o", capsys, "--resume: no complete checkpoint")


def test_refuses_unfinished_run_without_resume(moe, chat_data, tmp_path, capsys):
    (tmp_path / "o.partial" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "o.partial" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")  # complete
    code, output = run_cli(["finetune", str(moe), "--data", str(chat_data), "-o", str(tmp_path / "o")], capsys)
    assert code != 0 and "--resume" in output and not (tmp_path / "o").exists()


def test_refuses_without_bitsandbytes(moe, chat_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    assert_refused([str(moe), "--data", str(chat_data)], tmp_path / "o", capsys, "bitsandbytes is not installed", "--bits 16")


def test_refuses_report_to_without_its_package(moe, chat_data, tmp_path, capsys, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_wandb_available", lambda: False)
    assert_refused([str(moe), "--data", str(chat_data), "--report-to", "wandb"], tmp_path / "o", capsys, "needs the wandb package")


def test_export_refuses_a_directory_that_is_not_a_finetune(moe, tmp_path, capsys):
    code, output = run_cli(["export", str(moe), "-o", str(tmp_path / "x")], capsys)
    assert code != 0 and "not a moekit finetune output" in output and not (tmp_path / "x").exists()
