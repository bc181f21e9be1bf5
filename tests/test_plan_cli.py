"""`moekit plan` on the command line: the options shared with `moekit finetune`, output, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.finetune.options import TrainingOptions
from moekit.testing import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan_cli") / "mixtral"
    tiny_config("mixtral", 384, architectures=["MixtralForCausalLM"]).save_pretrained(path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *map(str, args)])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_every_training_option_is_a_plan_option_spelled_as_in_finetune():
    from moekit.commands.finetune import command as finetune_command
    from moekit.commands.plan import command as plan_command

    plan_params = {param.name: param for param in plan_command.params}
    finetune_params = {param.name: param for param in finetune_command.params}
    assert set(TrainingOptions.model_fields) <= set(plan_params)
    # nothing else: the model argument, --gpu-memory, --json and --config
    assert set(plan_params) - set(TrainingOptions.model_fields) == {"model", "gpu_memory", "as_json", "config"}
    for name in TrainingOptions.model_fields:
        mine, theirs = plan_params[name], finetune_params[name]
        assert (mine.opts, mine.secondary_opts, repr(mine.type), mine.default) == (theirs.opts, theirs.secondary_opts, repr(theirs.type), theirs.default)


def test_plan_prints_the_breakdown_and_json(capsys, model_dir):
    code, out, _ = run(
        capsys,
        model_dir,
        "--target",
        "experts,gate",
        "--experts",
        "0,2",
        "--lora-r",
        "8",
        "--batch-size",
        "1",
        "--max-seq-len",
        "128",
        "--no-gradient-checkpointing",
        "--optimizer",
        "adamw_8bit",
        "--gpu-memory",
        "24GB",
    )
    assert code == 0
    assert "target experts,gate, LoRA r=8, batch 1 x 128 tokens, gradient checkpointing off, adamw_8bit" in out
    assert "on a 24.00 GB GPU: fits" in out
    code, out, _ = run(capsys, model_dir, "--max-seq-len", "128", "--gpu-memory", "16GiB", "--json")
    data = json.loads(out)
    assert data["gpu_memory"] == 16 * 2**30 and data["fits"] is True and data["options"]["max_seq_len"] == 128
    assert data["peak_bytes"] == max(data["phases"].values())


def test_plan_help_does_not_import_torch():
    probe = "import sys; from moekit.cli import cli; cli.main(['plan', '--help'], standalone_mode=False); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--gpu-memory" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--batch-size", "0"], 2, "invalid --batch-size: Input should be greater than or equal to 1"),
        (["--gpu-memory", "lots"], 2, "cannot read size 'lots'"),
        (["--gpu-memory", "0GB"], 2, "must be positive"),
        (["--target", "experts,mlp"], 2, "unknown target 'mlp'"),
        (["--max-seq-len", "4096"], 1, "beyond the model's max_position_embeddings (256)"),
        (["--experts", "9", "--max-seq-len", "128"], 1, "expert index 9 is out of range"),
    ],
)
def test_bad_options(capsys, model_dir, args, code, message):
    exit_code, out, err = run(capsys, model_dir, *args)
    assert exit_code == code
    assert message in err and "Traceback" not in err
    assert out == ""


def test_bad_models(capsys, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    code, _, err = run(capsys, tmp_path / "bert")
    assert code == 1 and "not a causal language model (architectures: BertForMaskedLM)" in err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run(capsys, tmp_path / "gpt2")
    assert code == 1 and "does not know the architecture 'gpt2'" in err and "known: mixtral, phixtral" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, tmp_path / "empty")
    assert code == 1 and "has no config.json" in err
    # HF_HUB_OFFLINE=1 (conftest): a Hub id that is not cached is one clear error, no traceback
    code, _, err = run(capsys, "nobody-xyz/no-such-model")
    assert code == 1 and "not in the Hugging Face cache" in err and "Traceback" not in err


def test_dense_model_with_expert_targets(capsys, tmp_path):
    tiny_config("llama", 384, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    code, _, err = run(capsys, tmp_path / "llama", "--max-seq-len", "128")
    assert code == 1 and "needs an MoE, but this llama model is dense" in err
    code, out, _ = run(capsys, tmp_path / "llama", "--max-seq-len", "128", "--target", "attn")
    assert code == 0 and "(llama: dense, 2 layers" in out


def test_hub_id_reads_only_the_cached_config(capsys, monkeypatch, tmp_path, model_dir):
    """A Hub id goes through huggingface_hub's real hf_hub_download (offline, from a local cache): config.json only."""
    import huggingface_hub

    from moekit.testing import populate_hub_cache

    populate_hub_cache(tmp_path / "cache", "someone/tiny-moe", model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "someone/tiny-moe@main", "--max-seq-len", "128", "--json")
    assert code == 0 and json.loads(out)["parameters"]["total"] > 0


def test_batch_advice_keeps_the_sequences_per_step(model_dir):
    from moekit.plan import estimate

    need = {b: estimate(model_dir, TrainingOptions(batch_size=b, max_seq_len=256)).gpu_bytes_needed for b in (2, 3, 4)}
    plan = estimate(model_dir, TrainingOptions(batch_size=4, max_seq_len=256), gpu_memory=(need[3] + need[4]) // 2)
    assert plan.largest_batch_size == 3
    assert plan.advice.startswith("--batch-size 2 with --grad-accum 2")
