"""Run a test script in a fresh Python with Triton's interpreter on (TRITON_INTERPRET=1, read
when triton is imported, so it must be a new process): Triton kernels run on CPU tensors here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, timeout: float = 600) -> str:
    """Run ``code`` under the interpreter from the repository root; fail the test with the end
    of its stderr if it fails; return its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
