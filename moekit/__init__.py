"""moekit: build mixture-of-experts models from dense checkpoints, fine-tune, evaluate and publish them."""

__version__ = "0.1.0"

# Phixtral is registered with transformers' Auto classes as soon as transformers' auto modules load;
# the hook itself imports neither torch nor transformers, so `moekit --help` stays fast.
from moekit.models import install_registration_hook as _install_registration_hook

_install_registration_hook()
