"""`moekit build RECIPE.yaml -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.build.options import BuildOptions
from moekit.commands.options import config_option, model_options, parse_options


@click.command("build")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="Output directory [default: ./<recipe name>].")
@click.option("--dry-run", is_flag=True, help="Print the plan (architecture, parameters, output size, tensor sources) and write nothing.")
@model_options(BuildOptions, metavars={"shard_size": "SIZE"})
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Upload the result to this Hub repository afterwards.")
@config_option
def command(recipe: Path, out: Path | None, dry_run: bool, push_to_hub: str | None, **options) -> None:
    """Assemble a mixture-of-experts model from the dense checkpoints described by RECIPE.

    RECIPE is a mergekit-moe YAML file (base_model, gate_mode, dtype, experts_per_token, experts with
    source_model and positive/negative prompts); moekit's own settings go under a `moekit:` key.
    Sources are local directories, Hub ids (org/name[@revision]) or zoo:NAME.

    Gate modes: hidden (mergekit's default; also hidden_last), hidden_avg, cheap_embed, random,
    uniform_random, and calibrated (routers fitted on the tokens each router actually sees, from the
    prompts and optional per-expert calibration data). See the README for details.
    """
    from moekit.console import status
    from moekit.recipe import load_recipe
    from moekit.units import format_count, format_size

    # bad options and a missing or invalid recipe are reported before torch is imported
    build_options = parse_options(BuildOptions, options)
    parsed = load_recipe(recipe)
    for note in parsed.notes:
        click.echo(f"note: {note}", err=True)
    with status("loading torch and mergekit"):
        from moekit.build.pipeline import build, plan
    out = out or Path(recipe.stem)
    if dry_run:
        result = plan(parsed, build_options)
        _print_plan(result, format_size)
        return
    result = build(parsed, out, build_options, recipe_text=recipe.read_text(encoding="utf-8"))
    click.echo(
        f"built {result.plan.architecture} MoE: {len(parsed.experts)} experts, top-{parsed.experts_per_token}, "
        f"{format_count(result.plan.parameters_total)} parameters ({format_count(result.plan.parameters_active)} active per token) -> {out}"
    )
    if result.routing:
        shares = result.routing["own_expert_share"]["mean_per_expert"]
        click.echo(
            "share of each expert's prompts routed to it (mean over layers): "
            + ", ".join(f"{i}: {'n/a' if s is None else f'{s:.0%}'}" for i, s in enumerate(shares))
        )
    if push_to_hub:
        from moekit.publish import publish

        published = publish(out, push_to_hub)
        click.echo(f"published to {published.url}")


def _print_plan(result, format_size) -> None:
    experts = getattr(result.config, "num_local_experts", None) or result.config.num_experts  # Mixtral/Phixtral, Qwen2-MoE
    click.echo(
        f"architecture:  {result.architecture} ({experts} experts, top-{result.config.num_experts_per_tok}, "
        f"{result.config.num_hidden_layers} layers, hidden {result.config.hidden_size})"
    )
    click.echo(f"parameters:    {result.parameters_total:,} total, {result.parameters_active:,} active per token")
    click.echo(f"output size:   {format_size(result.output_bytes)} ({str(result.config.dtype).removeprefix('torch.')}, {len(result.tensors)} tensors)")
    click.echo("tensor sources:")
    for pattern, source, count in result.sources_summary():
        click.echo(f"  {pattern:<58} <- {source} ({count})")
    click.echo("dry run: nothing was written")
