"""Fine-tuning of merged MoEs with (Q)LoRA."""
