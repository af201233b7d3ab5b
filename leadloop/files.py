"""Files and folders readable by their owner only: the store, models and reports hold lead data.

The CLI also sets the process umask to 077 (`leadloop.cli`), so every file leadloop writes is
owner-only; these helpers make it so for the places that matter when leadloop is used as a
library too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """Create `path` (and its parents) if missing; a folder created here is 0700."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        with contextlib.suppress(OSError):
            path.chmod(PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """Make `path` an owner-only file (created empty if missing), ready to be written."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE)
    os.close(fd)
    with contextlib.suppress(OSError):
        path.chmod(PRIVATE_FILE)
    return path
