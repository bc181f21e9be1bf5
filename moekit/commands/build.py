"""`moekit build RECIPE.yaml -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("build")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="Output directory [default: ./<recipe name>].")
@click.option("--dry-run", is_flag=True, help="Print the plan (architecture, parameters, output size, tensor sources) and write nothing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Device for the gate forward passes.")
@click.option("--gate-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts (or calibration chunks) run through the base model together in the gate pass; lower it if memory is short.")
@click.option("--gate-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the gate pass's forward through the base model. Router maths is float32 either way; float32 gives the same routers on CPU and GPU.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Output dtype [default: the recipe's, else the base model's].")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB or 500MB.")
@click.option("--allow-same-experts", is_flag=True, help="Allow every expert to be the same model (only useful before training).")
@click.option("--allow-pickle", is_flag=True, help="Read checkpoints that exist only as pickle .bin files (pickles can run code).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the sources' repositories.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Upload the result to this Hub repository afterwards.")
def command(recipe: Path, out: Path | None, dry_run: bool, push_to_hub: str | None, **options) -> None:
    """Assemble a mixture-of-experts model from the dense checkpoints described by RECIPE.

    RECIPE is a mergekit-moe YAML file (base_model, gate_mode, dtype, experts_per_token, experts with
    source_model and positive/negative prompts); moekit's own settings go under a `moekit:` key.
    Sources are local directories, Hub ids (org/name[@revision]) or zoo:NAME.

    Gate modes: hidden (mergekit's default; also hidden_last), hidden_avg, cheap_embed, random,
    uniform_random, and calibrated (routers fitted on the tokens each router actually sees, from the
    prompts and optional per-expert calibration data). See the README for details.
    """
    from pydantic import ValidationError

    from moekit.console import status
    from moekit.errors import RecipeError
    from moekit.recipe import load_recipe
    from moekit.units import format_count, format_size

    parsed = load_recipe(recipe)  # a missing or invalid recipe is reported before torch is imported
    for note in parsed.notes:
        click.echo(f"note: {note}", err=True)
    with status("loading torch and mergekit"):
        from moekit.build.options import BuildOptions
        from moekit.build.pipeline import build, plan
    try:
        build_options = BuildOptions(**options)
    except ValidationError as err:
        raise RecipeError(f"invalid option: {err.errors()[0]['msg']}") from None
    out = out or Path(recipe.stem)
    if dry_run:
        result = plan(parsed, build_options)
        _print_plan(result, format_size)
        return
    result = build(parsed, out, build_options, recipe_text=recipe.read_text(encoding="utf-8"))
    click.echo(f"built {result.plan.architecture} MoE: {len(parsed.experts)} experts, top-{parsed.experts_per_token}, "
               f"{format_count(result.plan.parameters_total)} parameters ({format_count(result.plan.parameters_active)} active per token) -> {out}")
    if result.routing:
        shares = result.routing["own_expert_share"]["mean_per_expert"]
        click.echo("share of each expert's prompts routed to it (mean over layers): " + ", ".join(f"{i}: {'n/a' if s is None else f'{s:.0%}'}" for i, s in enumerate(shares)))
    if push_to_hub:
        from moekit.publish import publish

        published = publish(out, push_to_hub)
        click.echo(f"published to {published.url}")


def _print_plan(result, format_size) -> None:
    experts = getattr(result.config, "num_local_experts", None) or result.config.num_experts  # Mixtral/Phixtral, Qwen2-MoE
    click.echo(f"architecture:  {result.architecture} ({experts} experts, top-{result.config.num_experts_per_tok}, "
               f"{result.config.num_hidden_layers} layers, hidden {result.config.hidden_size})")
    click.echo(f"parameters:    {result.parameters_total:,} total, {result.parameters_active:,} active per token")
    click.echo(f"output size:   {format_size(result.output_bytes)} ({str(result.config.dtype).removeprefix('torch.')}, {len(result.tensors)} tensors)")
    click.echo("tensor sources:")
    for pattern, source, count in result.sources_summary():
        click.echo(f"  {pattern:<58} <- {source} ({count})")
    click.echo("dry run: nothing was written")
