"""`moekit finetune`: (Q)LoRA supervised fine-tuning of an MoE through TRL's SFTTrainer.

    finetune(model, out, FinetuneOptions(data=...)) -> FinetuneResult

Order of work, so that bad input fails before anything is loaded or written: targets are checked
against the config, the data against its columns and the chat template, then the model is loaded
(experts in 4-bit), adapted (`apply_targets`), trained, and checked (`verify_changed`).

Output is atomic. Training runs in the sibling directory `OUT.partial`; only a finished run is renamed
to OUT. A run that fails after saving a checkpoint leaves `OUT.partial` (checkpoints, log) in place
for `--resume`; a run that fails earlier leaves nothing (and a later run clears what a killed one left).
Checkpoints are written into `checkpoints/.saving/` and renamed into place when whole, so `--resume`
only ever sees complete ones. OUT is locked for the whole run (`moekit.output.lock_output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from moekit import __version__
from moekit.errors import (
    DataError,
    DependencyError,
    IncompatibleModelsError,
    MoekitError,
    OutputError,
    SourceError,
    TargetError,
    TrainingError,
)
from moekit.finetune.adapter import has_lora
from moekit.finetune.options import FinetuneOptions
from moekit.units import format_size

LOG_FILE = "training_log.jsonl"
SETTINGS_FILE = "run-settings.json"  # in OUT.partial: what --resume must keep the same
SAVING = ".saving"  # checkpoints/.saving/checkpoint-N: a checkpoint being written
METADATA_FILE = "moekit-finetune.json"
ROUTERS_FILE = "routers.safetensors"


@dataclass
class FinetuneResult:
    out: Path
    adapter_dir: Path | None  # None for router-only training
    steps: int
    first_loss: float | None
    last_loss: float | None
    trainable: object  # moekit.finetune.targets.TrainableTable
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated on GPU, None on CPU
    losses: dict = field(default_factory=dict)


def partial_dir(out: Path) -> Path:
    """Where a run of OUT keeps its checkpoints until it finishes."""
    return out.with_name(out.name + ".partial")


def finetune(model: str | Path, out: str | Path, options: FinetuneOptions, echo: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the MoE at `model` (path, Hub id or zoo:NAME) into `out`; `echo` receives progress lines."""
    from moekit.finetune.distributed import is_main_process
    from moekit.output import lock_output

    # one run per OUT: a second one is refused, naming the first, before it reads or writes anything
    lock = lock_output(Path(out), f"fine-tune output {out}") if is_main_process() else None
    try:
        return _finetune(model, out, options, echo)
    finally:
        if lock is not None:
            lock.release()


