"""The `moekit` command.

Subcommands live in `moekit.commands.<name>` and are imported only when they run, so `moekit --help`
stays fast and does not import torch. This is the only module that exits: library code raises
`MoekitError`, which is printed here as one message with a non-zero exit code.

Exit codes: 1 for a `MoekitError` (input the library refused: a missing model, an unreadable data file),
2 for a usage error (a bad flag or --config value: click's convention, one mapping in `moekit.commands.options`),
130 for Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from moekit import __version__
from moekit.errors import MoekitError

# name -> (module under moekit.commands, one-line help shown by `moekit --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("build", "Assemble an MoE from dense checkpoints described by a recipe."),
    "finetune": ("finetune", "QLoRA fine-tune an MoE (attention, chosen experts and/or routers)."),
    "export": ("export", "Merge a fine-tuned adapter and routers into a standard checkpoint."),
    "eval": ("eval", "Evaluate an MoE against its source models, with routing statistics."),
    "plan": ("plan", "Predict the GPU memory of a fine-tune before loading anything."),
    "publish": ("publish", "Upload a model to the Hugging Face Hub with a generated model card."),
    "demo": ("demo", "The whole pipeline offline on a tiny zoo of trained domain experts."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"moekit.commands.{COMMANDS[name][0]}")
        return module.command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = click.utils.make_str(args[0])
        if self.get_command(ctx, name) is None and not name.startswith("-"):
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{suggestion} (commands: {', '.join(self.list_commands(ctx))})")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moekit")
@click.option("-v", "--verbose", is_flag=True, help="Also show the warnings and log lines of torch, transformers, TRL and bitsandbytes that moekit hides.")
def cli(verbose: bool) -> None:
    """moekit: build mixture-of-experts models out of dense checkpoints, fine-tune them with QLoRA,
    evaluate them against their sources and publish them to the Hugging Face Hub.

    Start with `moekit demo` (offline, CPU, a few minutes), then `moekit build recipes/4x7b.yaml`.
    """
    if not verbose:
        from moekit.console import quiet_third_party

        quiet_third_party()
    from moekit import zoo

    zoo.register()  # `zoo:NAME` sources in recipes and model arguments


def _interrupt(signum, frame) -> None:
    """SIGTERM cleans up like Ctrl-C (staged output removed, OUT as it was): it raises KeyboardInterrupt.
    Raised inside an import, the exception can reach a C extension's initialisation, which aborts the
    interpreter ("Fatal Python error", exit 134); so during an import it is delivered again 50 ms later,
    by SIGALRM, until the import is over. Clean-ups that must not stop half-way hold signals (`signals_held`)."""
    if _importing(frame):
        signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise KeyboardInterrupt


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored for the duration (a clean-up that must not stop half-way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning MoekitError, Ctrl-C and SIGTERM into a message and an exit code."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, prog_name="moekit", standalone_mode=False)
    except MoekitError as err:
        click.secho(f"error: {err.message}", fg="red", err=True)
        if err.hint:
            click.echo(f"  hint: {err.hint}", err=True)
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo(f"interrupted: {_interrupted_message(sys.argv[1:] if argv is None else argv)}", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


def _interrupted_message(argv: list[str]) -> str:
    """What an interrupted command left: only a fine-tune that saved a checkpoint keeps something (OUT.partial)."""
    nothing = "nothing was written; the output directory is as it was before"
    if next((arg for arg in argv if arg in COMMANDS), None) != "finetune":
        return nothing
    out = _flag_value(argv, "-o", "--out") or _config_value(_flag_value(argv, "--config"), "out")
    if out is None or not Path(f"{out}.partial").is_dir():  # the trainer removes it when no checkpoint was saved
        return nothing
    return f"{out} is as it was before; the checkpoints saved so far are in {out}.partial: run the same command with --resume to continue"


def _flag_value(argv: list[str], *flags: str) -> str | None:
    value = next((value for flag, value in zip(argv, argv[1:]) if flag in flags), None)
    return value or next((arg.split("=", 1)[1] for arg in argv if arg.split("=", 1)[0] in flags and "=" in arg), None)


def _config_value(config: str | None, key: str):
    """`key` from a --config file, for messages written after the command has gone (None when unreadable)."""
    if config is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data.get(key) if isinstance(data, dict) else None


if __name__ == "__main__":
    main()
