"""Nothing lost, nothing half-trusted: moekit under kills, full disks, concurrent runs and hostile inputs.

Kills are real: a child process runs moekit's own code and is stopped with SIGKILL or SIGTERM at a
chosen point, reached deterministically by wrapping one moekit function in the child (never by a hook
in moekit itself). Each test checks that nothing is lost: the old OUT byte for byte, the newest
complete checkpoint, no pickle payload run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_build import recipe_text

from moekit.errors import OutputError
from moekit.output import lock_path, staged_output, staging_dir
from moekit.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def old_output(out: Path) -> dict[str, bytes]:
    (out / "sub").mkdir(parents=True)
    (out / "report.md").write_text("the complete old report\n")
    (out / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    return snapshot(out)


def spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the child ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.communicate()
            raise AssertionError("the child never reached the point")
        time.sleep(0.05)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


# A moekit command that stages OUT like build/eval/export, with the body and one patch chosen by the test.
WRITER = """
import os, signal, sys, time
from pathlib import Path
import click
import moekit.output as output
from moekit.cli import cli, main

{patch}

@click.command("write")
@click.argument("out", type=click.Path(path_type=Path))
def write(out):
    with output.staged_output(out, overwrite=True) as staging:
        (staging / "report.md").write_text("the new report\\n")
        {body}

