"""`moekit publish DIR --repo-id USER/NAME`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.commands.options import config_option


@click.command("publish")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hub repository to create (if needed) and upload to.")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing repository keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Upload to this branch, created from main if needed [default: main].")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option(
    "--license",
    "license_",
    default=None,
    metavar="LICENSE",
    help="License for the card (a Hub license id such as apache-2.0); required when the sources' licenses disagree.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="`moekit eval` report (report.json or its directory) for the card's results [default: DIR/eval/ when present].",
)
@click.option(
    "--base-model",
    default=None,
    metavar="USER/NAME",
    help="Hub id of the MoE an adapter or fine-tune was trained on, when it was trained from a local directory.",
)
@click.option("--dry-run", is_flag=True, help="List the files and sizes that would be uploaded and print the card; touch nothing remote.")
@config_option
def command(
    model_dir: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    license_: str | None,
    report: Path | None,
    base_model: str | None,
    dry_run: bool,
) -> None:
    """Upload MODEL_DIR (a build, fine-tune, adapter or export) to the Hugging Face Hub in one commit,
    with a model card generated from what moekit recorded (sources, recipe, architecture, training, evaluation).

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Trainer checkpoints and caches
    are not uploaded.
    """
    from moekit.publish import publish
    from moekit.units import format_size

    result = publish(
        model_dir, repo_id, private=private, revision=revision, create_pr=create_pr, license=license_, dry_run=dry_run, report=report, base_model=base_model
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        click.echo(
            f"would upload {len(result.files)} files ({format_size(result.total_bytes)}) to {repo_id}"
            + (f" (branch {revision})" if revision else "")
            + (" as a pull request" if create_pr else "")
            + ":"
        )
        width = max(len(path) for path, _ in result.files)
        for path, size in result.files:
            click.echo(f"  {path:<{width}}  {format_size(size):>10}")
        click.echo("\n--- README.md (model card) ---")
        click.echo(str(result.card))
        click.echo("dry run: nothing was uploaded")
        return
    click.echo(f"uploaded {len(result.files)} files ({format_size(result.total_bytes)}) to {repo_id}: {result.url}")
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}")
    elif result.commit_url:
        click.echo(f"commit: {result.commit_url}")
