"""Typed errors. Library code raises these; only `moekit.cli` turns them into a message and an exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoekitError(Exception):
    """An error the user can act on. `str(err)` is the whole message, `hint` says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(MoekitError):
    """The recipe file is missing, unreadable or invalid."""


class SourceError(MoekitError):
    """A source model cannot be found, fetched or read."""


class IncompatibleModelsError(MoekitError):
    """Experts and base model cannot be combined into one MoE."""


class UnsupportedArchitectureError(MoekitError):
    """No output architecture supports these inputs."""


class OutputError(MoekitError):
    """The output location cannot be used (exists, not writable, disk full)."""


class DataError(MoekitError):
    """An evaluation or training dataset is missing, unreadable or has the wrong shape."""


class TargetError(MoekitError):
    """Fine-tuning targets are invalid or matched nothing."""


class TrainingError(MoekitError):
    """Training ran but did not do what was asked (for example an adapter did not change)."""


class DependencyError(MoekitError):
    """An optional dependency is missing or unusable on this machine."""


class PublishError(MoekitError):
    """Publishing to the Hub failed or was refused."""


class PlanError(MoekitError):
    """A memory plan cannot be made for these settings."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
