"""Upload a moekit output directory to the Hugging Face Hub, with its model card, in one commit.

    publish(model_dir, repo_id, private=False, revision=None, create_pr=False, license=None, dry_run=False) -> PublishResult

Everything goes through huggingface_hub's `HfApi` (create_repo, create_branch, upload_folder), so large
files take the library's LFS/Xet path and a retry skips files the Hub already has. The token comes from
HF_TOKEN or the huggingface_hub login and is never printed or written, error messages included.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard

from moekit.errors import PublishError
from moekit.publish.card import (
    ModelDirectory,
    decide_license,
    finetune_base,
    inspect_directory,
    is_hub_ref,
    model_card,
    report_files,
    validate_card,
    write_model_card,
)

# Never uploaded: trainer checkpoints (optimizer states, often larger than the model), caches, hidden files.
IGNORE_PATTERNS = [
    "checkpoints/*",
    "*/checkpoints/*",
    "checkpoint-*/*",
    "*/checkpoint-*/*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
    ".cache/*",
    "*/.cache/*",
    ".*",
    "*/.*",
    "wandb/*",
    "runs/*",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class PublishResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repo, bytes) of everything uploaded (or that would be)
    card: ModelCard
    dry_run: bool
    url: str | None = None  # the repository (or pull request) page
    commit_url: str | None = None
    pr_url: str | None = None
    revision: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def publish(
    model_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    dry_run: bool = False,
    report: Path | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Write the model card and upload `model_dir` to `repo_id` in one commit (nothing remote with `dry_run`).

    Refuses, before any network call, a directory that is not a complete model or adapter, sources whose
    licenses disagree without `license`, and an adapter whose base model is not on the Hub (pass `base_model`).
    """
    model_dir = Path(model_dir)
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"'{repo_id}' is not a Hub repository id", hint="write it as USER/NAME or ORG/NAME")
    if create_pr and revision not in (None, "main"):
        raise PublishError("--create-pr opens a pull request against the main branch; it cannot be combined with --revision")
    directory = inspect_directory(model_dir)
    missing = missing_files(directory)
    if missing and directory.kind == "finetune" and not (model_dir / "config.json").is_file():
        raise PublishError(
            f"{model_dir} is a fine-tune without an adapter (router-only training): it holds no model to upload",
            hint=f"merge it first with `moekit export {model_dir} -o OUT` and publish OUT",
        )
    if missing:
        raise PublishError(
            f"{model_dir} is not a complete {_kind_name(directory)}: missing " + "; ".join(missing),
            hint="publish the output directory of `moekit build`, `moekit finetune` or `moekit export`",
        )
    decision = decide_license(directory, license)
    if decision.conflict:
        listed = ", ".join(f"{ref}: {lic or 'not stated'}" for ref, lic in decision.source_licenses.items())
        raise PublishError(
            f"the source models' licenses disagree ({listed}); moekit will not pick one for you",
            hint="pass --license with a license compatible with all of them (e.g. --license apache-2.0)",
        )
    if directory.kind in ("adapter", "finetune"):
        _check_base_model(directory, base_model, repo_id)
    card = model_card(model_dir, license=decision.license, report=report, repo_id=repo_id, base_model=base_model)
    validate_card(card)
    files = planned_files(model_dir, card, report)
    result = PublishResult(repo_id, files, card, dry_run, revision=revision)
    if decision.license is None:
        result.warnings.append("the sources state no license, so the card has none; pass --license to set one")
    if dry_run:
        return result
    token = _token()
    result.card = write_model_card(model_dir, license=decision.license, report=report, repo_id=repo_id, base_model=base_model)
    try:
        _upload(result, model_dir, token, private=private, create_pr=create_pr, commit_message=commit_message)
    except PublishError:
        raise
    except Exception as err:  # network and Hub errors: one message, token scrubbed
        if not _is_remote_error(err):
            raise
        raise PublishError(
            _scrub(f"uploading to {repo_id} failed: {_describe(err)}", token),
            hint="check the network, HF_TOKEN's write access and the repo id; running the command again skips files the Hub already has",
        ) from None
    return result


