"""What the terminal shows besides results: a status line while heavy libraries load, and no third-party noise.

`quiet_third_party()` hides warnings and log lines of the libraries moekit drives that tell a moekit user
nothing they can act on (`moekit --verbose` shows them). `status("loading torch")` shows a spinner on
stderr while a slow step runs, when stderr is a terminal; elsewhere (logs, tests) it prints nothing.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from contextlib import contextmanager

# (category, start of the message) of warnings raised inside the libraries, not by the user's settings
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # TRL reads transformers' deprecated alias on every step (transformers 5.x)
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)
# logger name -> start of the messages dropped from it
NOISY_LOGS: dict[str, tuple[str, ...]] = {
    # bitsandbytes tries an optional Hub kernel at import on CPUs with AVX512-BF16 and falls back to its own
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Hide the warnings and log lines listed above. Imports nothing heavy; idempotent."""
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name, prefixes in NOISY_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


@contextmanager
def status(message: str, stream=None):
    """A spinner with `message` on a terminal while the block runs; the line is cleared afterwards."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        frames = "|/-\\"
        index = 0
        while not done.wait(0.1):
            stream.write(f"\r{frames[index % len(frames)]} {message}")
            stream.flush()
            index += 1

    stream.write(f"  {message}")
    stream.flush()
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        stream.write("\r\033[K")
        stream.flush()
