"""`moekit export FINETUNE_DIR -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.commands.options import config_option


@click.command("export")
@click.argument("finetune_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output directory for the merged checkpoint.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Output dtype [default: the base MoE's].")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB or 500MB.")
@click.option(
    "--merge-into",
    type=click.Choice(["original", "dequantized"]),
    default="original",
    show_default=True,
    help="Weights the adapter is added to: the base's original unquantized weights (lower held-out perplexity on the "
    "demo), or the base's weights quantized as in training (--bits) and dequantized (exactly the trained model).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (the old OUT stays until the new one is complete).")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Upload the result to this Hub repository afterwards.")
@config_option
def command(finetune_dir: Path, out: Path, dtype: str | None, shard_size: str, merge_into: str, overwrite: bool, push_to_hub: str | None) -> None:
    """Merge the adapter and routers of a `moekit finetune` output (FINETUNE_DIR) into full-precision
    weights, written in the same layout as `moekit build` and loadable with plain transformers. By default
    the adapter is added to the base's original weights, which gave the lower held-out perplexity on the demo;
    `--merge-into dequantized` adds it to the weights it was trained against (the base quantized as in training,
    then dequantized) and writes exactly the trained model (docs/finetune.md, "Which weights to merge into").

    The export is refused, and nothing is written, unless the merged weights differ from the weights they
    were merged into exactly where the fine-tune trained adapters and routers.
    """
    from moekit.console import status
    from moekit.units import parse_size

    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--shard-size") from None
    with status("loading torch, transformers and PEFT"):
        from moekit.finetune.export import export
    export(finetune_dir, out, dtype=dtype, shard_size=shard_bytes, overwrite=overwrite, merge_into=merge_into)
    click.echo(f"exported {finetune_dir} -> {out}")
    if push_to_hub:
        from moekit.publish import publish

        published = publish(out, push_to_hub)
        click.echo(f"published to {published.url}")
