"""`leadloop demo`: one full cycle against the built-in sandbox, with no account and no network.

The sandbox simulates a B2B funnel, serves it through a fake HubSpot API on 127.0.0.1 and runs
fake ad-platform endpoints there too. The demo then runs the real code path — the HubSpot
connector, the scorer, the validator, the exporters and the report — exactly as a deployment
would, with `config/demo.toml` pointed at the sandbox.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import tomllib
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leadloop.config import load_settings, settings_from_dict
from leadloop.context import Context
from leadloop.errors import LeadloopError
from leadloop.jobs import run_cycle
from leadloop.store import make_engine

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
_HUBSPOT_TOKEN_ENV = "LEADLOOP_SANDBOX_HUBSPOT_TOKEN"
_PLATFORM_TOKEN_ENVS = ("LEADLOOP_SANDBOX_GOOGLE_TOKEN", "LEADLOOP_SANDBOX_META_TOKEN")
WORKBENCH_CONFIG = "leadloop.toml"


def _fresh_output(out: Path) -> None:
    """Remove what an earlier demo wrote (only the demo's own files) so numbers add up."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("leadloop.db", "leadloop.db-wal", "leadloop.db-shm"):
        (out / name).unlink(missing_ok=True)
    for sub in ("payloads", "models", f"{WORKBENCH_CONFIG}.history"):
        shutil.rmtree(out / sub, ignore_errors=True)


def _write_workbench_config(out: Path) -> Path:
    """`config/demo.toml` (comments kept) pointed at this output, for `leadloop serve`."""
    import tomlkit

    doc = tomlkit.parse(DEMO_CONFIG.read_text())
    doc["database"]["url"] = f"sqlite:///{(out / 'leadloop.db').resolve()}"
    doc["model"]["dir"] = str((out / "models").resolve())
    doc["report"]["out_dir"] = str(out.resolve())
    head = ("# Written by `leadloop demo` so that `leadloop -c <this file> serve` opens the workbench\n"
            "# on the demo's store. The sandbox's servers stopped with the demo: sync and export\n"
            "# from this file have nothing to connect to.\n")
    path = out / WORKBENCH_CONFIG
    path.write_text(head + tomlkit.dumps(doc), encoding="utf-8")
    return path


def _demo_settings(out: Path, hubspot_url: str, platform_urls: dict[str, str]) -> Any:
    if not DEMO_CONFIG.is_file():
        raise LeadloopError(
            f"demo config not found at {DEMO_CONFIG}",
            hint="run the demo from a checkout installed with `make demo` (pip install -e .)",
        )
    data = tomllib.loads(DEMO_CONFIG.read_text())
    data["database"]["url"] = f"sqlite:///{(out / 'leadloop.db').resolve()}"
    data["crm"]["base_url"] = hubspot_url
    for name, section in data.get("destinations", {}).items():
        section["base_url"] = platform_urls[section.get("kind", name)]
    data["model"]["dir"] = str((out / "models").resolve())
    data["report"]["out_dir"] = str(out.resolve())
    return settings_from_dict(data, source=str(DEMO_CONFIG), base_dir=DEMO_CONFIG.parent)


def run_demo(out: Path | None = None, *, n_leads: int = 5000, seed: int = 7) -> str:
    """Run the demo and return the summary printed to the user (`out`: see `default_out`)."""
    from leadloop.sandbox.fake_hubspot import FakeHubSpot
    from leadloop.sandbox.fake_platforms import FakePlatforms
    from leadloop.sandbox.simulator import simulate

    started = time.monotonic()
    out = out or default_out()
    _fresh_output(out)
    # The funnel ends now, so the newest stages are recent enough for every platform's window.
    funnel = simulate(n_leads, seed=seed, end=datetime.now(UTC).replace(microsecond=0))
    # Fresh random sandbox credentials, passed the way real ones are: through the environment.
    hubspot_token, platform_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    os.environ[_HUBSPOT_TOKEN_ENV] = hubspot_token
    os.environ.update(dict.fromkeys(_PLATFORM_TOKEN_ENVS, platform_token))
    with ExitStack() as stack:
        hubspot = stack.enter_context(FakeHubSpot(funnel, token=hubspot_token))
        platforms = stack.enter_context(FakePlatforms(require_token=platform_token))
        settings = _demo_settings(out, hubspot.base_url, platforms.urls)
        ctx = Context(settings=settings, engine=make_engine(settings.database.url), out_dir=out)
        results = run_cycle(ctx)
        received = {
            name: len(platforms.ledgers[settings.destination_kind(name)])
            for name in settings.destinations
        }
    failed = [r for r in results if not r.ok]
    if failed:
        raise LeadloopError(
            "demo cycle failed: " + "; ".join(f"{r.name}: {r.error}" for r in failed)
        )
    by_name = {r.name: r.counts for r in results}
    _write_workbench_config(out)
    return _summary(out, by_name, received, time.monotonic() - started)


def _summary(out: Path, counts: dict[str, dict], received: dict[str, int], seconds: float) -> str:
    sync, score, validate, export = (counts.get(k, {}) for k in ("sync", "score", "validate",
                                                                  "export"))
    payload_files = Counter(p.parent.name for p in (out / "payloads").glob("*/*.json"))
    lines = [
        f"leadloop demo finished in {seconds:.1f} s (sandbox: fake HubSpot + fake ad platforms "
        "on 127.0.0.1)",
        f"  synced      {sync.get('leads', 0)} leads, {sync.get('stages', 0)} stage changes, "
        f"{sync.get('events', 0)} micro-conversions, {sync.get('rejected', 0)} rejected records",
        f"  scored      {score.get('scored', 0)} leads with model {score.get('model_version', '-')}"
        + (f" (fallback: {score['fallback']})" if score.get("fallback") else ""),
        f"  validated   {validate.get('tests', validate.get('micros', 0))} micro→macro tests",
    ]
    for dest, n in sorted(received.items()):
        held = export.get("destinations", {}).get(dest, {}).get("held", 0)
        requests = payload_files[dest]
        lines.append(f"  exported    {dest}: {n} conversions accepted in {requests} "
                     f"request{'s' * (requests != 1)}, {held} held back by platform rules "
                     "(see the report)")
    lines += [
        f"  report      {out / 'report.html'}",
        f"  validation  {out / 'validation.csv'}",
        f"  payloads    {out / 'payloads'}/<destination>/<batch>.json",
        f"  database    {out / 'leadloop.db'}",
        f"  workbench   leadloop -c {out / WORKBENCH_CONFIG} serve   "
        "(then open http://127.0.0.1:8765/)",
    ]
    return "\n".join(lines)


def default_out() -> Path:
    """Where `config/demo.toml` keeps the demo's report, with its store and model beside it
    (relative to the config's folder: the checkout's demo-output/). The demo writes there by
    default, so `leadloop -c config/demo.toml status|report|model …` read what it wrote, from
    any working directory."""
    if not DEMO_CONFIG.is_file():
        raise LeadloopError(
            f"demo config not found at {DEMO_CONFIG}",
            hint="run the demo from a checkout installed with `make demo` (pip install -e .)",
        )
    return Path(load_settings(DEMO_CONFIG).report.out_dir)
