"""Registry of output architectures."""

from __future__ import annotations

from moekit.build.arch.base import BuildInputs, OutputArchitecture
from moekit.build.arch.mixtral import MixtralArchitecture
from moekit.build.arch.phixtral import PhixtralArchitecture

ARCHITECTURES: dict[str, OutputArchitecture] = {arch.name: arch for arch in (MixtralArchitecture(), PhixtralArchitecture())}


def register(arch: OutputArchitecture) -> None:
    ARCHITECTURES[arch.name] = arch


def choose_architecture(inputs: BuildInputs, requested: str | None = None) -> OutputArchitecture:
    """The requested architecture, or the first that supports the inputs; raises with every reason."""
    from moekit.errors import UnsupportedArchitectureError

    candidates = [ARCHITECTURES[requested]] if requested else list(ARCHITECTURES.values())
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
