"""The tiny expert zoo: trained domain experts that moekit makes offline, deterministically, and caches.

    ensure_zoo(settings) -> Zoo        make (or reuse) the zoo for these settings
    resolve(name) -> Path              `zoo:NAME` in a recipe: base, code, prose, math or json
    register()                         make `moekit.build.sources` resolve `zoo:NAME` with `resolve`
                                       (the moekit command and `use_zoo` call it; importing registers nothing)

The zoo lives under `<cache>/zoo/<key>/` where <cache> is $MOEKIT_CACHE, else $XDG_CACHE_HOME/moekit,
else ~/.cache/moekit, and <key> hashes the zoo version, the settings and the Python version (the
code domain is the standard library's source). `resolve` uses the zoo selected with `use_zoo`, or
the standard one in the default cache, making it on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import SourceError, did_you_mean
from moekit.zoo.corpora import DOMAINS
from moekit.zoo.settings import PRESETS, ZOO_VERSION, ZooSettings

MODEL_NAMES = ("base", *DOMAINS)


@dataclass(frozen=True)
class Zoo:
    """A made zoo on disk."""

    directory: Path
    settings: ZooSettings

    def model(self, name: str) -> Path:
        return self.directory / name

    def heldout(self, domain: str) -> Path:
        """JSONL file of the domain's held-out text, one {"text": ...} per sequence."""
        return self.directory / "data" / domain / "heldout.jsonl"

    def validation(self, domain: str) -> Path:
        """JSONL file of the domain's validation text (documents neither trained on nor held out), like `heldout`."""
        return self.directory / "data" / domain / "validation.jsonl"

    def train_data(self, domain: str) -> Path:
        return self.directory / "data" / domain / "train.jsonl"

    @property
    def summary(self) -> dict:
        return json.loads((self.directory / "zoo.json").read_text(encoding="utf-8"))


def cache_dir() -> Path:
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moekit"
    return Path.home() / ".cache" / "moekit"


def zoo_key(settings: ZooSettings) -> str:
    identity = json.dumps({"version": ZOO_VERSION, "python": sys.version_info[:2], "settings": settings.model_dump()}, sort_keys=True)
    return f"v{ZOO_VERSION}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def zoo_directory(settings: ZooSettings, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "zoo" / zoo_key(settings)


def is_made(settings: ZooSettings, cache: Path | None = None) -> bool:
    return (zoo_directory(settings, cache) / "zoo.json").is_file()


def ensure_zoo(settings: ZooSettings | None = None, cache: Path | None = None) -> Zoo:
    """The zoo for `settings`, made now (a few minutes on a CPU) unless it is already in the cache."""
    settings = settings or PRESETS["standard"]
    directory = zoo_directory(settings, cache)
    if (directory / "zoo.json").is_file():
        return Zoo(directory, settings)
    import torch

    from moekit.zoo.corpora import load_domains
    from moekit.zoo.train import make_zoo

    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as err:
        raise SourceError(f"cannot write the zoo cache under {directory.parent}: {err}", hint="set MOEKIT_CACHE to a writable directory") from None
    threads = torch.get_num_threads()
    # One intra-op thread: for models this small, thread synchronisation costs more than it saves
    # (measured on 2 cores: several times faster than two threads).
    torch.set_num_threads(1)
    try:
        make_zoo(staging, settings, load_domains(seed=settings.seed))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any model directory
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "zoo.json").is_file():  # not a concurrent maker that finished first
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return Zoo(directory, settings)


_active: contextvars.ContextVar[tuple[ZooSettings, Path | None] | None] = contextvars.ContextVar("moekit_zoo", default=None)


@contextlib.contextmanager
def use_zoo(settings: ZooSettings, cache: Path | None = None):
    """Make `zoo:NAME` references resolve into the zoo of `settings` (in `cache`) inside this block."""
    register()
    token = _active.set((settings, cache))
    try:
        yield
    finally:
        _active.reset(token)


def resolve(name: str) -> Path:
    """Local directory of zoo model `name` (base, code, prose, math, json), making the zoo if needed."""
    if name not in MODEL_NAMES:
        raise SourceError(f"'zoo:{name}' is not a zoo model{did_you_mean(name, MODEL_NAMES)}", hint=f"the zoo has {', '.join(MODEL_NAMES)}")
    settings, cache = _active.get() or (PRESETS["standard"], None)
    return ensure_zoo(settings, cache).model(name)


def register() -> None:
    """Register `resolve` for `zoo:` references with the build's source resolution. Idempotent."""
    from moekit.build.sources import register_resolver

    register_resolver("zoo", resolve)


__all__ = ["MODEL_NAMES", "PRESETS", "Zoo", "ZooSettings", "cache_dir", "ensure_zoo", "is_made", "register", "resolve", "use_zoo", "zoo_directory"]