cli.get_command = lambda ctx, name: write
main(["write", sys.argv[1]])
"""


def writer(patch: str = "", body: str = "pass") -> str:
    return WRITER.format(patch=textwrap.dedent(patch), body=body)


# --- outputs: atomic replacement, stale staging, locks, umask ------------------------------------------


@pytest.mark.parametrize("point", ["before", "after"])
def test_overwrite_killed_at_the_swap_leaves_a_whole_out(tmp_path, point):
    """SIGKILL right before or right after OUT is replaced: OUT is the whole old or the whole new output, never missing."""
    out = tmp_path / "out"
    before = old_output(out)
    patch = f"""
    real = output.exchange
    def exchange(a, b):
        if "{point}" == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        done = real(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    output.exchange = exchange
    """
    code, stderr = finish(spawn(writer(patch), str(out)))
    assert code == -signal.SIGKILL, stderr
    assert snapshot(out) == (before if point == "before" else {"report.md": b"the new report\n"})
    assert not (tmp_path / ".out.moekit-old").exists()


def test_kill_between_two_plain_renames_is_undone_by_the_next_run(tmp_path, capsys):
    """Where no atomic exchange exists, OUT is set aside and the next run puts it back, saying so."""
    out = tmp_path / "out"
    before = old_output(out)
    patch = """
    output.exchange = lambda a, b: False
    real_rename = Path.rename
    def rename(self, target):
        result = real_rename(self, target)
        if Path(target).name == ".out.moekit-old":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    Path.rename = rename
    """
    code, stderr = finish(spawn(writer(patch), str(out)))
    assert code == -signal.SIGKILL, stderr
    assert not out.exists() and (tmp_path / ".out.moekit-old").is_dir()  # the window the next run repairs
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True):
        raise RuntimeError("the next run fails too")
    assert snapshot(out) == before
    assert "restored" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_left_by_a_killed_run_is_removed_with_a_note(tmp_path, capsys):
    out = tmp_path / "out"
    before = old_output(out)
    process = spawn(writer(body="os.kill(os.getpid(), signal.SIGKILL)"), str(out))
    code, stderr = finish(process)
    assert code == -signal.SIGKILL, stderr
    assert snapshot(out) == before
    assert (staging_dir(out) / "report.md").is_file()  # the killed run's leftovers
    with staged_output(out, overwrite=True) as staging:
        assert list(staging.iterdir()) == []
        (staging / "new.txt").write_text("new")
    note = capsys.readouterr().err
    assert f"removed {staging_dir(out)}" in note and f"PID {process.pid}" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    before = old_output(out)
    started = tmp_path / "started"
    process = spawn(writer(body=f"Path({str(started)!r}).touch(); time.sleep(120)"), str(out))
    try:
        wait_until(started.exists, process)
        with pytest.raises(OutputError, match=f"another moekit process \\(PID {process.pid}\\)"), staged_output(out, overwrite=True):
            pytest.fail("the second run must not start")
        # a fine-tune into the same OUT takes the same lock, before it reads anything
        code, output = run_cli(["finetune", str(tmp_path / "no-model"), "--data", "x.jsonl", "-o", str(out)], capsys)
        assert code != 0 and f"PID {process.pid}" in output and "Traceback" not in output
        assert snapshot(out) == before
    finally:
        process.kill()
        process.communicate()


def test_a_lock_taken_a_moment_ago_is_refused_naming_its_holder_not_a_killed_one(tmp_path):
    """The holder writes its PID just after its flock; a run refused in between must not name nothing,
    nor the PID a killed earlier holder left in the file."""
    out = tmp_path / "out"
    lock = lock_path(out.absolute())
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    lock.write_text(str(killed.pid))  # what a killed run leaves
    locked = tmp_path / "locked"
    holder = spawn(
        f"""
        import fcntl, os, time
        from pathlib import Path
        fd = os.open({str(lock)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        Path({str(locked)!r}).touch()
        time.sleep(0.5)  # the window between the lock and the PID, widened
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        time.sleep(120)
        """
    )
    try:
        wait_until(locked.exists, holder)
        with pytest.raises(OutputError, match=f"another moekit process \\(PID {holder.pid}\\)"), staged_output(out, overwrite=True):
            pytest.fail("the second run must not start")
    finally:
        holder.kill()
        holder.communicate()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_outputs_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with staged_output(tmp_path / "out", overwrite=False) as staging:
            (staging / "x").mkdir()
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "x").stat().st_mode & 0o777 == 0o777 & ~umask


def test_sigterm_during_an_import_is_delivered_after_it(tmp_path):
    """SIGTERM raised inside an import could reach a C extension's initialisation and abort Python: it waits for the import."""
    module = tmp_path / "slow_module.py"
    marker = tmp_path / "imported"
    module.write_text(
        textwrap.dedent(f"""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        open({str(marker)!r}, "w").close()
    """)
    )
    script = f"""
    import sys, time, click
    from moekit.cli import cli, main
    sys.path.insert(0, {str(tmp_path)!r})

    @click.command("imp")
    def imp():
        import slow_module  # noqa: F401
        time.sleep(30)

    cli.get_command = lambda ctx, name: imp
    main(["imp"])
    """
    code, stderr = finish(spawn(script))
    assert code == 130, stderr
    assert marker.exists(), "the import was cut off"
    assert "interrupted" in stderr and "Traceback" not in stderr and "Fatal Python error" not in stderr


def test_output_that_is_the_current_directory_is_refused(tmp_path, capsys, monkeypatch, llama_family):
    (tmp_path / "r.yaml").write_text(recipe_text(llama_family, "random"))
    monkeypatch.chdir(tmp_path)
    code, output = run_cli(["build", "r.yaml", "-o", ".", "--overwrite"], capsys)
    assert code != 0 and "current directory" in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only file system (a tmpfs mounted read-only), else one without write permission."""
    directory = tmp_path / "ro"
    directory.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], capture_output=True, check=False).returncode == 0
    )
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        directory.chmod(0o555)
    yield directory
    if mounted:
        subprocess.run(["umount", str(directory)], check=False)
    else:
        directory.chmod(0o755)


def test_read_only_output_parent_is_refused_before_any_work(read_only_dir, tmp_path, capsys, llama_family):
    (tmp_path / "r.yaml").write_text(recipe_text(llama_family, "random"))
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(read_only_dir / "out")], capsys)
    assert code != 0 and "Traceback" not in output and str(read_only_dir) in output, output
    assert "writing tensors" not in output
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    code, output = run_cli(["finetune", str(llama_family["base"]), "--target", "attn", "--data", str(data), "-o", str(read_only_dir / "ft")], capsys)
    assert code != 0 and "Traceback" not in output and str(read_only_dir) in output and "trainable" not in output, output


# --- build: the pickle gate and unreadable sources ----------------------------------------------------


class Payload:
    """Unpickling this runs `open(marker, 'w')`: the marker file proves whether the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("layout", ["decoy", "index"])
def test_pickle_is_refused_for_the_file_that_would_be_read(tmp_path, capsys, llama_family, monkeypatch, layout):
    """pytorch_model.bin beside an unrelated decoy.safetensors, or a safetensors index naming a .bin shard."""
    import pickle

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own guard off: only moekit's stands
    marker = tmp_path / "payload-ran"
    source = tmp_path / "evil"
    shutil.copytree(llama_family["e1"], source)
    (source / "model.safetensors").rename(source / ("decoy.safetensors" if layout == "decoy" else "model-00001-of-00001.safetensors"))
    bin_name = "pytorch_model.bin" if layout == "decoy" else "extra.bin"
    (source / bin_name).write_bytes(pickle.dumps({"x": Payload(marker)}))
    if layout == "index":
        (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors", "b": bin_name}}))
    (tmp_path / "r.yaml").write_text(recipe_text(dict(llama_family, e1=source), "random"))
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")], capsys)
    assert code != 0 and "pickle" in output and bin_name in output and "--allow-pickle" in output and "Traceback" not in output, output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_source_is_one_message(tmp_path, capsys, llama_family):
    source = tmp_path / "cut"
    shutil.copytree(llama_family["e1"], source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "r.yaml").write_text(recipe_text(dict(llama_family, e1=source), "random"))
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")], capsys)
    assert code != 0 and "Traceback" not in output and "not a readable safetensors file" in output and str(weights) in output, output
    assert not (tmp_path / "out").exists()


def test_custom_tokenizer_code_needs_trust_remote_code(tmp_path, capsys, llama_family):
    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "r.yaml").write_text(recipe_text(dict(llama_family, base=base), "random"))
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")], capsys)
    assert code != 0 and "Traceback" not in output and "--trust-remote-code" in output, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt, expected", [("", "is empty"), ("   ", "is empty"), ("a\\0b", "NUL"), ("a\\ud800b", "lone surrogate")])
def test_prompts_that_cannot_be_routed_are_refused(tmp_path, capsys, llama_family, prompt, expected):
    text = recipe_text(llama_family).replace('positive_prompts: ["', f'positive_prompts: ["{prompt}", "', 1)
    (tmp_path / "r.yaml").write_text(text)
    code, output = run_cli(["build", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")], capsys)
    assert code != 0 and expected in output and "experts.0.positive_prompts" in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


def test_reports_and_cards_never_hold_nan(tmp_path):
    """A prompt set without a routed token gives no share: null in routing.json, n/a in the card."""
    import torch

    from moekit.build.report import write_routing_report
    from moekit.publish.card import _routing_section, inspect_directory
    from moekit.recipe import parse_recipe

    recipe = parse_recipe("base_model: b\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: a\n  - source_model: c\n")
    # (layers, prompt sets, experts): expert 1's prompt set routed no token, so its shares are 0/0
    shares = torch.tensor([[[0.75, 0.25], [float("nan"), float("nan")]]])
    report = write_routing_report(tmp_path / "routing", shares, recipe)
    text = (tmp_path / "routing" / "routing.json").read_text()
    assert "NaN" not in text and report["own_expert_share"]["mean_per_expert"][1] is None
    card = "".join(_routing_section(inspect_directory(tmp_path)))
    assert "n/a" in card and "nan" not in card.lower()


# --- fine-tune: checkpoints, resume, OUT.partial -------------------------------------------------------

QUICK = {"batch_size": 4, "max_seq_len": 64, "lora_r": 8, "learning_rate": 5e-3, "lora_dropout": 0.0, "target": ["attn", "gate"]}


@pytest.fixture(scope="module")
def moe(random_moe) -> Path:
    return random_moe


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    from test_finetune_train import toy_conversations, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", toy_conversations(16))


def finetune_args(moe: Path, data: Path, out: Path, steps: int = 6, save_steps: int = 2, **extra) -> list[str]:
    args = [
        "finetune",
        str(moe),
        "--data",
        str(data),
        "-o",
        str(out),
        "--max-steps",
        str(steps),
        "--save-steps",
        str(save_steps),
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--lora-r",
        "8",
        "--learning-rate",
        "5e-3",
        "--lora-dropout",
        "0",
        "--target",
        "attn,gate",
        "--no-gradient-checkpointing",
    ]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# In the child: stop the run while the checkpoint of `step` is half written (adapter saved, optimizer not yet).
MID_CHECKPOINT = """
import json, os, signal, sys
from moekit.finetune import trainer
from moekit.cli import main

real = trainer.MoeSFTTrainer._save_optimizer_and_scheduler
def save(self, output_dir):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.{signal})
    return real(self, output_dir)
trainer.MoeSFTTrainer._save_optimizer_and_scheduler = save
main(json.loads(sys.argv[1]))
"""


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_kill_mid_checkpoint_resumes_from_the_newest_complete_one(moe, chat_data, tmp_path, capsys):
    from moekit.finetune.trainer import partial_dir

    out = tmp_path / "run"
    code, stderr = finish(spawn(MID_CHECKPOINT.format(step=4, signal="SIGKILL"), json.dumps(finetune_args(moe, chat_data, out))), timeout=300)
    assert code == -signal.SIGKILL, stderr[-3000:]
    checkpoints = partial_dir(out) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]  # the cut one is not there
    assert (checkpoints / ".saving" / "checkpoint-4").is_dir()

    code, output = run_cli([*finetune_args(moe, chat_data, out), "--resume"], capsys)
    assert code == 0, output
    assert "checkpoint-2" in output
    reference = tmp_path / "reference"
    code, output = run_cli(finetune_args(moe, chat_data, reference), capsys)
    assert code == 0, output
    assert losses(out) == pytest.approx(losses(reference), rel=1e-4)
    assert not partial_dir(out).exists()


# In the child: each training step waits until the file named by argv[2] exists, so that the run holds
# OUT for as long as the test needs, however slowly the other process starts.
HELD_IN_TRAINING = """
import json, os, sys, time
from moekit.finetune import trainer
from moekit.cli import main

real = trainer.MoeSFTTrainer.training_step
def training_step(self, *args, **kwargs):
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    return real(self, *args, **kwargs)
trainer.MoeSFTTrainer.training_step = training_step
main(json.loads(sys.argv[1]))
"""


def test_two_fine_tunes_started_together_into_one_out(moe, chat_data, tmp_path):
    """Both start at once: one trains, the other is refused naming it; the log holds one run's steps in order."""
    out, go_on = tmp_path / "run", tmp_path / "go-on"
    args = json.dumps(finetune_args(moe, chat_data, out, steps=3, save_steps=100))
    processes = [spawn(HELD_IN_TRAINING, args, str(go_on)) for _ in range(2)]
    deadline = time.monotonic() + 300
    while all(process.poll() is None for process in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = [process for process in processes if process.poll() is not None]
    assert len(ended) == 1, "neither run ended while the other waited in training"
    loser, winner = ended[0], next(process for process in processes if process is not ended[0])
    code, refusal = finish(loser)
    assert code != 0 and f"another moekit process (PID {winner.pid})" in refusal and "Traceback" not in refusal, refusal
    go_on.touch()
    code, stderr = finish(winner, timeout=300)
    assert code == 0, stderr[-3000:]
    assert [r["step"] for r in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3]


def test_sigterm_mid_checkpoint_keeps_the_complete_one(moe, chat_data, tmp_path):
    from moekit.finetune.trainer import _checkpoints, partial_dir

    out = tmp_path / "run"
    code, stderr = finish(spawn(MID_CHECKPOINT.format(step=4, signal="SIGTERM"), json.dumps(finetune_args(moe, chat_data, out))), timeout=300)
    assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert [p.name for p in _checkpoints(partial_dir(out))] == ["checkpoint-2"]
    assert not (partial_dir(out) / "checkpoints" / ".saving").exists()
    assert not out.exists()


def test_full_disk_mid_checkpoint_says_so_and_keeps_the_complete_one(moe, chat_data, tmp_path, capsys, monkeypatch):
    from moekit.finetune import trainer
    from moekit.finetune.trainer import _checkpoints, partial_dir

    real = trainer.MoeSFTTrainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return real(self, output_dir)

    monkeypatch.setattr(trainer.MoeSFTTrainer, "_save_optimizer_and_scheduler", full_disk)
    out = tmp_path / "run"
    code, output = run_cli(finetune_args(moe, chat_data, out), capsys)
    assert code != 0 and "Traceback" not in output
    assert "disk is full" in output and "checkpoint-2" in output and "--resume" in output, output
    assert [p.name for p in _checkpoints(partial_dir(out))] == ["checkpoint-2"]
    assert not (partial_dir(out) / "checkpoints" / ".saving").exists()


def unfinished_run(out: Path, moe: Path, **settings) -> Path:
    """OUT.partial as a run with these settings leaves it after its checkpoint at step 2."""
    from moekit.finetune.options import FinetuneOptions
    from moekit.finetune.trainer import _record_settings, partial_dir

    staging = partial_dir(out)
    (staging / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (staging / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    _record_settings(staging, moe, FinetuneOptions(data="d", **settings))
    return staging


def test_resume_with_other_adapter_settings_is_refused_naming_them(moe, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    unfinished_run(out, moe, lora_r=8, target="attn,gate")
    code, output = run_cli([*finetune_args(moe, chat_data, out), "--lora-r", "4", "--target", "attn", "--resume"], capsys)
    assert code != 0 and "Traceback" not in output
    assert "--lora-r 8 -> 4" in output and "--target attn,gate -> attn" in output, output


def test_partial_directory_without_a_checkpoint_needs_no_resume(moe, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    staging = out.with_name("run.partial")
    (staging / "checkpoints" / ".saving" / "checkpoint-2").mkdir(parents=True)  # a run killed in its first save
    (staging / "training_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code, output = run_cli([*finetune_args(moe, chat_data, out), "--resume"], capsys)
    assert code != 0 and "no complete checkpoint" in output and "run without --resume" in output
    code, output = run_cli(finetune_args(moe, tmp_path / "missing.jsonl", out), capsys)  # a fresh run clears it, then fails on the data
    assert code != 0 and "--resume" not in output and "does not exist" in output, output
    assert f"removed {staging}" in output
    assert not staging.exists()


def test_push_to_hub_with_a_local_base_is_refused_before_training(moe, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, output = run_cli([*finetune_args(moe, chat_data, out), "--push-to-hub", "user/tuned"], capsys)
    assert code != 0 and "not a Hub repository" in output and "nothing was trained" in output and "Traceback" not in output, output
    assert "trainable" not in output and not out.exists() and not out.with_name("run.partial").exists()


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], "is empty"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', '{"messages": [broken'], "d.jsonl:2 is not valid JSON"),
        (
            [
                '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}',
            ],
            "row 2",
        ),
    ],
)
def test_bad_training_rows_are_named(moe, tmp_path, capsys, rows, expected):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(row + "\n" for row in rows))
    code, output = run_cli(finetune_args(moe, data, tmp_path / "run"), capsys)
    assert code != 0 and expected in output and "Traceback" not in output and "StopIteration" not in output, output
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# --- plan, eval and export -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["num_local_experts", "hidden_size", "num_hidden_layers"])
def test_plan_and_eval_refuse_a_config_missing_a_required_field(moe, tmp_path, capsys, field):
    model = tmp_path / "model"
    shutil.copytree(moe, model)
    config = json.loads((model / "config.json").read_text())
    del config[field]
    (model / "config.json").write_text(json.dumps(config))
    code, output = run_cli(["plan", str(model)], capsys)
    assert code != 0 and field in output and "Traceback" not in output, output
    code, output = run_cli(["eval", str(model), "-o", str(tmp_path / "report")], capsys)
    assert code != 0 and field in output and "Traceback" not in output, output
    assert not (tmp_path / "report").exists()


def test_dense_model_evaluated_with_data_is_labelled_dense(llama_family, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n\ndef add(a, b):\n    return a + b\n")
    code, output = run_cli(["eval", str(llama_family["base"]), "--data", f"t={data}", "-o", str(tmp_path / "report"), "--device", "cpu"], capsys)
    assert code == 0, output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["dense"]
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_export_has_the_overwrite_it_hints_at(moe, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    code, output = run_cli(["export", str(moe), "-o", str(out)], capsys)
    assert code != 0 and "Traceback" not in output
    code, output = run_cli(["export", "--help"], capsys)
    assert "--overwrite" in output
    code, output = run_cli(["export", str(moe), "-o", str(out), "--overwrite"], capsys)
    assert code != 0 and "not a moekit finetune output" in output  # the option exists; this directory is no fine-tune
    assert (out / "keep.txt").read_text() == "keep"


# --- the demo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_demo_overwrite_killed_keeps_the_old_report(tmp_path, kill):
    out = tmp_path / "D"
    before = old_output(out)
    env = dict(ENV, MOEKIT_CACHE=str(tmp_path / "cache"))
    process = subprocess.Popen(
        [sys.executable, "-m", "moekit", "demo", "--preset", "quick", "-o", str(out), "--overwrite"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(staging_dir(out).exists, process)  # the demo is under way
    time.sleep(1.0)
    process.send_signal(kill)
    code, stderr = finish(process)
    assert code == (-signal.SIGKILL if kill == signal.SIGKILL else 130), stderr[-3000:]
    assert snapshot(out) == before
    assert not (tmp_path / ".D.moekit-old").exists()
    if kill == signal.SIGTERM:
        assert not staging_dir(out).exists() and not lock_path(out).exists()
