"""`moekit finetune MODEL --data DATA -o OUT [options]`."""

from __future__ import annotations

from pathlib import Path

import click

from moekit.commands.options import config_option, model_options, parse_options
from moekit.finetune.options import FinetuneOptions


@click.command("finetune")
@click.argument("model")
@click.option(
    "-o", "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output directory (adapter, routers, log, loss plot, checkpoints)."
)
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Upload the result to this Hub repository afterwards.")
@click.option(
    "--fsdp",
    "launch_kind",
    flag_value="fsdp",
    default=None,
    help="Shard the (4-bit) model across the GPUs with FSDP: re-runs this command under `accelerate launch` with moekit's fsdp_qlora.yaml.",
)
@click.option(
    "--ddp",
    "launch_kind",
    flag_value="ddp",
    help="Data parallel, one model copy per GPU: re-runs this command under `accelerate launch` with moekit's ddp.yaml.",
)
@click.option("--num-processes", "num_processes", type=click.IntRange(min=2), default=None, help="Processes for --fsdp/--ddp [default: one per visible GPU].")
@model_options(FinetuneOptions)
@config_option
def command(model: str, out: Path, push_to_hub: str | None, launch_kind: str | None, num_processes: int | None, **options) -> None:
    """QLoRA fine-tune the MoE at MODEL (a `moekit build` output, a Mixtral/Phixtral checkpoint, a Hub id
    or zoo:NAME) on chat data, with every expert in 4-bit.

    Trains LoRA adapters on attention and/or chosen experts and the routers in full (--target),
    with loss on assistant tokens only and the router load-balancing loss logged apart. Before
    training it prints what is trainable; afterwards it checks that every target changed.
    Checkpoints live in OUT.partial until the run finishes; --resume continues from the newest.
    Several GPUs: --fsdp or --ddp (or `accelerate launch -m moekit finetune ...` with your own config).
    """
    from moekit.console import status

    # every argument is checked before torch, transformers and TRL are imported (seconds of start-up)
    parsed = parse_options(FinetuneOptions, options)
    if push_to_hub:
        _check_push(model, push_to_hub)
    if num_processes is not None and launch_kind is None:
        raise click.UsageError("--num-processes needs --fsdp or --ddp")
    if launch_kind == "fsdp" and parsed.bits == 8:  # no quant_storage for LLM.int8 weights: FSDP cannot flatten them with the rest
        raise click.UsageError("--fsdp needs --bits 4 or 16: bitsandbytes' 8-bit weights cannot be sharded by FSDP (use --ddp)")
    if launch_kind == "fsdp" and parsed.offload_activations:  # FSDP2 frees and gathers weights around the same hooks: untested
        raise click.UsageError("--offload-activations is not verified under --fsdp; drop it, or use --ddp")
    with status("loading torch, transformers and TRL"):
        from moekit.build.arch.qwen2_moe import refuse_for
        from moekit.finetune.trainer import check_inputs, finetune
    refuse_for("finetune", model)
    if launch_kind is not None:
        from moekit.finetune import distributed

        count = distributed.process_count(launch_kind, num_processes)
        check_inputs(model, out, parsed)  # once here rather than once per process
        arguments = distributed.finetune_arguments(model, out, options)
        click.echo(f"launching {count} processes: {distributed.command_line(launch_kind, count, arguments)}")
        distributed.launch(launch_kind, count, arguments)
    else:
        from moekit.finetune.distributed import is_main_process

        result = finetune(model, out, parsed, echo=click.echo)
        if not is_main_process():
            return  # rank 0 reports and uploads
        _report(result, out)
    if push_to_hub:
        from moekit.publish import publish

        published = publish(out, push_to_hub)
        click.echo(f"published to {published.url}")


def _check_push(model: str, repo_id: str) -> None:
    """What `publish` would refuse after training, refused before it: a bad repo id, a base that is not on the Hub."""
    from moekit.errors import PublishError
    from moekit.publish.card import is_hub_ref
    from moekit.publish.hub import REPO_ID

    if not REPO_ID.match(repo_id):
        raise PublishError(f"--push-to-hub '{repo_id}' is not a Hub repository id", hint="write it as USER/NAME or ORG/NAME")
    if not is_hub_ref(model, {}):
        raise PublishError(
            f"--push-to-hub: the fine-tune would start from {model}, which is not a Hub "
            "repository, so its card could not name its base model; nothing was trained",
            hint="fine-tune the MoE by its Hub id, or leave out --push-to-hub and afterwards run "
            "`moekit publish OUT --repo-id REPO --base-model USER/MOE` once the MoE is on the Hub",
        )


def _report(result, out: Path) -> None:
    click.echo(
        f"trained {result.steps} steps: loss {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}"
        + (f" (LM loss {_fmt(result.losses.get('lm_first'))} -> {_fmt(result.losses.get('lm_last'))})" if "lm_first" in result.losses else "")
    )
    if result.peak_memory_bytes is not None:
        click.echo(f"measured peak GPU memory: {result.peak_memory_bytes / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)")
    click.echo(f"wrote {out}" + (f" (adapter: {result.adapter_dir})" if result.adapter_dir else " (routers only)"))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