def _upload(result: PublishResult, model_dir: Path, token: str, *, private: bool, create_pr: bool, commit_message: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(result.repo_id, private=private, exist_ok=True, repo_type="model")
    if result.revision and result.revision != "main":
        api.create_branch(result.repo_id, branch=result.revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=result.repo_id,
        folder_path=model_dir,
        revision=result.revision,
        create_pr=create_pr,
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message=commit_message or f"Upload {_kind_name(inspect_directory(model_dir))} with moekit",
    )
    result.commit_url = info.commit_url
    result.pr_url = info.pr_url
    result.url = info.pr_url or str(repo_url)


def planned_files(model_dir: Path, card: ModelCard, report: Path | None = None) -> list[tuple[str, int]]:
    """What `upload_folder` will send, with the same filter it applies: the folder's files, the card about to be
    written as README.md and the eval report files about to be copied in."""
    from huggingface_hub.utils import filter_repo_objects

    sizes = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in model_dir.rglob("*") if p.is_file()}
    sizes.update({path: source.stat().st_size for path, source in report_files(model_dir, report).items()})
    sizes["README.md"] = len(str(card).encode("utf-8"))
    kept = set(filter_repo_objects(sorted(sizes), ignore_patterns=IGNORE_PATTERNS + _default_ignore_patterns()))
    return sorted((path, size) for path, size in sizes.items() if path in kept)


def _default_ignore_patterns() -> list[str]:
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    return list(DEFAULT_IGNORE_PATTERNS)


def missing_files(directory: ModelDirectory) -> list[str]:
    """What a loadable model (or adapter) directory lacks, in words; empty when complete."""
    path = directory.path
    if directory.kind == "adapter":
        adapter = directory.adapter_dir
        missing = []
        if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            missing.append(f"adapter weights ({adapter.relative_to(path).as_posix() + '/' if adapter != path else ''}adapter_model.safetensors)")
        return missing
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    missing += _missing_weights(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer.model or vocab.json)")
    missing += _missing_remote_code(path)
    return missing


def _missing_weights(path: Path) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError):
                return [f"a readable {index_name}"]
            absent = [shard for shard in shards if not (path / shard).is_file()]
            return [f"weight shards listed in {index_name}: {', '.join(absent)}"] if absent else []
    if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
        return []
    return ["model weights (model.safetensors or sharded safetensors with model.safetensors.index.json)"]


def _missing_remote_code(path: Path) -> list[str]:
    """Files named by config.json's auto_map (Phixtral ships its model code with the checkpoint)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    modules = {str(ref).split("--")[-1].split(".")[0] for ref in (config.get("auto_map") or {}).values() if isinstance(ref, str)}
    return [f"{module}.py (named by auto_map in config.json)" for module in sorted(modules) if not (path / f"{module}.py").is_file()]


def _check_base_model(directory: ModelDirectory, base_model: str | None, repo_id: str) -> None:
    base = base_model or finetune_base(directory.finetune, directory.adapter_dir)
    if base_model is not None and not REPO_ID.match(base_model.split("@", 1)[0]):
        raise PublishError(f"--base-model '{base_model}' is not a Hub repository id", hint="write it as USER/NAME")
    if base and (base_model or is_hub_ref(base, {})):
        return
    raise PublishError(
        f"the {_kind_name(directory)} was trained on {base or 'an unknown model'}, which is not a Hub repository, "
        "so the Hub could not link the card to its base model",
        hint=f"publish that MoE first (moekit publish {base or 'MOE_DIR'} --repo-id USER/MOE), then "
        f"`moekit publish {directory.path} --repo-id {repo_id} --base-model USER/MOE`",
    )


def _kind_name(directory: ModelDirectory) -> str:
    return {"build": "MoE build", "adapter": "adapter", "finetune": "fine-tuned model"}.get(directory.kind, "model")


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token found", hint="set HF_TOKEN to a token with write access, or run `hf auth login`")
    return token


def _is_remote_error(err: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError's first base is the HTTP client's own HTTPError (httpx or its successor), which its
    # connection and timeout errors also derive from. ValueError: the Hub refused the card (validate-yaml)
    # or answered something malformed.
    transport_error = HfHubHTTPError.__bases__[0]
    return isinstance(err, (HfHubHTTPError, transport_error, ConnectionError, TimeoutError, ValueError))


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:600]


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
