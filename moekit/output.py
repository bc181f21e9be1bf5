"""Crash-safe output directories.

Everything a command writes goes into `.OUT.moekit-staging`, a sibling of OUT, which replaces OUT in
one atomic step at the end (`renameat2(RENAME_EXCHANGE)`), so a failure, Ctrl-C, SIGTERM, SIGKILL or
a full disk never leaves a half-written OUT, and an old OUT stays whole until the new one is complete.

OUT is locked for the whole run with an exclusive `flock` on `.OUT.moekit-lock`, which holds the
holder's PID: a second run into the same OUT is refused naming that PID. The kernel drops the lock when
its process dies, so a staging directory found under a free lock was left by a killed run: it is
removed, and the user is told. Directories are created with the user's umask like any other program's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import OutputError

_RENAME_EXCHANGE = 2  # linux/fs.h


def notice(message: str) -> None:
    """A line on stderr for things the user should know that are not errors (stale folders cleaned)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.moekit-staging")


def set_aside_dir(out: Path) -> Path:
    """Where an old OUT waits between two plain renames (only where an atomic exchange is unavailable)."""
    return out.with_name(f".{out.name}.moekit-old")


def check_output(out: Path, overwrite: bool, what: str = "output directory") -> None:
    """Refuse an OUT that is a file, the current directory or one above it, a non-empty directory
    without `overwrite`, or one whose parent cannot be written, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a directory")
    resolved = out.resolve()
    if out.is_dir() and resolved in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise OutputError(f"{what} {out} is the current directory (or holds it), which moekit cannot replace", hint="choose a new directory with -o")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{what} {out} exists and is not empty", hint="choose another -o or pass --overwrite")
    check_writable(resolved.parent, f"{what} {out}")


def check_writable(parent: Path, what: str) -> None:
    """OutputError unless `parent` (or its nearest existing ancestor, where it would be created) can be written."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create {what}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(existing) else "is not writable"
        raise OutputError(f"cannot create {what}: {existing} {why}", hint="choose another -o")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class OutputLock:
    """An exclusive lock on OUT for the life of a run: `flock` on `.OUT.moekit-lock`, which holds the PID.
    Re-entrant within a process: a command that locks OUT early and then stages it takes it twice."""

    def __init__(self, path: Path, fd: int, stale_pid: str | None):
        self.path = path
        self.fd = fd
        self.stale_pid = stale_pid  # PID left by an earlier holder that did not finish (killed), if any
        self.count = 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        _held.pop(self.path, None)
        self.path.unlink(missing_ok=True)  # unlinked before unlocking: a waiter re-checks the path and retries
        os.close(self.fd)
        self.fd = -1


_held: dict[Path, OutputLock] = {}


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.moekit-lock")


def lock_output(out: Path, what: str) -> OutputLock:
    """Lock OUT against other moekit runs; OutputError naming the other process if one holds it."""
    path = lock_path(Path(out).absolute())
    if path in _held:
        _held[path].count += 1
        return _held[path]
    check_writable(path.parent, what)
    for _ in range(10):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _output_error(err, what) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _holder_pid(path)
            raise OutputError(
                f"another moekit process{f' (PID {pid})' if pid else ''} is writing {what}",
                hint=f"wait for it to finish or stop it, or choose another -o (its lock: {path})",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder finished and removed the lock between our open and our flock: again
            os.close(fd)
            continue
        stale = _read_pid(path)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as err:
            os.close(fd)
            raise _output_error(err, what) from None
        _held[path] = OutputLock(path, fd, stale)
        return _held[path]
    raise OutputError(f"cannot lock {what}: its lock file keeps being replaced by another process")


def _read_pid(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _holder_pid(path: Path, wait_s: float = 2.0) -> str | None:
    """The PID of the process holding the lock at PATH. The holder writes it just after taking the lock,
    so a lock taken a moment ago may still hold nothing, or the PID of a killed earlier holder: wait for a
    live one."""
    deadline = time.monotonic() + wait_s
    while True:
        pid = _read_pid(path)
        if pid and _alive(pid):
            return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # alive, under another user
        return True
    except (ValueError, OSError):
        return False
    return True


def _output_error(err: OSError, what: str) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"the disk is full while writing {what}; nothing was written", hint="free space or choose another -o")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {what}: {err.strerror} ({err.filename})", hint="choose another -o")
    return OutputError(f"cannot write {what}: {err}")


def recover_set_aside(out: Path) -> None:
    """An OUT that a killed run had set aside between two plain renames is put back."""
    old = set_aside_dir(out)
    if not old.is_dir():
        return
    if not out.exists():
        old.rename(out)
        notice(f"restored {out} from {old}, where an interrupted run had set it aside")
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(out: Path, *, overwrite: bool, what: str = "output directory") -> Iterator[Path]:
    """Lock OUT and yield its empty staging directory; on success the staging directory replaces OUT
    atomically, on any failure it is removed and OUT is as it was."""
    out = Path(out).absolute()
    check_output(out, overwrite, what)
    lock = lock_output(out, f"{what} {out}")
    staging = staging_dir(out)
    try:
        if set_aside_dir(out).exists():
            recover_set_aside(out)
            check_output(out, overwrite, what)  # again, with OUT back in its place
        if staging.exists():
            shutil.rmtree(staging)
            notice(f"removed {staging}, left by an earlier run{f' (PID {lock.stale_pid})' if lock.stale_pid else ''} that was killed")
        staging.mkdir()
        yield staging
        move_into_place(staging, out, overwrite=overwrite)
    except OSError as err:
        _discard(staging)
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise _output_error(err, f"{what} {out}") from None
        raise
    except BaseException:
        _discard(staging)
        raise
    finally:
        lock.release()


def _discard(staging: Path) -> None:
    from moekit.cli import signals_held

    with signals_held():  # a second Ctrl-C or SIGTERM must not stop the clean-up half-way
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, out: Path, *, overwrite: bool) -> None:
    """Put the finished `staging` directory at OUT: atomically where the system can, replacing an existing OUT
    only with `overwrite` (an empty OUT is always replaced). The old OUT is deleted afterwards."""
    if not out.exists():
        staging.rename(out)
        return
    if not overwrite and any(out.iterdir()):
        raise OutputError(f"{out} appeared while it was being written; nothing was replaced")
    if not exchange(staging, out):  # else staging now holds the old OUT
        old = set_aside_dir(out)  # no atomic exchange here: two renames, undone by the next run if killed between them
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        old.rename(staging)
    shutil.rmtree(staging, ignore_errors=True)  # the old OUT, moved out of place


_libc = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
