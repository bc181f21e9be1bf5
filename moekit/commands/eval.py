"""`moekit eval MODEL [--against SRC ...] [--data NAME=PATH ...] [--task T ...] -o REPORT_DIR`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.commands.options import config_option, model_options, parse_options
from moekit.eval.options import EvalOptions


@click.command("eval")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Report directory (report.json, report.md, PNG charts).")
@model_options(
    EvalOptions, flags={"tasks": "--task"}, metavars={"against": "SRC", "data": "NAME=PATH", "tasks": "TASK", "include_path": "DIR", "adapter": "FINETUNE_DIR"}
)
@config_option
def command(model: str, out: Path, **options) -> None:
    """Evaluate the MoE at MODEL against each of its source models, side by side.

    Perplexity, mean token loss and bits per byte per evaluation set for the MoE and every source
    (each with its own tokenizer), lm-eval benchmark tasks, and the MoE's routing statistics per layer.
    Without --data, each expert's positive prompts form a small sanity set.
    """
    from moekit.eval.compare import evaluate

    result = evaluate(model, out, parse_options(EvalOptions, options))
    click.echo(result.markdown_table())
    routing = result.report.get("routing")
    if routing:
        click.echo(f"routing: mean entropy {routing['mean_entropy']:.3f} nats (max {routing['max_entropy']:.3f}), mean load CV {routing['mean_load_cv']:.3f}")
    click.echo(f"report written to {out}: {', '.join(result.files)}")
