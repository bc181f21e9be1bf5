"""`--config FILE.yaml` on every command, and the one usage error (exit 2) for options a model refuses."""

from __future__ import annotations

import json

import pytest
from test_build import recipe_text

from moekit.cli import COMMANDS
from moekit.testing import run_cli, tiny_config


@pytest.fixture(scope="module")
def mixtral_config(tmp_path_factory):
    """A config.json alone: enough for `moekit plan` and for `moekit eval` up to its data checks."""
    path = tmp_path_factory.mktemp("config_cli") / "mixtral"
    tiny_config("mixtral", 384, architectures=["MixtralForCausalLM"]).save_pretrained(path)
    return path


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_a_config_and_refuses_unknown_keys(name, tmp_path, capsys):
    config = write(tmp_path / "c.yaml", "colour: red\n")
    code, output = run_cli([name, *([] if name == "demo" else ["anything"]), "--config", str(config)], capsys)
    assert code == 2 and "Traceback" not in output
    assert "c.yaml: unknown option 'colour' (options: " in output


def test_plan_config_values_take_effect_and_flags_override_them(mixtral_config, tmp_path, capsys):
    config = write(tmp_path / "plan.yaml", "lora_r: 8\nbatch-size: 1\nmax_seq_len: 128\ntarget: [experts, gate]\nexperts: [0, 2]\njson: true\n")
    code, output = run_cli(["plan", str(mixtral_config), "--config", str(config)], capsys)
    assert code == 0, output
    options = json.loads(output)["options"]
    assert (options["lora_r"], options["batch_size"], options["max_seq_len"], options["target"], options["experts"]) == (8, 1, 128, ["experts", "gate"], [0, 2])
    code, output = run_cli(["plan", str(mixtral_config), "--config", str(config), "--lora-r", "4", "--target", "attn", "--experts", ""], capsys)
    options = json.loads(output)["options"]
    assert code == 0 and (options["lora_r"], options["target"], options["experts"], options["batch_size"]) == (4, ["attn"], None, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rank: 8\n", "{config}: unknown option 'lora_rank' (did you mean 'lora_r'?)"),
        ("lora_r: 0\n", "invalid lora_r in {config}: Input should be greater than or equal to 1"),
        ("bits: 3\n", "{config}: bits: 3 is not one of '4', '8', '16'"),
        ("max_seq_len: lots\n", "{config}: max_seq_len: 'lots' is not a valid integer"),
        ("target: [attn, mlp]\n", "invalid target in {config}: unknown target 'mlp'"),
        ("- lora_r\n", "must be a mapping of option names to values"),
        ("lora_r: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_config_values_are_one_usage_error(mixtral_config, tmp_path, capsys, text, message):
    config = write(tmp_path / "plan.yaml", text)
    code, output = run_cli(["plan", str(mixtral_config), "--config", str(config)], capsys)
    assert code == 2 and "Traceback" not in output
    assert message.format(config=config) in output


def test_build_dry_run_takes_its_options_from_the_config(llama_family, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", recipe_text(llama_family))
    config = write(tmp_path / "build.yaml", "dtype: float16\ndry-run: true\ndevice: cpu\n")
    code, output = run_cli(["build", str(recipe), "--config", str(config)], capsys)
    assert code == 0 and "(float16, " in output and "dry run: nothing was written" in output
    code, output = run_cli(["build", str(recipe), "--config", str(config), "--dtype", "bfloat16"], capsys)
    assert code == 0 and "(bfloat16, " in output


def test_build_option_errors_are_usage_errors_and_write_nothing(llama_family, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", recipe_text(llama_family))
    out = tmp_path / "out"
    code, output = run_cli(["build", str(recipe), "-o", str(out), "--shard-size", "lots"], capsys)
    assert code == 2 and "invalid --shard-size: cannot read size 'lots'" in output and "Traceback" not in output
    config = write(tmp_path / "build.yaml", "gate_batch_size: 0\n")
    code, output = run_cli(["build", str(recipe), "-o", str(out), "--config", str(config)], capsys)
    assert code == 2 and f"invalid gate_batch_size in {config}: Input should be greater than or equal to 1" in output
    assert not out.exists()


def test_finetune_takes_data_and_launch_options_from_the_config(tmp_path, capsys):
    """Checked before any model is loaded: a config's data satisfies --data, and its values meet the same checks."""
    config = write(tmp_path / "ft.yaml", "data: chat.jsonl\nout: tuned\nnum-processes: 2\n")
    code, output = run_cli(["finetune", "some-moe", "--config", str(config)], capsys)
    assert code == 2 and "--num-processes needs --fsdp or --ddp" in output  # not 'missing option --data' / '-o'
    config = write(tmp_path / "ft.yaml", "data: chat.jsonl\nout: tuned\nfsdp: true\nbits: 8\n")
    code, output = run_cli(["finetune", "some-moe", "--config", str(config)], capsys)
    assert code == 2 and "--fsdp needs --bits 4 or 16" in output
    code, output = run_cli(["finetune", "some-moe", "--config", str(config), "--target", "atn"], capsys)
    assert code == 2 and "invalid --target: unknown target 'atn'" in output
    config = write(tmp_path / "ft.yaml", "out: tuned\n")
    code, output = run_cli(["finetune", "some-moe", "--config", str(config)], capsys)
    assert code == 2 and "missing option --data" in output


def test_eval_takes_sets_from_the_config_and_the_flag_overrides_them(mixtral_config, tmp_path, capsys):
    config = write(tmp_path / "eval.yaml", f"data:\n  code: {tmp_path / 'config-set.txt'}\nout: {tmp_path / 'report'}\ndevice: cpu\n")
    code, output = run_cli(["eval", str(mixtral_config), "--config", str(config)], capsys)
    assert code == 1 and "config-set.txt does not exist" in output  # read before any model is loaded
    code, output = run_cli(["eval", str(mixtral_config), "--config", str(config), "--data", f"prose={tmp_path / 'flag-set.txt'}"], capsys)
    assert code == 1 and "flag-set.txt does not exist" in output and "config-set.txt" not in output
    code, output = run_cli(["eval", str(mixtral_config), "--config", str(config), "--data", "justapath.txt"], capsys)
    assert code == 2 and "expected NAME=PATH, got 'justapath.txt'" in output
    assert not (tmp_path / "report").exists()
