"""`moekit eval`: an MoE next to each of its source models (`compare.evaluate`, options in `options.py`)."""
