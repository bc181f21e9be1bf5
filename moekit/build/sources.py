"""Finding and opening source models: local directories, Hub ids (`org/name[@revision]`) and `scheme:NAME`
references, which the resolver registered for the scheme turns into a directory (`moekit.zoo` registers `zoo:`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from moekit.errors import SourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SCHEME = re.compile(r"^([a-z][a-z0-9_-]*):")  # `zoo:base`; a Hub id has no colon
# scheme -> resolver(NAME) -> local directory, for `scheme:NAME` references (`register_resolver`)
_RESOLVERS: dict[str, Callable[[str], Path]] = {}
# Everything a build reads from a source; `*.bin` is added only where no safetensors exist.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "README.md"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def split_revision(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); a local path is returned whole."""
    if "@" in ref and not Path(ref).exists():
        name, revision = ref.rsplit("@", 1)
        return name, revision or None
    return ref, None


def register_resolver(scheme: str, resolver: Callable[[str], Path]) -> None:
    """Resolve `scheme:NAME` references with `resolver(NAME)` (a local directory). Registering again replaces it."""
    if not SCHEME.match(f"{scheme}:"):
        raise ValueError(f"a scheme is lower-case letters, digits, '_' and '-', starting with a letter; got {scheme!r}")
    _RESOLVERS[scheme] = resolver


def reference_scheme(ref: str) -> str | None:
    """'zoo' for 'zoo:base'; None for a path or a Hub id."""
    match = SCHEME.match(ref)
    return match.group(1) if match else None


def resolve_model(ref: str, *, allow_pickle: bool = False) -> Path:
    """Local directory for `ref`, fetching from the Hub (or its cache) when it is a Hub id."""
    scheme = reference_scheme(ref)
    if scheme in _RESOLVERS:
        return _RESOLVERS[scheme](ref.removeprefix(f"{scheme}:"))
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if scheme is not None:
        raise SourceError(
            f"source model '{ref}': nothing resolves '{scheme}:' references in this process",
            hint="`moekit.zoo.register()` registers zoo: (the moekit command does); other schemes need `moekit.build.sources.register_resolver`",
        )
    name, revision = split_revision(ref)
    if local.exists() or not HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise SourceError(f"source model '{ref}' is not a directory and not a Hub id (org/name[@revision])")
    return _fetch_from_hub(ref, name, revision, allow_pickle)


