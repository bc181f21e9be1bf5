"""`moekit demo [-o DIR]`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.commands.options import config_option


@click.command("demo")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("moekit-demo"),
    show_default=True,
    help="Output directory (models, evaluation, report).",
)
@click.option(
    "--preset",
    type=click.Choice(["standard", "quick"]),
    default="standard",
    show_default=True,
    help="standard: the README's numbers (a few minutes on 2 CPU cores); quick: a smaller zoo and a shorter fine-tune (CI).",
)
@click.option("--steps", "finetune_steps", type=click.IntRange(min=1), default=None, help="QLoRA fine-tuning steps [default: the preset's].")
@click.option(
    "--recipe",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="MoE recipe using zoo:NAME models [default: the packaged recipes/tiny-4x.yaml].",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@config_option
def command(out: Path, preset: str, finetune_steps: int | None, recipe: Path | None, overwrite: bool) -> None:
    """The whole pipeline offline on a tiny zoo of trained domain experts.

    Makes (or reuses, from the cache: $MOEKIT_CACHE, else ~/.cache/moekit) a tiny Llama base and four
    experts trained on Python code, Python documentation prose, arithmetic and JSON records; builds the
    MoE of recipes/tiny-4x.yaml with `hidden` and `calibrated` routers (the latter from the prompts, and
    from the prompts plus each expert's training text); chooses one on a validation split; evaluates the
    MoEs against every source on each domain's held-out split and on all of them (`mixed`); QLoRA
    fine-tunes the chosen MoE on a small chat set and evaluates it again. Writes OUT/report.md, OUT/report.json and
    charts, and prints the headline table.
    """
    from moekit.demo import run_demo, summary_lines
    from moekit.eval.report import markdown_table

    report = run_demo(out, preset=preset, finetune_steps=finetune_steps, recipe=recipe, overwrite=overwrite, echo=click.echo)
    click.echo("")
    click.echo(markdown_table(report))
    click.echo("")
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {out / 'report.md'}  timings (s): " + ", ".join(f"{k} {v}" for k, v in report["demo"]["timings_s"].items()))
