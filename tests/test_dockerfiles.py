"""Lint the Dockerfiles with hadolint (from PyPI)."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    files = [str(REPO / "docker" / "Dockerfile"), str(REPO / "docker" / "base.Dockerfile")]
    proc = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
