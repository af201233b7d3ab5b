"""What every job receives: settings, the database, a clock, and the shutdown signal."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import Engine

from leadloop.config import Settings
from leadloop.http import make_session
from leadloop.tables import utcnow


@dataclass
class Context:
    settings: Settings
    engine: Engine
    now: Callable[[], datetime] = utcnow
    dry_run: bool = False
    out_dir: Path | None = None  # where dry-run payloads, reports and demo output go
    stop: threading.Event = field(default_factory=threading.Event)
    job_run_id: int | None = None
    http_factory: Callable[..., requests.Session] = make_session
    config_path: Path | None = None  # the file `settings` came from (the daemon re-reads it)

    def http(self, **kwargs: Any) -> requests.Session:
        return self.http_factory(**kwargs)

    @property
    def stopping(self) -> bool:
        """True once SIGTERM/SIGINT arrived: finish the current batch, commit, return."""
        return self.stop.is_set()


@dataclass
class JobResult:
    name: str
    counts: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    notes: list[str] = field(default_factory=list)
