"""What a new user meets: fast argument errors, helpful messages, quiet output, readable help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import _interrupted_message
from moekit.testing import TINY_MOE_CONFIG

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes")
ROOT = Path(__file__).parent.parent


def _run_and_list_heavy_imports(args: list[str]) -> tuple[int, str, list[str]]:
    """Run the real CLI in a fresh interpreter: (exit code, stderr, heavy modules that were imported)."""
    script = (
        "import json, sys\nfrom moekit.cli import main\n"
        f"try:\n    main({args!r})\n    code = 0\nexcept SystemExit as exit_info:\n    code = exit_info.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    code, imported = json.loads(done.stdout.strip().splitlines()[-1])
    return code, done.stderr, imported


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "some-moe", "-o", "out"], "missing option --data"),
        (["finetune", "some-moe", "-o", "out", "--data", "d.jsonl", "--max-steps", "many"], "'many' is not a valid integer"),
        (["finetune", "some-moe", "-o", "out", "--data", "d.jsonl", "--target", "atn"], "unknown target 'atn'"),
        (["finetune", "some-moe", "-o", "out", "--data", "d.jsonl", "--num-processes", "2"], "--num-processes needs --fsdp or --ddp"),
        (["plan", "some-moe", "--lora-r", "0"], "invalid --lora-r"),
        (["eval", "some-moe"], "Missing option '-o'"),
        (["eval", "some-moe", "-o", "out", "--data", "justapath.txt"], "expected NAME=PATH, got 'justapath.txt'"),
        (["build", "recipe.yaml", "--gate-batch-size", "0"], "invalid --gate-batch-size: Input should be greater than or equal to 1"),
        (["build", "recipe.yaml", "--config", "no-such-config.yaml"], "cannot read no-such-config.yaml"),
        (["bulid", "recipe.yaml"], "Did you mean 'build'?"),
    ],
)
def test_argument_errors_come_before_torch_is_imported(args, message):
    code, stderr, imported = _run_and_list_heavy_imports(args)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert imported == []


def test_mistyped_subcommand_gets_close_matches():
    code, stderr, _ = _run_and_list_heavy_imports(["plna"])
    assert "No such command 'plna'. Did you mean 'plan'?" in stderr
    code, stderr, _ = _run_and_list_heavy_imports(["zzzz"])
    assert "Did you mean" not in stderr and "commands: build, finetune" in stderr


def test_help_shows_typed_metavars_and_rewraps_every_paragraph():
    env = dict(os.environ, COLUMNS="72")
    for command in ("", "build", "finetune", "export", "eval", "plan", "publish", "demo"):
        done = subprocess.run([sys.executable, "-m", "moekit", *command.split(), "--help"], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
        too_long = [line for line in done.stdout.splitlines() if len(line) > 72]
        assert too_long == [], f"moekit {command} --help: {too_long}"
        if command == "finetune":
            assert "--max-steps INTEGER" in done.stdout and "--target LIST" in done.stdout


def test_interrupt_message_names_what_is_left(tmp_path):
    assert "partial" not in _interrupted_message(["build", "recipe.yaml", "-o", "moe"])
    assert "nothing was written" in _interrupted_message(["--verbose", "build", "recipe.yaml"])
    out = tmp_path / "chat"
    assert "nothing was written" in _interrupted_message(["finetune", "moe", "--data", "d.jsonl", "-o", str(out)])  # no checkpoint yet
    (tmp_path / "chat.partial").mkdir()
    finetune = _interrupted_message(["finetune", "moe", "--data", "d.jsonl", "-o", str(out)])
    assert f"{out}.partial" in finetune and "--resume" in finetune
    assert f"{out}.partial" in _interrupted_message(["finetune", "moe", "--data", "d.jsonl", f"--out={out}"])
    (tmp_path / "train.yaml").write_text(f"data: d.jsonl\nout: {out}\n")  # OUT from --config
    assert f"{out}.partial" in _interrupted_message(["finetune", "moe", "--config", str(tmp_path / "train.yaml")])


def test_plan_caps_the_default_sequence_length_and_hints_the_exact_flag(tmp_path):
    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MOE_CONFIG))
    done = subprocess.run([sys.executable, "-m", "moekit", "plan", str(model), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["options"]["max_seq_len"] == 128
    assert any("--max-seq-len 128" in note for note in plan["notes"])
    done = subprocess.run([sys.executable, "-m", "moekit", "plan", str(model), "--max-seq-len", "1024"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "pass --max-seq-len 128 or less" in done.stderr and "Traceback" not in done.stderr


_NOISY_COMMAND = """
import sys
import click
from moekit.cli import cli, main

@click.command("noisy")
def noisy():
    import bitsandbytes  # noqa: F401  (logs a kernels-community line on CPUs with AVX512-BF16)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    model.is_gradient_checkpointing  # what TRL reads on every step: a FutureWarning in transformers 5
    click.echo("done")

cli.get_command = lambda ctx, name: noisy  # the lazy group only knows moekit's own commands
main(sys.argv[1:])
"""


def test_third_party_noise_is_hidden_unless_verbose():
    def stderr(*flags):
        done = subprocess.run([sys.executable, "-c", _NOISY_COMMAND, *flags, "noisy"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0 and "done" in done.stdout, done.stderr
        return done.stderr

    from importlib.metadata import version

    from bitsandbytes.functional import has_avx512bf16
    from packaging.version import Version

    loud = stderr("--verbose")
    if has_avx512bf16():  # bitsandbytes looks for its CPU kernels (and logs that it found none) only on such CPUs
        assert "kernels-community" in loud  # the noise is real, and --verbose shows it
    if Version(version("transformers")) >= Version("5.23"):  # where transformers deprecated is_gradient_checkpointing
        assert "is_gradient_checkpointing" in loud
    quiet = stderr()
    assert "is_gradient_checkpointing" not in quiet and "kernels-community" not in quiet


def test_offline_lm_eval_task_fails_in_one_message_before_any_model_loads(tmp_path):
    pytest.importorskip("lm_eval")
    model = tmp_path / "moe"
    model.mkdir()
    sizes = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 256,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
    }
    (model / "config.json").write_text(json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **sizes}))  # no weights
    script = (
        "import sys\nimport moekit.eval.compare\n"
        "def refuse(*args, **kwargs):\n    raise SystemExit('a model was loaded')\n"
        "moekit.eval.compare.load_model = refuse\n"
        "from moekit.cli import main\nmain(sys.argv[1:])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script, "eval", str(model), "--task", "arc_easy", "--limit", "5", "-o", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "a model was loaded" not in done.stderr and "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "'arc_easy'" in error[0]
    assert "HF_HUB_OFFLINE" in done.stderr and "--include-path" in done.stderr
    assert not (tmp_path / "report").exists()
