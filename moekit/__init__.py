"""moekit: build mixture-of-experts models from dense checkpoints, fine-tune, evaluate and publish them."""

__version__ = "0.1.0"

# explicit, and cheap to import (no torch or transformers): `moekit.register_phixtral()` before loading a moekit
# Phixtral with transformers' Auto classes, or trust_remote_code=True
from moekit.models import register_phixtral

__all__ = ["__version__", "register_phixtral"]
