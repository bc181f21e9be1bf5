"""Benchmark tasks through lm-evaluation-harness (the optional `moekit[lm-eval]` extra).

Tasks run on the model moekit already loaded (an `HFLM` wrapping it), with lm-eval's own task
definitions and settings, so the numbers are the ones people compare. Local task definitions (YAML
files, e.g. a multiple-choice task over a local JSONL file) are found through `include_path`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from moekit.errors import DataError, DependencyError

INSTALL_HINT = "pip install 'moekit[lm-eval]'  (or: pip install lm_eval)"


def task_manager(tasks: list[str], include_path: list[str] | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`; raises DataError with close matches otherwise.

    Indexing lm-eval's thousands of built-in tasks takes seconds, so when every task is found in
    `include_path` alone, the built-in ones are not indexed.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DependencyError("lm-eval tasks were requested but lm-eval is not installed", hint=INSTALL_HINT) from None
    paths = [str(Path(p).expanduser()) for p in include_path or []]
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"lm-eval task path {path} does not exist")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=5, cutoff=0.6)
            matches = f"; close matches: {', '.join(close)}" if close else ""
            raise DataError(
                f"unknown lm-eval task '{task}'{matches}", hint="list the tasks with `lm-eval ls tasks`; local task YAML files need --include-path DIR"
            )
    return manager


def prepare_tasks(tasks: list[str], manager) -> None:
    """Build every task now, datasets included, so that a task that cannot get its data fails before any
    model is loaded: one DataError naming the task (most datasets come from the Hugging Face Hub)."""
    for task in tasks:
        try:
            manager.load([task])
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many types (network, missing files, bad YAML)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            offline = isinstance(err, OSError) or "Hub" in reason or "offline" in reason.lower()
            if offline:
                raise DataError(
                    f"lm-eval task '{task}' cannot load its dataset: {reason}",
                    hint=(
                        "its data comes from the Hugging Face Hub: run once with network access to cache it, then set "
                        "HF_HUB_OFFLINE=1 to use that cache without network (and without retries); or define a local task "
                        "over local files and pass --include-path DIR"
                    ),
                ) from None
            raise DataError(f"lm-eval task '{task}' cannot be prepared: {type(err).__name__}: {reason}") from None


def run_tasks(model, tokenizer, tasks: list[str], manager, *, batch_size: int, max_length: int, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for `model`; group tasks (e.g. mmlu) also report their subtasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from moekit.eval.metrics import model_device

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=str(model_device(model)))
    results = simple_evaluate(model=wrapped, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0)
    table = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            metrics[label] = round(float(value), 6)
        table[task] = metrics
    return table
