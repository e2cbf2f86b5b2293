"""Running checks of Triton kernels on CPU tensors: Triton picks its interpreter when kernels are defined,
from TRITON_INTERPRET, so the checks run in a new process with it set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_interpreted(module: str, function: str) -> None:
    """Call tests' `module.function()` in a new process under Triton's interpreter; skipped without Triton
    (the `cputest` extra installs it, as CI does); fails with the process's error output."""
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    code = f"import {module} as t; t.{function}()"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
