"""`moekit eval MODEL [--against SRC ...] [--data NAME=PATH ...] [--task T ...] -o REPORT_DIR`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.errors import DataError


def _parse_data(values: tuple[str, ...]) -> dict[str, str]:
    data: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise DataError(f"--data expects NAME=PATH (or NAME=hf:dataset[:split]), got '{value}'")
        if name in data:
            raise DataError(f"--data names the set '{name}' twice")
        data[name.strip()] = spec.strip()
    return data


@click.command("eval")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Report directory (report.json, report.md, PNG charts).")
@click.option("--against", multiple=True, metavar="SRC", help="Source model to compare with (repeatable) [default: base and experts from MODEL/moekit.json].")
@click.option("--data", multiple=True, metavar="NAME=PATH", help="Evaluation set (repeatable): text file (blank-line separated documents), .jsonl (text or messages) or hf:dataset[:split] / hf:dataset:config:split.")
@click.option("--task", "tasks", multiple=True, metavar="TASK", help="lm-evaluation-harness task (repeatable; needs `pip install 'moekit[lm-eval]'`).")
@click.option("--include-path", multiple=True, metavar="DIR", help="Directory with local lm-eval task YAML files (repeatable).")
@click.option("--adapter", metavar="FINETUNE_DIR", default=None, help="Also evaluate MODEL fine-tuned by `moekit finetune` (adapter + routers).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Device to evaluate on.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True, help="Weights dtype (auto: the checkpoint's on cuda, float32 on cpu).")
@click.option("--load-in-4bit", is_flag=True, help="Load every model with bitsandbytes NF4 weights.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Documents per forward pass.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True, help="Longest scored document in tokens (longer ones are truncated).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many documents per set / examples per task.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the models' repositories.")
@click.option("--overwrite", is_flag=True, help="Replace REPORT_DIR if it exists and is not empty.")
def command(model: str, out: Path, against: tuple[str, ...], data: tuple[str, ...], tasks: tuple[str, ...], include_path: tuple[str, ...], **options) -> None:
    """Evaluate the MoE at MODEL against each of its source models, side by side.

    Perplexity, mean token loss and bits per byte per evaluation set for the MoE and every source
    (each with its own tokenizer), lm-eval benchmark tasks, and the MoE's routing statistics per layer.
    Without --data, each expert's positive prompts form a small sanity set.
    """
    from moekit.eval.compare import evaluate
    from moekit.eval.options import EvalOptions

    eval_options = EvalOptions(against=list(against) or None, data=_parse_data(data), tasks=list(tasks), include_path=list(include_path), **options)
    result = evaluate(model, out, eval_options)
    click.echo(result.markdown_table())
    routing = result.report.get("routing")
    if routing:
        click.echo(f"routing: mean entropy {routing['mean_entropy']:.3f} nats (max {routing['max_entropy']:.3f}), mean load CV {routing['mean_load_cv']:.3f}")
    click.echo(f"report written to {out}: {', '.join(result.files)}")