def _fetch_from_hub(ref: str, repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        if allow_pickle and not any((path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json")):
            path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS + ["*.bin"]))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else "the Hub cannot be reached and it is not in the Hugging Face cache"
        )
        raise SourceError(
            f"source model '{ref}' does not exist locally, and {why}",
            hint="check the path, or download it once with `hf download " + repo_id + "` on a machine with network",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise SourceError(
            f"source model '{ref}' was not found on the Hub: {type(err).__name__}", hint="check the name and revision; private repos need HF_TOKEN"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise SourceError(f"cannot fetch source model '{ref}' from the Hub: {err}") from None
    return path


@dataclass
class SourceModel:
    """A resolved source checkpoint: its reference as written, its local directory and its config."""

    ref: str
    path: Path
    config: object = field(repr=False)

    @property
    def architecture(self) -> str:
        return (getattr(self.config, "architectures", None) or ["unknown"])[0]

    @cached_property
    def loader(self):
        """mergekit's lazy tensor loader: tensors are read one at a time, when asked for."""
        from mergekit.io import LazyTensorLoader

        return LazyTensorLoader.from_disk(str(self.path), lazy_unpickle=True)

    @cached_property
    def license(self) -> str | None:
        return read_license(self.path)

    def tensor(self, name: str):
        # safetensors hands out views of a memory-mapped file, and every page of a mapping that has
        # been read counts as resident memory until no view is left: copy the tensor out and close
        # the shard, so that a build's resident memory stays at the tensors it really holds.
        tensor = self.loader.get_tensor(name).clone()
        self.loader.flush()
        return tensor

    def has_tensor(self, name: str) -> bool:
        return name in self.loader.index.tensor_paths


def open_source(ref: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> SourceModel:
    """Resolve `ref`, check that its weights are readable, and read its config."""
    from transformers import AutoConfig

    from moekit.models import register_phixtral_config

    register_phixtral_config()  # a Phixtral source reads as one, without trust_remote_code
    path = resolve_model(ref, allow_pickle=allow_pickle)
    if not (path / "config.json").is_file():
        raise SourceError(f"source model '{ref}' ({path}) has no config.json")
    files = weight_files(ref, path)
    pickles = [file.name for file in files if not file.name.endswith(".safetensors")]
    if pickles and not allow_pickle:
        raise SourceError(
            f"source model '{ref}' would be read from pickle files ({', '.join(pickles[:3])}), which can run arbitrary code when loaded",
            hint="convert it to safetensors, or pass --allow-pickle if you trust it",
        )
    for file in files:
        if file.name.endswith(".safetensors"):
            check_safetensors(ref, file)
    _refuse_legacy_layout(ref, path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise SourceError(f"cannot read the config of source model '{ref}': {err}", hint="models with custom code need --trust-remote-code") from None
    except OSError as err:
        raise SourceError(f"cannot read the config of source model '{ref}': {err}") from None
    return SourceModel(ref=ref, path=path, config=config)


def weight_files(ref: str, path: Path) -> list[Path]:
    """The tensor files mergekit's loader will read for `path`, chosen as it chooses them
    (`ShardedTensorIndex.from_disk`): `model.safetensors`, else `pytorch_model.bin`, each alone or
    through its `.index.json`; every shard an index names, whatever its extension. Other files in the
    directory (a stray `decoy.safetensors`) are never read, so they decide nothing."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        file, index = path / name, path / f"{name}.index.json"
        if index.exists():
            try:
                weight_map = read_json(index)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise SourceError(f"source model '{ref}': cannot read {index}: {err}") from None
            files = [path / shard for shard in shards]
            if any(Path(shard).is_absolute() or ".." in Path(shard).parts for shard in shards):
                raise SourceError(f"source model '{ref}': {index} names files outside the model directory")
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SourceError(f"source model '{ref}': {index} names shards that do not exist: {', '.join(missing[:3])}")
            return files
        if file.exists():
            return [file]
    raise SourceError(
        f"source model '{ref}' ({path}) has no weights (model.safetensors or model.safetensors.index.json)",
        hint="weights must be named as transformers saves them; pickle-only models (pytorch_model.bin) need --allow-pickle",
    )


def check_safetensors(ref: str, file: Path) -> None:
    """SourceError for a truncated or corrupted safetensors file (its header must parse and its data fit the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise SourceError(
            f"source model '{ref}': {file} is not a readable safetensors file ({str(err).splitlines()[0][:200]})",
            hint="the file is truncated or corrupted: download or copy it again",
        ) from None


def load_tokenizer(source: SourceModel, trust_remote_code: bool):
    """The tokenizer of `source`; custom tokenizer code (`auto_map`) only with --trust-remote-code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        custom = "auto_map" in (_tokenizer_config(source.path) or {})
        raise SourceError(
            f"cannot load the tokenizer of '{source.ref}': {str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}",
            hint="its tokenizer_config.json asks for custom code (auto_map): pass --trust-remote-code if you trust it"
            if custom and not trust_remote_code
            else None,
        ) from None


def _tokenizer_config(path: Path) -> dict | None:
    try:
        return read_json(path / "tokenizer_config.json")
    except (OSError, ValueError):
        return None


def _refuse_legacy_layout(ref: str, path: Path) -> None:
    """Refuse checkpoints in layouts that transformers' own classes do not read (before their custom code runs)."""
    try:
        model_type = read_json(path / "config.json").get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # AutoConfig reports an unreadable config
    if model_type == "phi-msft":
        raise SourceError(
            f"source model '{ref}' is a Phi checkpoint in the older 'phi-msft' layout (custom code; tensors like "
            "transformer.h.N.mixer.Wqkv and layers.N.mlp.fc1), which moekit does not read",
            hint="use a revision in the transformers PhiForCausalLM layout (model_type 'phi'; microsoft/phi-2 has been "
            "published in it since January 2024), or convert the checkpoint with transformers' Phi conversion script",
        )


def read_license(path: Path) -> str | None:
    """The `license:` of a model card's YAML header, if the directory has one."""
    card = path / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(card) or {}
    except Exception:  # a malformed card header is the source's problem, not a reason to fail the build
        return None
    license_ = metadata.get("license")
    return str(license_) if license_ else None


def copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of `source` into `out`; returns the names copied."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
