"""Registry of output architectures."""

from __future__ import annotations

from moekit.build.arch.base import BuildInputs, OutputArchitecture
from moekit.build.arch.mixtral import MixtralArchitecture
from moekit.build.arch.phixtral import PhixtralArchitecture
from moekit.build.arch.qwen2_moe import Qwen2MoeArchitecture

ARCHITECTURES: dict[str, OutputArchitecture] = {arch.name: arch for arch in (MixtralArchitecture(), PhixtralArchitecture(), Qwen2MoeArchitecture())}
# mergekit-moe's output names (it matches `architecture:` as a case-insensitive prefix of them)
MERGEKIT_NAMES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe"}


def register(arch: OutputArchitecture) -> None:
    ARCHITECTURES[arch.name] = arch


def resolve_name(requested: str) -> str:
    """moekit's name for `requested`: one of ours, or (like mergekit-moe) a prefix of one of ours or of mergekit's names."""
    from moekit.errors import UnsupportedArchitectureError

    wanted = requested.strip().lower()
    if wanted in ARCHITECTURES:
        return wanted
    names = {**{name: name for name in ARCHITECTURES}, **MERGEKIT_NAMES}
    matches = list(dict.fromkeys(ours for name, ours in names.items() if name.startswith(wanted)))
    if len(matches) == 1:
        return matches[0]
    raise UnsupportedArchitectureError(
        f"architecture {requested!r} is not an output moekit writes" + (f" (it could be {' or '.join(matches)})" if matches else ""),
        hint="use one of: " + ", ".join(ARCHITECTURES) + " (mergekit-moe's DeepSeek MoE and Qwen3 MoE outputs are not supported)",
    )


def choose_architecture(inputs: BuildInputs, requested: str | None = None) -> OutputArchitecture:
    """The requested architecture, or the first that supports the inputs; raises with every reason."""
    from moekit.errors import UnsupportedArchitectureError

    candidates = [ARCHITECTURES[resolve_name(requested)]] if requested else list(ARCHITECTURES.values())
    reasons = {}
    for arch in candidates:
        reason = arch.supports(inputs)
        if reason is None:
            return arch
        reasons[arch.name] = reason
    details = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise UnsupportedArchitectureError(
        f"no output architecture can build from {inputs.base.architecture} ({details})",
        hint="supported input architectures: " + "; ".join(f"{a.name} from {', '.join(a.input_architectures)}" for a in ARCHITECTURES.values()),
    )
