"""The GPU lane (README "Development"): `python -m pytest -m gpu tests` must select tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_gpu_lane_selects_tests():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(TESTS)],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        timeout=600,
        check=False,
    )
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    assert done.returncode == 0 and selected, done.stdout[-3000:] + done.stderr[-3000:]
