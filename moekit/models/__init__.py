"""moekit's own model code (Phixtral) and its registration with transformers' Auto classes.

Importing this package imports neither torch nor transformers. `install_registration_hook()` (called
by `import moekit`) registers the Phixtral classes right after transformers' auto modules are
imported, so `AutoModelForCausalLM.from_pretrained(phixtral_dir)` works without trust_remote_code in
any process that imported moekit, while `moekit --help` stays torch-free.
"""

from __future__ import annotations

import importlib.abc
import shutil
import sys
from pathlib import Path

PHIXTRAL_CODE_DIR = Path(__file__).parent / "phixtral"
# copied next to every Phixtral checkpoint so that it loads with trust_remote_code=True without moekit
PHIXTRAL_CODE_FILES = ("configuration_phixtral.py", "modeling_phixtral.py")
PHIXTRAL_AUTO_MAP = {
    "AutoConfig": "configuration_phixtral.PhixtralConfig",
    "AutoModelForCausalLM": "modeling_phixtral.PhixtralForCausalLM",
}

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_config_class() -> None:
    """Make AutoConfig know model_type 'phixtral'. Idempotent."""
    # submodules, not `from transformers import ...`: this may run while transformers' auto package is importing
    from transformers.models.auto.configuration_auto import AutoConfig

    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

    AutoConfig.register(PhixtralConfig.model_type, PhixtralConfig, exist_ok=True)


def register_auto_classes() -> None:
    """Register PhixtralConfig with AutoConfig and PhixtralForCausalLM with AutoModelForCausalLM. Idempotent.

    The model class is imported at its first lookup, not here: transformers imports its auto modules to
    write config docstrings, and importing the modeling code then would cost every config read (`moekit
    plan`) a second of start-up.
    """
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

    register_config_class()
    mapping = AutoModelForCausalLM._model_mapping
    if isinstance(getattr(mapping, "_extra_content", None), dict):
        if not isinstance(mapping._extra_content, _ImportOnLookup):
            mapping._extra_content = _ImportOnLookup(mapping._extra_content)
        mapping._extra_content[PhixtralConfig] = _phixtral_for_causal_lm
    else:  # a transformers without the lazy mapping's registry: register the class itself
        AutoModelForCausalLM.register(PhixtralConfig, _phixtral_for_causal_lm(), exist_ok=True)


def _phixtral_for_causal_lm():
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

    return PhixtralForCausalLM


class _ImportOnLookup(dict):
    """Registered auto-mapping entries whose value may be a loader (`_phixtral_for_causal_lm`), called at first lookup."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if value is _phixtral_for_causal_lm:
            value = value()
            self[key] = value
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[key] for key in self]

    def items(self):
        return [(key, self[key]) for key in self]


def write_phixtral_code(model_dir: Path) -> None:
    """Copy the Phixtral configuration and modeling files into `model_dir` (next to config.json)."""
    for name in PHIXTRAL_CODE_FILES:
        shutil.copyfile(PHIXTRAL_CODE_DIR / name, Path(model_dir) / name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs registrations right after transformers' auto modules have been imported.

    It finds each transformers module with the remaining finders and wraps that spec's loader, so the module
    itself is imported exactly as it would be otherwise. The registrations wait until the outermost
    transformers module being imported has finished (every transformers module is tracked for that):
    registering while, say, `modeling_utils` is half-initialised would be a circular import.
    """

    def __init__(self, callbacks: dict):
        self.callbacks = callbacks
        self.depth = 0
        self.pending: list = []

    def find_spec(self, fullname, path, target=None):
        # moekit's own model modules are tracked too: they import transformers, which may trigger a registration
        if fullname.partition(".")[0] != "transformers" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, self, self.callbacks.get(fullname))
                return spec
        return None

    def run_when_outermost(self, callback=None) -> None:
        """Queue `callback`; run the queue if no transformers module is being imported."""
        if callback is not None:
            self.pending.append(callback)
        if self.depth > 0 or not self.pending:
            return
        # a registration may import transformers modules itself: their callbacks queue and run in this loop
        self.depth += 1
        try:
            while self.pending:
                pending, self.pending = self.pending, []
                for queued in dict.fromkeys(pending):
                    queued()
        finally:
            self.depth -= 1


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, finder: _RegisterAfterImport, callback):
        self.loader = loader
        self.finder = finder
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.finder.depth += 1
        try:
            self.loader.exec_module(module)
            if self.callback is not None:
                self.finder.pending.append(self.callback)
        finally:
            # also when an outer optional import fails (transformers catches those) after an inner one queued
            self.finder.depth -= 1
            self.finder.run_when_outermost()

    def __getattr__(self, name):  # get_source, get_code, ... of the wrapped loader
        return getattr(self.loader, name)


def install_registration_hook() -> None:
    """Register now if transformers' auto modules are loaded, else right after they load. Imports nothing heavy."""
    finder = next((f for f in sys.meta_path if isinstance(f, _RegisterAfterImport)), None)
    if finder is None:
        finder = _RegisterAfterImport({_CONFIG_AUTO: register_config_class, _MODELING_AUTO: register_auto_classes})
        sys.meta_path.insert(0, finder)
    if _MODELING_AUTO in sys.modules or _CONFIG_AUTO in sys.modules:
        # transformers' auto classes are in use (and torch imported): registering everything costs little more
        finder.run_when_outermost(register_auto_classes)
