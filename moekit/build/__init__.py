"""`moekit build`: assemble an MoE from dense checkpoints described by a recipe (`pipeline.build`, options in `options.py`)."""
