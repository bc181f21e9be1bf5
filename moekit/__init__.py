"""moekit: build mixture-of-experts models from dense checkpoints, fine-tune, evaluate and publish them."""

__version__ = "0.1.0"
