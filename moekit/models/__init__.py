"""moekit's own model code (Phixtral) and its registration with transformers' Auto classes.

Importing this package imports neither torch nor transformers, and registers nothing. `register_phixtral()`
does, explicitly: moekit's loading paths call it, and so can anyone who loads a moekit Phixtral in plain
transformers. After it, `AutoModelForCausalLM.from_pretrained(phixtral_dir)` works without trust_remote_code;
without moekit, `trust_remote_code=True` loads the copy of this code written next to the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PHIXTRAL_CODE_DIR = Path(__file__).parent / "phixtral"
# copied next to every Phixtral checkpoint so that it loads with trust_remote_code=True without moekit
PHIXTRAL_CODE_FILES = ("configuration_phixtral.py", "modeling_phixtral.py")
PHIXTRAL_AUTO_MAP = {
    "AutoConfig": "configuration_phixtral.PhixtralConfig",
    "AutoModelForCausalLM": "modeling_phixtral.PhixtralForCausalLM",
}


def register_phixtral_config() -> None:
    """Make AutoConfig know model_type 'phixtral' (for code that reads configs only). Idempotent."""
    from transformers import AutoConfig

    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig

    AutoConfig.register(PhixtralConfig.model_type, PhixtralConfig, exist_ok=True)


def register_phixtral() -> None:
    """Register PhixtralConfig with AutoConfig and PhixtralForCausalLM with AutoModelForCausalLM. Idempotent.

    Imports transformers, torch and the Phixtral model code: call it where a model is about to be loaded.
    """
    from transformers import AutoModelForCausalLM

    from moekit.models.phixtral.configuration_phixtral import PhixtralConfig
    from moekit.models.phixtral.modeling_phixtral import PhixtralForCausalLM

    register_phixtral_config()
    AutoModelForCausalLM.register(PhixtralConfig, PhixtralForCausalLM, exist_ok=True)


def write_phixtral_code(model_dir: Path) -> None:
    """Copy the Phixtral configuration and modeling files into `model_dir` (next to config.json)."""
    for name in PHIXTRAL_CODE_FILES:
        shutil.copyfile(PHIXTRAL_CODE_DIR / name, Path(model_dir) / name)