def _finetune(model: str | Path, out: str | Path, options: FinetuneOptions, echo: Callable[[str], None] | None) -> FinetuneResult:
    from moekit.build.sources import resolve_model
    from moekit.finetune.data import check_trainable_tokens, load_training_data
    from moekit.finetune.distributed import is_main_process

    # under `accelerate launch` every process runs this; rank 0 speaks for all
    echo = echo if echo is not None and is_main_process() else (lambda _line: None)
    out = Path(out)
    staging = partial_dir(out)
    checkpoint, model_path, config = check_inputs(model, out, options)
    if checkpoint is None and staging.exists() and is_main_process():
        from moekit.output import notice

        shutil.rmtree(staging)  # no complete checkpoint in it (check_inputs refuses otherwise): nothing to resume
        notice(f"removed {staging}, left by an earlier run that stopped before its first complete checkpoint")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=options.trust_remote_code)
    data = load_training_data(options.data, tokenizer)
    check_trainable_tokens(data, tokenizer, options.max_seq_len)
    echo(f"data: {data.describe()}")
    plan_peak = _print_plan(model_path, options, echo, on_gpu=_device().type == "cuda")
    teacher_path = resolve_model(options.teacher) if options.teacher else None
    if teacher_path is not None:
        _check_teacher(config, _load_config(teacher_path, options.trust_remote_code), options.teacher)

    from moekit.finetune.loading import load_for_training
    from moekit.finetune.targets import apply_targets, snapshot_trainable

    device = _device()
    compute_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    # FSDP flattens quantized and plain parameters together, so they must share one storage dtype.
    quant_storage = compute_dtype if _under_fsdp() else torch.uint8
    device_map = {"": device} if device.type == "cuda" else None
    base = load_for_training(
        model_path,
        bits=options.bits,
        compute_dtype=compute_dtype,
        device_map=device_map,
        quant_storage=quant_storage,
        trust_remote_code=options.trust_remote_code,
    )
    from transformers import set_seed

    set_seed(options.seed)  # LoRA initialisation draws from the global generator
    peft_model, table = apply_targets(base, options)
    echo(table.render())
    if options.nf4_gemm:
        from moekit.finetune import nf4_grouped_mm
        from moekit.finetune.expert_storage import read_nf4_in_gemms

        switched = read_nf4_in_gemms(peft_model)
        nf4_grouped_mm.launches.clear()  # the first step's line counts this run's GEMMs
        if device.type != "cuda":
            echo("--nf4-gemm: its kernel needs a CUDA GPU; the expert projections are dequantized as usual")
        elif not switched:
            echo("--nf4-gemm: this model has no NF4 expert blocks; nothing changes")
    from moekit.finetune import experts

    experts.MEMORY_LIMIT_BYTES = options.memory_limit
    experts.limited_calls.clear()
    if options.memory_limit is not None:
        if device.type != "cuda" or options.bits == 16:
            echo("--memory-limit: it slices dequantized expert weights on a CUDA GPU (--bits 4 or 8); nothing changes here")
        else:
            echo(f"--memory-limit {format_size(options.memory_limit)}: expert projections are dequantized in row slices where a whole one would go over it")
    teacher = _load_teacher(teacher_path, compute_dtype, device_map, options) if teacher_path is not None else None
    snapshot = snapshot_trainable(peft_model)

    from accelerate import PartialState

    # Under `accelerate launch` every process runs this function: all of them checked OUT.partial
    # above before any creates it, and only the main process writes outputs.
    process = PartialState(cpu=device.type == "cpu")  # on CPUs, processes launched together join through gloo
    process.wait_for_everyone()
    staging.mkdir(parents=True, exist_ok=True)
    if process.is_main_process and checkpoint is None:
        _record_settings(staging, model_path, options)
    try:
        trainer = _make_trainer(peft_model, tokenizer, data, staging, options, compute_dtype, teacher, echo)
        if len(trainer.train_dataset) == 0:
            raise DataError(
                f"no example of {options.data} has a trainable token within --max-seq-len {options.max_seq_len}",
                hint="raise --max-seq-len or shorten the prompts",
            )
        if checkpoint is not None:
            _trim_log(staging / LOG_FILE, _checkpoint_step(checkpoint))
            echo(f"resuming from {checkpoint}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        if (graphs := trainer.cuda_graph_summary())["used"]:
            echo(f"CUDA graphs: {graphs['replayed']} micro-steps replayed, {graphs['eager']} run eagerly (warm-up, and any that could not be replayed)")
    except BaseException as err:
        if process.is_main_process:
            from moekit.cli import signals_held

            with signals_held():  # a second SIGTERM must not stop the clean-up half-way
                shutil.rmtree(staging / "checkpoints" / SAVING, ignore_errors=True)  # a checkpoint cut off mid-save
                if not _checkpoints(staging):
                    shutil.rmtree(staging, ignore_errors=True)  # nothing worth resuming
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            complete = _checkpoints(staging)
            raise OutputError(
                f"the disk is full while writing {staging}"
                + (f"; the newest complete checkpoint is {complete[-1].name}" if complete else "; no checkpoint was complete, nothing was kept"),
                hint="free space, then run the same command" + (" with --resume" if complete else ""),
            ) from None
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise TrainingError(
                "the GPU ran out of memory while training",
                hint="lower --batch-size or --max-seq-len, keep --gradient-checkpointing on, or check `moekit plan` first",
            ) from None
        raise
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    from moekit.finetune.targets import verify_changed

    trained = trainer.trained_parameters()  # under FSDP a collective: every process calls it
    if not trainer.is_world_process_zero():
        return FinetuneResult(out, out / "adapter", trainer.state.global_step, None, None, table, peak)
    verify_changed(snapshot, trained)
    log = _read_log(staging / LOG_FILE)
    losses = _loss_summary(log)
    _write_outputs(
        staging, peft_model, trainer, trained, tokenizer, options, model, model_path, data, table, losses, trainer.state.global_step, peak, plan_peak
    )
    (staging / SETTINGS_FILE).unlink(missing_ok=True)
    from moekit.output import move_into_place

    try:
        move_into_place(staging, out, overwrite=False)
    except OutputError:
        raise OutputError(f"output directory {out} appeared while training", hint=f"the finished run is kept in {staging}") from None
    adapter_dir = out / "adapter" if has_lora(peft_model) else None
    return FinetuneResult(out, adapter_dir, trainer.state.global_step, losses.get("first"), losses.get("last"), table, peak, losses)


# --- checks before loading -------------------------------------------------------------------


def check_inputs(model: str | Path, out: Path, options: FinetuneOptions):
    """The checks that need no weights and no data: OUT, --report-to, the config against the targets.

    Returns (checkpoint to resume or None, local model path, config). `--fsdp`/`--ddp` run them once
    before launching the processes, so that such mistakes get one message.
    """
    from moekit.build.sources import resolve_model
    from moekit.output import check_writable

    check_writable(Path(out).absolute().parent, f"fine-tune output {out}")
    checkpoint = _check_output(Path(out), partial_dir(Path(out)), options.resume)
    _check_report_to(options.report_to)
    model_path = resolve_model(str(model))
    config = _load_config(model_path, options.trust_remote_code)
    _check_targets(config, options)
    if checkpoint is not None:
        _check_same_settings(partial_dir(Path(out)), model_path, options)
    return checkpoint, model_path, config


def _under_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_output(out: Path, staging: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses unusable OUT / OUT.partial."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} exists and is not empty", hint="choose another -o")
    checkpoints = _checkpoints(staging)
    if resume:
        if not checkpoints:
            raise TrainingError(
                f"--resume: no complete checkpoint of an earlier run in {staging / 'checkpoints'}",
                hint="run without --resume to start a new fine-tune" + (f" (it clears {staging})" if staging.exists() else ""),
            )
        return checkpoints[-1]
    if checkpoints:
        raise OutputError(
            f"{staging} holds an unfinished run of {out} (complete checkpoints up to {checkpoints[-1].name})",
            hint="pass --resume to continue it, or delete it to start over",
        )
    return None  # an OUT.partial without a complete checkpoint holds nothing to resume: the run clears it


def _check_report_to(report_to: str) -> None:
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if not available[report_to]:
        raise DependencyError(
            f"--report-to {report_to} needs the {report_to} package, which is not installed", hint=f"pip install {report_to}, or leave out --report-to"
        )


def _checkpoints(staging: Path) -> list[Path]:
    """The complete checkpoints, oldest first. A checkpoint is renamed to `checkpoint-N` only when whole
    (`MoeSFTTrainer._save_checkpoint`); the trainer state, saved last, is checked as well for runs of older versions."""
    folder = staging / "checkpoints"
    found = (
        [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
        if folder.is_dir()
        else []
    )
    return sorted(found, key=_checkpoint_step)


# Settings that decide the adapter's shape and what it adapts: a resumed run must use the recorded ones.
RESUME_SETTINGS = ("bits", "target", "experts", "layers", "lora_r", "lora_alpha")


def _run_settings(model_path: Path, options: FinetuneOptions) -> dict:
    return {"model": str(Path(model_path).resolve()), **options.model_dump(mode="json", include=set(RESUME_SETTINGS))}


def _record_settings(staging: Path, model_path: Path, options: FinetuneOptions) -> None:
    (staging / SETTINGS_FILE).write_text(json.dumps(_run_settings(model_path, options), indent=2), encoding="utf-8")


def _check_same_settings(staging: Path, model_path: Path, options: FinetuneOptions) -> None:
    """Refuse --resume with settings that change the adapter, naming each difference."""
    try:
        recorded = json.loads((staging / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a run of an older version recorded nothing
    now = _run_settings(model_path, options)
    differences = [
        f"{'MODEL' if key == 'model' else '--' + key.replace('_', '-')} {_shown(recorded.get(key))} -> {_shown(value)}"
        for key, value in now.items()
        if key in recorded and recorded[key] != value
    ]
    if differences:
        raise TrainingError(
            f"--resume with settings that differ from the run in {staging}: {'; '.join(differences)}",
            hint="resume with the run's own settings, or start over without --resume after deleting " + str(staging),
        )


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(all)" if value is None else str(value)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    from moekit.models import register_phixtral_config

    register_phixtral_config()
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read the model config in {path}: {str(err).splitlines()[0]}") from None


def _check_targets(config, options: FinetuneOptions) -> None:
    """Refuse targets the config cannot have, before loading any weight."""
    num_experts = getattr(config, "num_local_experts", None)
    moe_targets = [t for t in options.target if t in ("experts", "gate")]
    if moe_targets and not num_experts:
        raise TargetError(
            f"--target {','.join(moe_targets)} needs an MoE, but this model is a "
            f"{config.architectures[0] if config.architectures else config.model_type} without experts",
            hint="use --target attn for a dense model, or build an MoE first with `moekit build`",
        )
    if options.experts and num_experts and max(options.experts) >= num_experts:
        raise TargetError(f"--experts {max(options.experts)} is out of range: the model has {num_experts} experts (0-{num_experts - 1})")
    if options.experts and "experts" not in options.target:
        raise TargetError("--experts chooses expert adapters, but --target does not include experts")
    layers = config.num_hidden_layers
    if options.layers and max(options.layers) >= layers:
        raise TargetError(f"--layers {max(options.layers)} is out of range: the model has {layers} layers (0-{layers - 1})")


def _check_teacher(config, teacher_config, ref: str) -> None:
    if teacher_config.vocab_size != config.vocab_size:
        raise IncompatibleModelsError(
            f"teacher {ref} has a vocabulary of {teacher_config.vocab_size} tokens, the model {config.vocab_size}; distillation needs the same tokenizer"
        )


def _print_plan(model_path: Path, options: FinetuneOptions, echo, on_gpu: bool) -> int | None:
    """Print the GPU memory plan when training on a GPU (a CPU run gets one line); returns the predicted peak."""
    from moekit.plan import estimate

    try:
        plan = estimate(model_path, options)
    except MoekitError as err:
        echo(f"memory plan unavailable: {err.message}")
        return None
    echo(plan.render() if on_gpu else "training on the CPU (no CUDA device): no GPU memory plan applies")
    return plan.peak_bytes


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _load_teacher(path: Path, compute_dtype, device_map, options: FinetuneOptions):
    """The teacher in 4-bit (experts included), streamed like the model."""
    from moekit.finetune.loading import load_for_training

    teacher = load_for_training(path, bits=4, compute_dtype=compute_dtype, device_map=device_map, trust_remote_code=options.trust_remote_code)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


# --- training --------------------------------------------------------------------------------


def _checkpointing_args(config_class, enabled: bool, cuda_graphs: bool = False) -> dict:
    from moekit.finetune.quantize import checkpointing_kwargs

    # transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing* (the old names warn); 5.17 has only the old
    fields = {field.name for field in dataclasses.fields(config_class)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    # the CUDA RNG state cannot be saved during capture; nothing random runs (cuda_graphs_refusal)
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": checkpointing_kwargs(preserve_rng_state=not cuda_graphs)}


def cuda_graphs_refusal(model, options: FinetuneOptions, teacher, device: torch.device) -> str | None:
    """Why the training steps cannot be captured as CUDA graphs here, or None when they can (`cuda_graph`)."""
    if not options.cuda_graphs:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return "not on a GPU"
    if _under_fsdp():
        return "FSDP gathers and frees weights with host-side bookkeeping in every step"
    if teacher is not None:
        return "the distillation loss keeps only labelled positions, a shape that depends on the data"
    if not options.packing:
        return "batches change shape from step to step without --packing"
    text_config = model.config.get_text_config()
    if text_config._attn_implementation not in ("sdpa", "eager"):
        return f"{text_config._attn_implementation} attention reads sequence lengths on the host"
    # random numbers drawn inside a layer (dropout modules, sdpa's attention dropout, router jitter) would differ
    # between a layer's forward and its recomputation
    settings = text_config.to_dict().items()
    random = sorted(key for key, value in settings if key.endswith(("dropout", "pdrop", "jitter_noise")) and isinstance(value, float) and value > 0)
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules()) or options.lora_dropout > 0 or random:
        named = f" ({', '.join(random)})" if random else ""
        return f"dropout is on{named}, and checkpointed layers could not replay its random numbers"
    return None


def train_on_one_gpu(args) -> str | None:
    """Keep a single process on one GPU when several are visible; returns what to tell the user, or None.

    Without a distributed launcher, `Trainer` would wrap the model in `nn.DataParallel` over every visible GPU,
    which TRL's SFTTrainer refuses (and which would replicate the whole 4-bit model per step anyway). A user who
    types plain `moekit finetune` on a 2-GPU machine gets what the memory plan describes: one GPU.
    """
    visible = args.n_gpu  # transformers counts the visible GPUs here when no launcher set up a process group
    if visible <= 1:
        return None
    args._n_gpu = 1  # what Trainer itself sets for a model it must not replicate
    return f"{visible} GPUs are visible; training on one (cuda:0). To use all of them: --ddp (a model copy per GPU) or --fsdp (the model sharded)"


def _make_trainer(model, tokenizer, data, staging: Path, options: FinetuneOptions, compute_dtype, teacher, echo: Callable[[str], None] = lambda _line: None):
    from trl import SFTConfig

    text_config = model.config.get_text_config()
    is_moe = hasattr(text_config, "output_router_logits")
    refusal = cuda_graphs_refusal(model, options, teacher, _device())
    if refusal is not None and options.cuda_graphs and torch.cuda.is_available():
        echo(f"CUDA graphs: off ({refusal})")
    args = SFTConfig(
        output_dir=str(staging / "checkpoints"),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        warmup_steps=options.warmup_ratio,  # a float below 1 is a share of the steps
        lr_scheduler_type="cosine",
        # torch's fused AdamW: one launch for all parameters instead of a dozen per-op launches (and, under FSDP, a
        # dozen DTensor dispatches), host time that the GPU otherwise waits for after every step
        optim="adamw_torch_fused" if options.optimizer == "adamw_torch" else options.optimizer,
        **_checkpointing_args(SFTConfig, options.gradient_checkpointing, cuda_graphs=refusal is None),
        max_length=options.max_seq_len,
        packing=options.packing,
        # with CUDA graphs each packed example is a row padded to max-seq-len (`_packed_rows`)
        pad_to_multiple_of=options.max_seq_len if refusal is None else None,
        assistant_only_loss=data.format == "messages",
        completion_only_loss=True if data.format == "prompt_completion" else None,
        router_aux_loss_coef=options.router_aux_loss_coef if is_moe else None,
        logging_steps=1,
        # a NaN or inf loss is logged as it is, not replaced by the average of the earlier ones; the filter would also
        # wait for each step's GPU work before the host may go on (clipping, optimizer, next batch)
        logging_nan_inf_filter=False,
        # DDP: every trainable parameter takes part in every step (LoRA on all experts of a block is one stacked
        # GEMM, experts without tokens included), so no search for unused ones; buffers (the 4-bit quantization
        # constants, rotary frequencies) are the same on every process, so none is broadcast before each forward
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
        save_strategy="steps",
        save_steps=options.save_steps,
        report_to=[] if options.report_to == "none" else [options.report_to],
        seed=options.seed,
        data_seed=options.seed,
        bf16=compute_dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if (note := train_on_one_gpu(args)) is not None:
        echo(note)
    trainer = MoeSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.dataset,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(staging / LOG_FILE), ExpertPathCallback(model, echo)],
        train_routers="gate" in options.target,
        teacher=teacher,
        kd_alpha=options.kd_alpha,
        kd_temperature=options.kd_temperature,
        cuda_graphs_off=refusal,
        echo=echo,
    )
    if options.offload_activations and _device().type == "cuda":
        from moekit.finetune.offload import CheckpointInputOffload

        trainer.offload = CheckpointInputOffload()
    return trainer


class MoeSFTTrainer(SFTTrainer):
    """SFTTrainer that logs the LM loss apart from the router aux loss, and adds logit distillation.

    Without a teacher the loss is TRL's (token-mean CE on assistant tokens + coef * aux loss). With one:
    (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher_T || student_T) + coef * aux, both terms over
    the same assistant tokens.
    """

    def __init__(self, *args, train_routers: bool = False, teacher=None, kd_alpha: float = 0.5, kd_temperature: float = 2.0,
                 cuda_graphs_off: str | None = "not asked for", echo: Callable[[str], None] = lambda _line: None, **kwargs):  # fmt: skip
        model = kwargs["model"]
        if _under_fsdp():
            trainables_to_float32(model)
        dtypes = {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}
        self.cuda_graphs_off = cuda_graphs_off  # why steps are not captured as CUDA graphs (None: they are)
        self.averages_gradients = False  # several processes without DDP: the graph path averages (set below)
        super().__init__(*args, **kwargs)
        # TRL casts the trainable parameters of a 4-bit model to bf16; keep them in the compute dtype
        # instead, which routers need (their matmul takes the hidden states as they are).
        for name, param in model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
        self.train_routers = train_routers
        # Under FSDP the modules get wrapped (and renamed) at train(); note now, under the unwrapped names,
        # checkpoint key -> parameter name of each router and adapter file key -> parameter name of each LoRA weight.
        self.router_names = _router_names(model) if train_routers else {}
        from moekit.finetune.adapter import adapter_layout

        # file key -> parameter name of every adapter tensor (routers included), noted before FSDP wraps the model
        self.adapter_layout = adapter_layout(model, _router_modules(model) if train_routers else []) if has_lora(model) else None
        self.teacher = teacher
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.captured_step = None  # a CapturedStep, made at the first training step
        if cuda_graphs_off is None:
            self.data_collator = _packed_rows(self.data_collator)
        self.echo = echo
        self._graph_tokens = None  # TRL's num_tokens, counted on the device
        self.offload = None  # a CheckpointInputOffload with --offload-activations on a GPU
        self._trainable: list[torch.nn.Parameter] | None = None  # what clipping walks, listed at the first step
        self._flop_parameters: int | None = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin = self.accelerator.state.fsdp_plugin
            if plugin.fsdp_version != 2:
                raise TrainingError(
                    "moekit supports FSDP version 2 (the shipped fsdp_qlora.yaml), not fsdp_version 1", hint="set fsdp_version: 2 in the accelerate config"
                )
            # accelerate would all-gather every parameter cast to bf16 and reduce gradients in bf16; keep each
            # parameter's own dtype (4-bit codes, float32 LoRA) and reduce the float32 gradients in float32.
            # Autocast does the compute casts (autocast_smart_context_manager), as on one GPU.
            plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        elif self.accelerator.num_processes > 1 and self.cuda_graphs_off is None:
            # Steps replayed from a CUDA graph run the model itself and average its gradients in one all-reduce per
            # optimizer step (`average_gradients`). The model gets no DDP wrapper: with one, even unused, the capture
            # failed on 2 H200s ("operation failed due to a previous error during capture"), while the same capture
            # next to NCCL all-reduces without it succeeded.
            self.accelerator.prepare_model = functools.partial(self.accelerator.prepare_model, evaluation_mode=True)
            self.averages_gradients = True
        elif self.accelerator.ddp_handler is not None:
            # gradients written straight into DDP's all-reduce buckets (no copy per step)
            self.accelerator.ddp_handler.gradient_as_bucket_view = True

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        if self.is_fsdp_enabled and self.args.bf16:
            # with the policy above accelerate casts nothing for the compute under FSDP2: a float32 router met bf16
            # activations on 2 H200s. bf16 autocast does the casts, as on one GPU.
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return super().autocast_smart_context_manager(cache_enabled)

    def floating_point_ops(self, inputs) -> int:
        # the Trainer's own counts the parameters at every step, walking every module while the GPU waits (12 ms per
        # step at 8x7B-16 layers on an H200 host, 22 ms under FSDP); the count does not change
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters

    def _clip_grad_norm(self, model):
        # the Trainer hands accelerate every parameter, frozen 4-bit ones included, which it lists and compares at
        # every step (10 ms on one GPU at 8x7B-16 layers, 40 ms under FSDP); only the trainable ones have gradients
        if self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [param for param in model.parameters() if param.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._offloaded() if self.offload is not None else contextlib.nullcontext():
            if self.cuda_graphs_off is not None and not self.averages_gradients:
                inputs.pop("token_mask", None)  # `_packed_rows` adds it while graphs are on; TRL's step does not take it
                return super().training_step(model, inputs, num_items_in_batch)
            return self._graph_step(model, inputs, num_items_in_batch)

    def _offloaded(self):
        """The checkpointed layers' inputs go to pinned CPU memory during this step's forward (`offload.py`)."""
        return self.offload.hooks(self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size)

    def _graph_step(self, model, inputs, num_items_in_batch):
        from moekit.finetune.causal_lm_loss import MODEL_INPUTS
        from moekit.finetune.cuda_graph import CapturedStep

        model.train()
        inputs = self._prepare_inputs(inputs)
        # sequence boundaries of packed rows come from position_ids (sdpa)
        batch = {name: inputs[name] for name in (*MODEL_INPUTS, "labels", "token_mask") if name in inputs}
        labelled = num_items_in_batch if num_items_in_batch is not None else (batch["labels"][:, 1:] != -100).sum()
        device = batch["labels"].device
        batch["num_items_in_batch"] = torch.as_tensor(labelled, device=device).reshape(()).to(torch.int64)
        # graph inputs, not constants: the last accumulation cycle of an epoch can be shorter
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1  # as TRL
        batch["aux_loss_steps"] = torch.full((), float(steps), device=device)  # no copy from the host: no wait
        if self.captured_step is None:
            module = self.accelerator.unwrap_model(model)  # walks every module: once
            self.captured_step = CapturedStep(lambda batch: self._captured_loss(module, batch), [p for p in module.parameters() if p.requires_grad])
            if self.averages_gradients:  # as DDP does when it wraps a model: every process starts from rank 0's
                broadcast_parameters(self.captured_step.params)
        outputs = self.captured_step(batch)
        if self.averages_gradients and self.accelerator.sync_gradients:
            average_gradients(self.captured_step.params)
        if self.captured_step.failure is not None and self.cuda_graphs_off is None:
            # later steps go through TRL's, or without DDP (several processes) through this path eagerly
            self.cuda_graphs_off = f"the step could not be captured: {self.captured_step.failure}"
            self.echo(f"CUDA graphs: off ({self.cuda_graphs_off})")
        self._record_graph_metrics(outputs, batch)
        return outputs["loss"].detach().clone()  # the graph's own tensor is overwritten by the next replay

    def cuda_graph_summary(self) -> dict:
        """For the run's metadata: whether steps were replayed from CUDA graphs, how many, or why not."""
        step = self.captured_step
        if step is None or step.replays == 0:
            return {"used": False, "why_not": self.cuda_graphs_off or "no step was replayed"}
        return {"used": True, "replayed": step.replays, "eager": step.eager_steps, "failure": step.failure}

    def _captured_loss(self, module, batch):
        from moekit.finetune.causal_lm_loss import causal_lm_step

        aux_loss_coef = self.router_aux_loss_coef if self.aux_loss_enabled else None
        # no autocast weight cache: its cast copies would be allocated and freed inside the capture
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.args.bf16, cache_enabled=False):
            return causal_lm_step(module, batch, aux_loss_coef=aux_loss_coef, aux_loss_steps=batch["aux_loss_steps"], lm_loss_scale=self._lm_loss_scale())

    def _lm_loss_scale(self) -> int:
        # as TRL: num_items_in_batch counts the tokens of every process, and the gradients are averaged over them
        return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

    def _record_graph_metrics(self, outputs, batch) -> None:
        """TRL's training metrics from the step's device tensors, read on the host only when logged (`log`)."""
        from moekit.finetune.causal_lm_loss import real_tokens

        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics["train"]
        tokens = gather(outputs["tokens"]).sum().clamp(min=1)
        metrics["entropy"].append(gather(outputs["entropy_sum"]).sum() / tokens)
        metrics["mean_token_accuracy"].append(gather(outputs["correct"]).sum() / tokens)
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(gather(outputs["aux_loss"]).mean())
        seen = gather(real_tokens(batch).sum().reshape(1)).sum()
        self._graph_tokens = seen if self._graph_tokens is None else self._graph_tokens + seen
        metrics["num_tokens"] = [self._total_train_tokens + self._graph_tokens]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        import torch.nn.functional as F

        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        outputs = model(**model_inputs)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in model_inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            teacher_logits = self.teacher(**teacher_inputs, use_cache=False).logits
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100  # (batch, seq-1)
        student = outputs.logits[:, :-1][mask].float()  # (tokens, vocab)
        teacher = teacher_logits[:, :-1][mask].float().to(student.device)
        temperature = self.kd_temperature
        ce_sum = F.cross_entropy(student, shift_labels[mask], reduction="sum")
        kl_sum = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), log_target=True, reduction="sum") * temperature**2
        tokens = mask.sum()
        divisor = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else tokens).clamp(min=1)
        loss = ((1 - self.kd_alpha) * ce_sum + self.kd_alpha * kl_sum) / divisor
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean())
        count = tokens.clamp(min=1)
        # kept on the device: read once per log (`log`), not between forward and backward of every step
        self._metrics[mode]["lm_loss"].append(self.accelerator.gather_for_metrics((ce_sum / count).detach()).mean())
        self._metrics[mode]["kd_loss"].append(self.accelerator.gather_for_metrics((kl_sum / count).detach()).mean())
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer writes checkpoint-N file by file; a kill or a full disk half-way would leave one that
        # --resume cannot load. Write it under checkpoints/.saving/ and rename it into place when whole.
        run_dir = Path(self._get_output_dir(trial=trial))
        saving = run_dir / SAVING
        if self.args.should_save:
            shutil.rmtree(saving, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no process writes into `saving` before it is empty
        self._get_output_dir = lambda trial=None: str(saving)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            shutil.rmtree(run_dir / name, ignore_errors=True)
            (saving / name).rename(run_dir / name)
            saving.rmdir()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # A checkpoint holds the adapter (PEFT's format, routers included) and the routers' own file; under
        # FSDP `state_dict` is the gathered trainable parameters (`save_model`).
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        gathered = state_dict if self.is_fsdp_enabled else None
        if self.adapter_layout is not None:
            from moekit.finetune.adapter import save_adapter

            save_adapter(model, Path(output_dir), parameters=gathered, layout=self.adapter_layout)
        if self.train_routers:
            if gathered is not None:  # the modules are wrapped and sharded; `state_dict` is the gathered whole
                _write_routers({key: gathered[name] for key, name in self.router_names.items()}, Path(output_dir) / ROUTERS_FILE)
            else:
                from moekit.finetune.targets import save_routers

                save_routers(model, Path(output_dir) / ROUTERS_FILE)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # the Trainer would gather the whole model into a full state dict; a checkpoint needs only what trains
        from moekit.finetune.distributed import gathered_trainable

        trained = gathered_trainable(self.model_wrapped)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=trained)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The Trainer would also write FSDP's whole-model file (4-bit weights included, gathered from every GPU);
        # the adapter and routers are already in the checkpoint (save_model), so only the optimizer is added,
        # gathered whole and keyed by parameter name (`optimizer.bin`, a collective).
        from moekit.finetune.distributed import save_fsdp_optimizer

        save_fsdp_optimizer(self.model_wrapped, self.optimizer, os.path.join(output_dir, FSDP_OPTIMIZER_FILE))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def trained_parameters(self):
        """The trained model, named as before training: the PEFT model itself on one process or under DDP;
        under FSDP, its trainable parameters gathered whole (`distributed.gathered_trainable`; every process
        must call this)."""
        if not self.is_fsdp_enabled:
            return self.accelerator.unwrap_model(self.model)
        from moekit.finetune.distributed import gathered_trainable

        return gathered_trainable(self.model_wrapped)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        checkpoint = Path(resume_from_checkpoint)
        if self.is_fsdp_enabled:
            return self._load_sharded(checkpoint)
        if self.adapter_layout is not None:  # written by `_save`, whole also when written under FSDP
            from moekit.finetune.adapter import load_adapter_values

            load_adapter_values(self.accelerator.unwrap_model(self.model), checkpoint, self.adapter_layout)
        if self.train_routers:
            from moekit.finetune.targets import load_routers

            load_routers(self.model, checkpoint / ROUTERS_FILE)

    def _load_sharded(self, checkpoint: Path) -> None:
        """A checkpoint's adapter and routers into the FSDP2 model: gathered whole, overwritten from the files,
        and sharded back (every process)."""
        from safetensors.torch import load_file

        from moekit.finetune.adapter import load_adapter_values
        from moekit.finetune.distributed import gathered_trainable, set_full

        whole = gathered_trainable(self.model_wrapped)
        if self.adapter_layout is not None:
            load_adapter_values(self.model_wrapped, checkpoint, self.adapter_layout, parameters=whole)
        if self.train_routers:
            saved = load_file(str(checkpoint / ROUTERS_FILE))
            for key, name in self.router_names.items():
                whole[name].copy_(saved[key])
        for name, param in self.model_wrapped.named_parameters():
            if name in whole:
                set_full(param, whole[name])

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        checkpoint = Path(checkpoint)
        if self.is_fsdp_enabled:
            from moekit.finetune.distributed import load_fsdp_optimizer, optimizer_state_to_fsdp

            if _is_fsdp_checkpoint(checkpoint):
                load_fsdp_optimizer(self.model_wrapped, self.optimizer, checkpoint / FSDP_OPTIMIZER_FILE)
            else:  # written by one process or DDP: positions -> parameter names, then sharded
                names = {id(param): name for name, param in self.model_wrapped.named_parameters()}
                saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
                load_fsdp_optimizer(self.model_wrapped, self.optimizer, optimizer_state_to_fsdp(saved, self.optimizer, names))
        elif _is_fsdp_checkpoint(checkpoint):
            # written under FSDP, resumed without it: FSDP's optimizer file is keyed by parameter name
            from moekit.finetune.distributed import optimizer_state_from_fsdp

            names = {id(param): name for name, param in self.accelerator.unwrap_model(self.model).named_parameters()}
            saved = torch.load(checkpoint / FSDP_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(optimizer_state_from_fsdp(saved, self.optimizer, names))
        else:
            return super()._load_optimizer_and_scheduler(str(checkpoint))
        self.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for values in self._metrics[mode].values():  # the distillation metrics stay tensors until here
            values[:] = [float(value) if isinstance(value, torch.Tensor) else value for value in values]
        if self.teacher is None and "loss" in logs:
            # TRL's logged loss is CE + coef * aux (aux averaged over the same micro-batches); take the LM part out.
            aux = self._metrics[mode].get("aux_loss") if self.aux_loss_enabled else None
            aux_mean = sum(aux) / len(aux) if aux else 0.0
            logs["lm_loss"] = logs["loss"] - self.router_aux_loss_coef * aux_mean if self.aux_loss_enabled else logs["loss"]
        super().log(logs, start_time)


FSDP_OPTIMIZER_FILE = "optimizer.bin"


def _packed_rows(collate):
    """TRL's padding-free collator, one packed example per row. TRL concatenates a batch's packed examples into one
    row, whose attention (sdpa, a block-diagonal mask over the whole row) costs (batch x max-seq-len)^2; here each
    packed example is a row of its own, padded to max-seq-len (SFTConfig's pad_to_multiple_of), so every batch has the
    one shape a CUDA graph replays. Adds `token_mask` (1 on the examples' tokens, 0 on the padding), which the router
    load-balancing loss and the token count go by; the padding has labels -100 and positions 0, so it neither
    trains nor is attended to."""

    def collate_rows(examples):
        rows = [collate([example]) for example in examples]  # each (1, max-seq-len)
        batch = {key: torch.cat([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids", "attention_mask") if key in rows[0]}
        width = batch["input_ids"].shape[1]
        lengths = torch.tensor([len(example["input_ids"]) for example in examples])
        batch["token_mask"] = (torch.arange(width)[None] < lengths[:, None]).to(batch["input_ids"].dtype)  # (batch, width)
        return batch

    return collate_rows


def broadcast_parameters(params) -> None:
    """Rank 0's values of `params` on every process, in one broadcast."""
    import torch.distributed as dist

    _through_one_buffer([param.detach() for param in params], lambda flat: dist.broadcast(flat, src=0))


def average_gradients(params) -> None:
    """What DDP's hooks do at the end of an accumulation cycle, for steps it did not see (replayed from a CUDA graph):
    every gradient averaged over the processes, in one all-reduce."""
    import torch.distributed as dist

    for param in params:  # a parameter no gradient reached here may have one elsewhere: every process sends all
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    _through_one_buffer([param.grad for param in params], lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.AVG))


def _through_one_buffer(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective` (in place) on the concatenation of `tensors` and write the result back into them."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    collective(flat)
    torch._foreach_copy_(tensors, [part.view_as(tensor) for part, tensor in zip(flat.split([tensor.numel() for tensor in tensors]), tensors)])


def trainables_to_float32(model) -> None:
    """FSDP2 needs one dtype among the trainable parameters of a unit (a decoder layer): LoRA is float32, so the
    routers become float32 too (bf16 autocast runs their matmul as on one GPU)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _is_fsdp_checkpoint(checkpoint: Path) -> bool:
    """Checkpoints written under FSDP hold FSDP's optimizer file (`optimizer.bin`, keyed by parameter name);
    the others torch's (`optimizer.pt`)."""
    return (checkpoint / FSDP_OPTIMIZER_FILE).is_file()


def _router_modules(model) -> list[str]:
    """Router module names relative to the base model (what the adapter lists in `modules_to_save`)."""
    from moekit.finetune.targets import describe_layers

    return [layer.router for layer in describe_layers(model) if layer.router is not None]


def _router_names(model) -> dict[str, str]:
    """Checkpoint key -> parameter name of every router of the (unwrapped) PEFT model."""
    from moekit.finetune.targets import _routers

    names = {id(param): name for name, param in model.named_parameters()}
    return {key: names[id(param)] for key, param in _routers(model).items()}


def _write_routers(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The router file `save_routers` writes, from tensors gathered out of a sharded model."""
    from safetensors.torch import save_file

    save_file({key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}, str(path), metadata={"format": "pt"})


class ExpertPathCallback(TrainerCallback):
    """After the first optimizer step, says how the expert blocks ran (grouped GEMMs or expert by expert), once."""

    def __init__(self, model, echo):
        self.model, self.echo = model, echo

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        from moekit.finetune.experts import limited_calls, path_counts, recomputations_skipped
        from moekit.finetune.nf4_grouped_mm import launches

        counts = path_counts(self.model)
        if counts["grouped"] or counts["per_expert"]:
            reading = sum(launches.values())  # --nf4-gemm: proof that its kernel ran
            nf4 = f"; {reading} GEMMs read the NF4 weights" if reading else ""
            skipped = recomputations_skipped(self.model)
            unsaved = f"; {skipped} recomputations left out the unsaved second projection" if skipped else ""
            limited = sum(limited_calls.values())
            read = f", {limited_calls['nf4_gemm']} read the 4-bit weight in the GEMM" if limited_calls["nf4_gemm"] else ""
            sliced = f"; under --memory-limit {limited_calls['sliced']} of {limited} projections in row slices{read}" if limited else ""
            self.echo(f"expert blocks: {counts['grouped']} grouped forwards, {counts['per_expert']} expert by expert (first step{nf4}{unsaved}{sliced})")


class JsonlLogCallback(TrainerCallback):
    """Appends each log record (step, loss, lm_loss, aux_loss, kd_loss, learning_rate, ...) to a JSONL file."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


# --- outputs ---------------------------------------------------------------------------------


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trim_log(path: Path, step: int) -> None:
    """Drop log records past the checkpoint a resumed run restarts from (they will be logged again)."""
    records = [r for r in _read_log(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _loss_summary(log: list[dict]) -> dict:
    steps = [r for r in log if "loss" in r]
    summary: dict = {}
    for key in ("loss", "lm_loss", "aux_loss", "kd_loss"):
        values = [r[key] for r in steps if key in r and math.isfinite(r[key])]
        if values:
            prefix = "" if key == "loss" else key.removesuffix("_loss") + "_"
            summary[prefix + "first"] = values[0]
            summary[prefix + "last"] = values[-1]
    return summary


def _write_outputs(staging, model, trainer, trained, tokenizer, options, model_ref, model_path, data, table, losses, steps, peak, plan_peak) -> None:
    """`trained` is `model` itself, or under FSDP its gathered trainable parameters (`MoeSFTTrainer.trained_parameters`)."""
    from moekit.finetune.adapter import save_adapter
    from moekit.finetune.experts import limited_calls, path_counts, recomputations_skipped
    from moekit.finetune.targets import save_routers

    gathered = trained if isinstance(trained, dict) else None
    if trainer.adapter_layout is not None:
        save_adapter(model, staging / "adapter", parameters=gathered, layout=trainer.adapter_layout)
    if trainer.adapter_layout is not None:
        tokenizer.save_pretrained(staging / "adapter")  # carries the chat template used in training
    else:
        tokenizer.save_pretrained(staging / "tokenizer")  # router-only training has no adapter
    if "gate" in options.target and gathered is None:
        save_routers(model, staging / ROUTERS_FILE)
    elif "gate" in options.target:
        _write_routers({key: gathered[name] for key, name in trainer.router_names.items()}, staging / ROUTERS_FILE)
    metadata = {
        "moekit_version": __version__,
        "kind": "finetune",
        "base_model": str(model_ref),
        "base_model_path": str(Path(model_path).resolve()),
        "datasets": [options.data],
        "data": {"format": data.format, "loss_on": data.loss_on, "examples": len(data.dataset), "dropped": data.dropped, "chat_template": data.template},
        "teacher": options.teacher,
        "options": options.model_dump(mode="json"),
        "trainable": table.to_dict(),
        "steps": steps,
        "losses": losses,
        "peak_memory_bytes": peak,
        "planned_peak_bytes": plan_peak,
        "routers": ROUTERS_FILE if "gate" in options.target else None,
        "adapter_format": "peft" if trainer.adapter_layout is not None else None,
        "expert_paths": path_counts(model),
        "recomputations_skipped": recomputations_skipped(model),  # down_proj GEMMs left out of checkpoint recomputations
        # --memory-limit on a GPU: projections run whole, in row slices or through the NF4 GEMM (Python calls, not replays)
        "memory_limit_calls": dict(limited_calls),
        "cuda_graphs": trainer.cuda_graph_summary(),
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    plot_losses(_read_log(staging / LOG_FILE), staging / "loss.png")


def plot_losses(log: list[dict], path: Path) -> None:
    """Loss curves: total and LM (and distillation) loss on top, router aux loss below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in log if "loss" in r]
    has_aux = any("aux_loss" in r for r in records)
    fig, axes = plt.subplots(2 if has_aux else 1, 1, figsize=(7, 6 if has_aux else 3.5), sharex=True, squeeze=False)
    top = axes[0][0]
    for key, label in (("loss", "total loss"), ("lm_loss", "LM loss (assistant tokens)"), ("kd_loss", "distillation KL")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            top.plot(*zip(*points), label=label)
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    if has_aux:
        bottom = axes[1][0]
        bottom.plot(*zip(*[(r["step"], r["aux_loss"]) for r in records if "aux_loss" in r]), color="tab:red", label="router load-balancing loss")
        bottom.set_ylabel("aux loss")
        bottom.legend()
        bottom.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["FinetuneResult", "finetune", "partial_dir", "plot_losses"]
