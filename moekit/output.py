"""Atomic output directories: everything is written into a temporary sibling of OUT and renamed
onto OUT at the end, so a failure, Ctrl-C or a full disk never leaves a half-written OUT."""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import OutputError


def check_output(out: Path, overwrite: bool, what: str = "output directory") -> None:
    """Refuse an OUT that is a file, or a non-empty directory without `overwrite`, before any work."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{what} {out} exists and is not empty", hint="choose another -o or pass --overwrite")


@contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty sibling directory of `out` to write into; on success it becomes `out`
    (an old `out` is removed only once the new one is in place), on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.moekit-", dir=out.parent))
    try:
        yield staging
        _move_into_place(staging, out, overwrite)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise OutputError(f"the disk is full while writing {out}; nothing was written", hint="free space or choose another -o") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def output_in_place(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Like `staged_output`, but the work is written at `out` itself, for outputs that record their own
    paths (the demo's reports). An old `out` is set aside and restored if the work fails."""
    check_output(out, overwrite)
    old = _set_aside(out)
    shutil.rmtree(old, ignore_errors=True)
    if out.is_dir():
        out.rename(old)
    out.mkdir(parents=True)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise OutputError(f"{out} appeared while it was being written; nothing was replaced")
        old = _set_aside(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _set_aside(out: Path) -> Path:
    """Where an old OUT waits while its replacement is written."""
    return out.with_name(f".{out.name}.moekit-old")
