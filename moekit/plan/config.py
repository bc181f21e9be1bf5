"""Reading a model's config for the plan: config objects, dicts, directories, config.json, Hub ids, `scheme:NAME`."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import PlanError, SourceError

DENSE_TYPES = ("llama", "mistral", "phi", "phi3")
MOE_TYPES = ("mixtral", "phixtral")
KNOWN_TYPES = MOE_TYPES + DENSE_TYPES
# A config.json without these would be filled in from transformers' defaults (Mixtral's 8 experts x 32 layers x 4096):
# a plan, or an evaluation, of a model that is not the one on disk.
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
MOE_REQUIRED_FIELDS = ("num_local_experts", "num_experts_per_tok")


def missing_fields(config_dict: dict, model_type: str | None) -> list[str]:
    """The required fields a config.json (as a dict) leaves out, for a known architecture."""
    required = REQUIRED_FIELDS + (MOE_REQUIRED_FIELDS if model_type in MOE_TYPES else ())
    return [key for key in required if config_dict.get(key) is None]


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_config(config_or_path):
    """A transformers config from a config object, a dict, a directory, a config.json, a Hub id or `scheme:NAME` (zoo:NAME).

    Only config.json is read (fetched alone for Hub ids): no weights.
    """
    from transformers import AutoConfig, PretrainedConfig

    from moekit.models import register_phixtral_config

    register_phixtral_config()

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    if isinstance(config_or_path, dict):
        config_dict, name = dict(config_or_path), "config"
    else:
        config_file = _config_file(str(config_or_path))
        try:
            config_dict = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot read {config_file}: {err}") from None
        name = str(config_or_path)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{name} has no model_type: not a transformers model config")
    if model_type not in KNOWN_TYPES:
        architectures = config_dict.get("architectures") or []
        if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
            raise PlanError(f"the model is not a causal language model (architectures: {', '.join(architectures)})")
        raise PlanError(f"moekit plan does not know the architecture '{model_type}'", hint=f"known: {', '.join(KNOWN_TYPES)}")
    missing = missing_fields(config_dict, model_type)
    if missing:
        raise PlanError(
            f"{name} lacks required config fields: {', '.join(missing)}",
            hint="transformers would fill them in with its defaults, which are not this model's; add them to config.json",
        )
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, TypeError) as err:
        raise PlanError(f"invalid {model_type} config in {name}: {err}") from None


def _config_file(ref: str) -> Path:
    local = Path(ref).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"{local} has no config.json: not a model directory")
        return local / "config.json"
    from moekit.build.sources import reference_scheme, resolve_model

    if reference_scheme(ref) is not None:
        try:
            return _config_file(str(resolve_model(ref)))
        except SourceError as err:
            raise PlanError(err.message, hint=err.hint) from None
    return _hub_config(ref)


def _hub_config(ref: str) -> Path:
    """config.json of a Hub model, alone (no weights); honours HF_HUB_OFFLINE and the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from moekit.build.sources import HUB_ID, split_revision

    repo_id, revision = split_revision(ref)
    if not HUB_ID.match(repo_id) or repo_id.startswith((".", "/", "~")) or "/" not in repo_id:
        raise PlanError(f"model '{ref}' is not a directory and not a Hub id (org/name[@revision])")
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except LocalEntryNotFoundError:
        raise PlanError(
            f"model '{ref}' is not a local directory and its config.json is not in the Hugging Face cache (offline or unreachable Hub)",
            hint=f"check the name, or fetch it once with `hf download {repo_id} config.json`",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise PlanError(f"model '{ref}' was not found on the Hub ({type(err).__name__})") from None
    except (HfHubHTTPError, OSError) as err:
        raise PlanError(f"cannot fetch the config of '{ref}' from the Hub: {err}") from None
