"""The DICOM standard's IOD validator as the judge: `dciodvfy` from dicom3tools (Debian package).

`make test` installs dicom3tools when it runs as root; elsewhere the tests that need it skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not found: install the Debian package dicom3tools (make test does as root)")


@dataclass(frozen=True)
class Verdict:
    iod: str
    errors: list[str]
    warnings: list[str]

    def describe(self) -> str:
        return "\n".join([f"IOD {self.iod}", *self.errors, *self.warnings])


def validate(path: Path) -> Verdict:
    """Run dciodvfy on one file; its findings are lines starting with 'Error' or 'Warning'."""
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    iods = [line for line in lines if not line.startswith(("Error", "Warning"))]
    return Verdict(iod=iods[0] if iods else "", errors=errors, warnings=warnings)
