"""Print the validator's and the stage values' figures against the sandbox's planted truth.

    .venv/bin/python bench/validation_truth.py [--leads 6000] [--seeds 8]

* every micro-conversion's lift, CI, q and verdict on a simulated store (the planted
  `help_center_visit` is a null spread over the first month: it should be "no signal");
* how often a true lift of 2.0 on 100 leads is told to retire (500 draws);
* `stages suggest` against the simulator's uncensored truth, over several funnels;
* the macro value behind expected value, as configured in the demo and with the macro stage
  set to "deal_amount" (which has no amounts at that stage).
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.sandbox.simulator import funnel_pages, simulate
from leadloop.store import make_engine, session_scope
from leadloop.sync import apply_page
from leadloop.tables import ValidationResult
from leadloop.validation import analyse, judge, p_text, run_validation
from leadloop.values import load_stage_rows, macro_value, suggest_stage_values

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
SIM_END = datetime(2026, 10, 1, tzinfo=UTC)
LIFECYCLE = {"Lead": "lead", "Marketing qualified": "marketingqualifiedlead",
             "Sales qualified": "salesqualifiedlead", "Won": "customer"}


def demo_context(engine: Engine, tmp: Path) -> Context:
    data = tomllib.loads(DEMO_CONFIG.read_text())
    data["model"] = {"dir": str(tmp / "models")}
    return Context(settings=settings_from_dict(data, base_dir=tmp), engine=engine,
                   now=lambda: SIM_END)


def load_funnel(ctx: Context, n: int, seed: int) -> None:
    with session_scope(ctx.engine) as session:
        for page in funnel_pages(simulate(n, seed=seed, end=SIM_END)):
            apply_page(session, ctx, "hubspot", "contacts", page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leads", type=int, default=6000)
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())

    engine = make_engine(f"sqlite:///{tmp / 'validation.db'}")
    ctx = demo_context(engine, tmp)
    load_funnel(ctx, args.leads, seed=11)
    run_validation(ctx)
    print(f"micro→macro on {args.leads} simulated leads (seed 11):")
    with Session(engine) as s:
        for r in s.exec(select(ValidationResult).where(ValidationResult.segment == "all")):
            print(f"  {r.micro:18s} lift {r.lift:.2f} ({r.lift_ci_low:.2f}–{r.lift_ci_high:.2f}) "
                  f"q {p_text(r.q_value):>8s}  {r.verdict} / {r.role}")

    retire = 0
    for seed in range(500):
        rng = np.random.default_rng(seed)
        has = rng.random(100) < 0.3
        y = (rng.random(100) < np.where(has, 0.4, 0.2)).astype(int)
        rows = judge(analyse(y, {"m": has}, min_events=10, min_group=30), alpha=0.05)
        retire += rows[0].role == "retire"
    print(f"true lift 2.0 on 100 leads (30 % with it, base 20 %): told to retire {retire / 500:.1%}")

    errors: dict[str, list[float]] = {}
    covered: dict[str, int] = {}
    for seed in range(1, args.seeds + 1):
        engine = make_engine(f"sqlite:///{tmp / f'values{seed}.db'}")
        ctx = demo_context(engine, tmp)
        load_funnel(ctx, args.leads, seed=seed)
        truth = simulate(args.leads, seed=seed, end=SIM_END).truth
        suggestions, _ = suggest_stage_values(engine, ctx.settings, SIM_END)
        for sug in suggestions:
            true_value = truth.stage_value(LIFECYCLE[sug.stage.name])
            errors.setdefault(sug.stage.name, []).append(sug.value / true_value - 1)
            covered[sug.stage.name] = covered.get(sug.stage.name, 0) + (
                sug.value_low <= true_value <= sug.value_high)
        if seed == 1:
            rows = load_stage_rows(engine, ctx.settings)
            data = tomllib.loads(DEMO_CONFIG.read_text())
            print(f"macro value, demo as configured: {macro_value(ctx.settings, rows)}")
            data["stages"][2]["value"] = "deal_amount"
            print(f"macro value, demo with the macro stage at deal_amount: "
                  f"{macro_value(settings_from_dict(data, base_dir=tmp), rows)}")
        engine.dispose()
    print(f"stages suggest vs the simulator's truth ({args.seeds} funnels of {args.leads} leads):")
    for name, errs in errors.items():
        print(f"  {name:20s} mean error {np.mean(errs):+.1%} (range {min(errs):+.1%} to "
              f"{max(errs):+.1%}), truth inside the interval {covered[name]}/{args.seeds}")


if __name__ == "__main__":
    main()
