"""Load a simulated funnel into a store (no HTTP) for the scoring, validation and values tests."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.sandbox.simulator import funnel_pages, simulate
from leadloop.store import session_scope
from leadloop.sync import apply_page

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
SIM_END = datetime(2026, 10, 1, tzinfo=UTC)


def demo_context(engine: Engine, tmp_path: Path, **sections: Any) -> Context:
    """The demo configuration (its stages and micro-conversions) over `engine`."""
    data = tomllib.loads(DEMO_CONFIG.read_text())
    data["model"] = {"dir": str(tmp_path / "models"), **sections.pop("model", {})}
    data.update(sections)
    settings = settings_from_dict(data, base_dir=tmp_path)
    return Context(settings=settings, engine=engine, now=lambda: SIM_END)


def load_funnel(ctx: Context, n: int, seed: int = 3) -> None:
    funnel = simulate(n, seed=seed, end=SIM_END)
    with session_scope(ctx.engine) as session:
        for page in funnel_pages(funnel):
            apply_page(session, ctx, "hubspot", "contacts", page)
