"""`moekit plan MODEL [finetune options] [--gpu-memory 24GB] [--json] [--config FILE.yaml]`."""

from __future__ import annotations

import json

import click

from moekit.commands.options import config_option, model_options, parse_options
from moekit.finetune.options import TrainingOptions


def _gpu_memory(_ctx, _param, value: str | None) -> int | None:
    if value is None:
        return None
    from moekit.units import parse_size

    try:
        size = parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if size <= 0:
        raise click.BadParameter(f"must be positive, got {value!r}")
    return size


@click.command("plan")
@click.argument("model")
@model_options(TrainingOptions)
@click.option(
    "--gpu-memory",
    callback=_gpu_memory,
    metavar="SIZE",
    default=None,
    help="Memory of the GPU to check against, e.g. 24GB, 16GiB or 80e9: adds a verdict, the "
    "largest batch size and sequence length that fit, and the setting to change first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
@config_option
def command(model: str, gpu_memory: int | None, as_json: bool, **options) -> None:
    """Predict the GPU memory of `moekit finetune MODEL` with the same options, from MODEL's config
    alone (a local directory, a config.json, a Hub id or zoo:NAME; no weights are read).

    Prints weights by part (attention, experts, routers, embeddings, 4-bit constants), trainable
    parameters, gradients, optimizer states, activations and the predicted peak, plus total and
    active parameters and the checkpoint size on disk.
    """
    from moekit.console import status
    from moekit.plan import estimate

    parsed = parse_options(TrainingOptions, options)
    with status("reading the config (loading transformers)"):
        plan = estimate(model, parsed, gpu_memory=gpu_memory)
    click.echo(json.dumps(plan.to_dict(), indent=2) if as_json else plan.render())
