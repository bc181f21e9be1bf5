"""config.json that transformers 4.x readers understand too.

transformers 5 writes the rotary settings only as `rope_parameters` ({"rope_type", "rope_theta", ...}).
transformers 4.x (and tools that read config.json the 4.x way, such as llama.cpp's converter) know only the
flat `rope_theta`, `rope_scaling` and `partial_rotary_factor` keys; without them they fall back to the
architecture's default, which for Mixtral is rope_theta 1e6 instead of a Llama/Mistral base's 10000.
"""

from __future__ import annotations

import json
from pathlib import Path

# `rope_parameters` entries that transformers 4.x keeps as top-level config keys, not inside `rope_scaling`
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def legacy_rope_keys(rope_parameters: dict) -> dict:
    """The transformers 4.x keys that say what `rope_parameters` says (rope_scaling is None for plain RoPE)."""
    scaling = {key: value for key, value in rope_parameters.items() if key not in _TOP_LEVEL_ROPE_KEYS}
    legacy = {key: rope_parameters[key] for key in _TOP_LEVEL_ROPE_KEYS if key in rope_parameters}
    legacy["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return legacy


def save_config(config, directory: str | Path) -> None:
    """`config.save_pretrained(directory)`, with the legacy rope keys written beside `rope_parameters`."""
    config.save_pretrained(directory)
    path = Path(directory) / "config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    rope_parameters = written.get("rope_parameters")
    if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
        written.update(legacy_rope_keys(rope_parameters))
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")
