"""The `leadloop` command line. Argument parsing and printing only: the work is in the jobs.

Exit codes: 0 ok, 1 a job failed (or `status` saw a failed last run), 2 bad usage or config.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from leadloop import __version__
from leadloop.errors import LeadloopError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("leadloop")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(exc: LeadloopError) -> None:
    click.echo(f"Error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"Hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


def handle_errors(fn: F) -> F:
    """Print a `LeadloopError` as one `Error:` line (no traceback) with its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LeadloopError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            _fail(exc)

    return wrapper  # type: ignore[return-value]


def _context(click_ctx: click.Context, **overrides: Any) -> Any:
    """Build the job Context from the global --config (loaded once per invocation)."""
    from leadloop.config import load_settings
    from leadloop.context import Context
    from leadloop.store import make_engine

    root = click_ctx.find_root()
    path = root.params.get("config")
    if not path:
        raise click.UsageError("this command needs --config FILE (see config/leadloop.example.toml)")
    settings = load_settings(path)
    if click_ctx.info_name in _CREATE_STORE_FOLDER:
        _make_store_folder(settings.database.url)
    engine = make_engine(settings.database.url, echo=settings.database.echo)
    return Context(settings=settings, engine=engine, config_path=Path(path), **overrides)


# Commands that fill a new store: they make the folder its config names for the SQLite file
# (an example's example-output/<name>/), as report and model folders are made when written.
# The others read a store, so a missing folder stays an error there (likely a typo).
_CREATE_STORE_FOLDER = ("sync", "run")


def _make_store_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        database = url.removeprefix("sqlite:///").partition("?")[0]
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def _print_results(results: list[Any]) -> int:
    code = EXIT_OK
    for r in results:
        status = "FAILED" if not r.ok else "skipped" if r.counts.get("skipped") else "ok"
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items() if not isinstance(v, list | dict))
        click.echo(f"{r.name:<9} {status:<7} {counts}")
        for note in r.counts.get("notes", []):
            click.echo(f"          note: {note}")
        if r.error:
            click.echo(f"          {r.error}", err=True)
            code = EXIT_FAILED
    return code


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="LEADLOOP_CONFIG",
              help="TOML config file (or $LEADLOOP_CONFIG).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines for people, or JSON lines for log shippers.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="leadloop")
def cli(config: str | None, log_format: str, log_level: str, debug: bool) -> None:
    """leadloop feeds lead quality from your CRM back to your ad platforms.

    It pulls leads and their stage history from the CRM, learns what each lead is worth and
    which micro-conversions predict the macro conversion, and uploads qualified stages with
    values as offline conversions.

    \b
    Try it with no account and no network:
      leadloop demo --out demo-output
    """
    from leadloop.logs import setup_logging

    setup_logging(log_level, log_format)  # type: ignore[arg-type]


def _job_command(name: str, help_text: str) -> None:
    @cli.command(name=name, help=help_text)
    @click.pass_context
    @handle_errors
    def command(click_ctx: click.Context) -> None:
        from leadloop.jobs import run_job

        ctx = _context(click_ctx)
        sys.exit(_print_results([run_job(ctx, name)]))


_job_command(
    "sync",
    "Pull new and changed leads, deals and stage history from the CRM (incremental).\n\n"
    "Example: leadloop -c leadloop.toml sync",
)
_job_command(
    "score",
    "Score leads with the current model (training one first if there is none).\n\n"
    "Example: leadloop -c leadloop.toml score",
)


@cli.command()
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False),
              help="Analyse a CRM export instead of the store.")
@click.option("--label", help="With --csv: the column that marks the macro conversion.")
@click.option("--positive", help="With --csv: the label value that means converted "
              "(default: yes/true/1).")
@click.option("--micro", "micros", multiple=True, metavar="NAME=EXPR",
              help="With --csv: a micro-conversion as a leadloop expression (README: "
              "micro-conversion expressions), e.g. "
              "'guide=`A free copy of Mastering The Interview` == \"Yes\"'. Repeatable.")
@click.option("--sep", help="With --csv: the delimiter (detected when absent).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@handle_errors
def validate(click_ctx: click.Context, csv_path: str | None, label: str | None,
             positive: str | None, micros: tuple[str, ...], sep: str | None,
             as_json: bool) -> None:
    """Test which micro-conversions predict the macro conversion (lift, CI, q-values, verdict).

    Without --csv it analyses the store and records the results; with --csv it analyses any
    CRM export and prints the table.

    \b
    Example:
      leadloop validate --csv Leads.csv --label Converted \\
        --micro 'guide=`A free copy of Mastering The Interview` == "Yes"' --json
    """
    if csv_path:
        from leadloop.validation import p_json, validate_csv

        if not label or not micros:
            raise click.UsageError("--csv needs --label and at least one --micro NAME=EXPR")
        rows = validate_csv(csv_path, label=label, positive=positive, micros=list(micros), sep=sep)
        if as_json:
            # a p-value that underflowed prints as the bound "< 1e-300", not as a certain 0
            shown = [{**r.csv_row(), "p_value": p_json(r.p_value), "q_value": p_json(r.q_value)}
                     for r in rows]
            click.echo(json.dumps(shown, indent=2, default=str))
        else:
            from leadloop.report.terminal import print_validation_rows

            print_validation_rows([r.csv_row() for r in rows])
        return
    from leadloop.jobs import run_job

    ctx = _context(click_ctx)
    sys.exit(_print_results([run_job(ctx, "validate")]))


@cli.command()
@click.option("--dry-run", is_flag=True,
              help="Build the exact request bodies, write one file per request under "
              "--out/payloads/<destination>/, use validate-only modes, and send nothing for real.")
@click.option("--out", type=click.Path(file_okay=False), default="leadloop-dry-run",
              show_default=True, help="With --dry-run: where the payload files go.")
@click.option("--wait", is_flag=True, help="If the daemon (or another export) holds the lease on "
              "this database, wait for it instead of refusing.")
@click.pass_context
@handle_errors
def export(click_ctx: click.Context, dry_run: bool, out: str, wait: bool) -> None:
    """Build conversions for qualified stages and upload them to the configured platforms.

    Uploads are idempotent: each conversion has a deterministic order id and is sent once. One
    sender at a time: export takes the database's lease (or waits for it with --wait). A dry run
    changes nothing in the store and is not recorded as a run.

    Example: leadloop -c leadloop.toml export --dry-run --out /tmp/payloads
    """
    ctx = _context(click_ctx, dry_run=dry_run, out_dir=Path(out) if dry_run else None)
    with _lease(ctx, "export", wait) as owner:
        if owner is None:
            return
        if dry_run:
            from leadloop.context import JobResult
            from leadloop.jobs import export_under_lease

            sys.exit(_print_results([JobResult("export", counts=export_under_lease(ctx))]))
        from leadloop.jobs import run_job

        sys.exit(_print_results([run_job(ctx, "export")]))


def _lease(ctx: Any, purpose: str, wait: bool) -> Any:
    """The database's lease for a command that sends or writes the outbox (see leadloop.lease)."""
    from datetime import timedelta

    from leadloop.lease import exclusive

    return exclusive(ctx.engine, purpose, ttl=timedelta(seconds=ctx.settings.schedule.lease_seconds),
                     wait=wait, now=ctx.now, stop=ctx.stop)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["html", "csv", "json", "text"]),
              default="text", show_default=True)
@click.option("--out", type=click.Path(), help="File or directory to write (default: stdout "
              "for text/json, [report] out_dir for html/csv).")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]),
              help="Only leads created on or after this date (UTC).")
@click.option("--ad-spend", type=click.Path(exists=True, dir_okay=False),
              help="CSV of ad spend per month, source and campaign (overrides [report] ad_spend): "
              "adds cost per lead, cost per qualified lead and ROAS.")
@click.pass_context
@handle_errors
def report(click_ctx: click.Context, fmt: str, out: str | None, since: Any,
           ad_spend: str | None) -> None:
    """The lead-value report: value by source, validation, model card, uploads, guardrails.

    Example: leadloop -c leadloop.toml report --format html --out report.html
    """
    from leadloop.report import render_report

    ctx = _context(click_ctx)
    text = render_report(ctx, fmt=fmt, out=Path(out) if out else None, since=since,
                         ad_spend=Path(ad_spend) if ad_spend else None)
    if text:
        click.echo(text)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def status(click_ctx: click.Context, as_json: bool) -> None:
    """Last run of each job, next runs, conversions by status per destination, lease holder.

    Exits 1 when the last run of any job failed, so monitors can alert on it.
    """
    from leadloop.status import collect_status, format_status

    ctx = _context(click_ctx)
    data = collect_status(ctx)
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_status(data))
    paused = any(a["level"] == "paused" for a in data.get("destination_alerts") or [])
    failed = data.get("failed_jobs") or data.get("interrupted_jobs") or paused
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --token-env.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--token-env", metavar="NAME",
              help="Environment variable holding the access token: every request then needs "
              "`Authorization: Bearer <token>` or the session cookie /login sets.")
@click.option("--ad-spend", type=click.Path(exists=True, dir_okay=False),
              help="CSV of ad spend per month, source and campaign (overrides [report] ad_spend).")
@click.pass_context
@handle_errors
def serve(click_ctx: click.Context, host: str, port: int, token_env: str | None,
          ad_spend: str | None) -> None:
    """The stage-mapping workbench: a local web page to decide stage values, destinations and
    micro-conversion roles, with the evidence next to each control.

    Saving edits the config file in place (comments kept, a timestamped copy of the previous
    file kept, every change logged); a running daemon applies it from its next job.

    Example: leadloop -c leadloop.toml serve   # then open http://127.0.0.1:8765/
    """
    import os

    from leadloop.errors import ConfigError
    from leadloop.redact import register_secret
    from leadloop.web import serve as run_server
    from leadloop.web.security import LOOPBACK

    path = click_ctx.find_root().params.get("config")
    if not path:
        raise click.UsageError("serve needs --config FILE (see config/leadloop.example.toml)")
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError("--token-env", f"environment variable {token_env} is not set or empty")
        register_secret(token)
    elif host not in LOOPBACK:
        raise click.UsageError(f"--host {host} is reachable from other machines: "
                               "give --token-env NAME (an environment variable holding a token)")
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"leadloop workbench on http://{shown}:{port}/ (Ctrl-C to stop)")
    run_server(Path(path), host=host, port=port, token=token,
               ad_spend=Path(ad_spend) if ad_spend else None)


@cli.command()
@click.option("--once", is_flag=True, help="Run one full cycle (sync, score, validate, export, "
              "report) and exit.")
@click.option("--wait", is_flag=True, help="If another daemon (or an export) holds the lease, "
              "wait for it.")
@click.pass_context
@handle_errors
def run(click_ctx: click.Context, once: bool, wait: bool) -> None:
    """Run leadloop: as a daemon on the [schedule] of the config, or one cycle with --once.

    One daemon per database (a lease in the store); `run --once` takes the same lease for its
    cycle. SIGTERM/SIGINT finish the batch in flight, commit, and exit 0.
    """
    if once:
        from leadloop.jobs import run_cycle

        ctx = _context(click_ctx)
        with _lease(ctx, "run --once", wait) as owner:
            if owner is None:
                return
            sys.exit(_print_results(run_cycle(ctx)))
    from leadloop.daemon import run_daemon

    ctx = _context(click_ctx)
    sys.exit(run_daemon(ctx, wait=wait))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for the database, report, validation table, payloads and model "
              "(default: the checkout's demo-output/, where config/demo.toml looks).")
@click.option("--leads", type=click.IntRange(100, 2_000_000), default=5000, show_default=True,
              help="How many simulated leads.")
@click.option("--seed", type=int, default=7, show_default=True)
@handle_errors
def demo(out: str | None, leads: int, seed: int) -> None:
    """Run one full cycle against the built-in sandbox: a simulated CRM (a fake HubSpot on
    127.0.0.1) and fake ad platforms. No account, no network.
    """
    from leadloop.demo import run_demo

    summary = run_demo(Path(out) if out else None, n_leads=leads, seed=seed)
    click.echo(summary)


@cli.group()
def db() -> None:
    """The store's schema: upgrade a store made by an earlier release."""


@db.command("upgrade")
@click.pass_context
@handle_errors
def db_upgrade(click_ctx: click.Context) -> None:
    """Migrate the store to this release's schema (a new store needs nothing: it is created
    current). Data is kept; other commands refuse an outdated store until this has run.

    Example: leadloop -c leadloop.toml db upgrade
    """
    from leadloop import schema
    from leadloop.config import load_settings
    from leadloop.store import make_engine

    path = click_ctx.find_root().params.get("config")
    if not path:
        raise click.UsageError("this command needs --config FILE (see config/leadloop.example.toml)")
    settings = load_settings(path)
    engine = make_engine(settings.database.url, echo=settings.database.echo, check_schema=False)
    try:
        before, after = schema.upgrade(engine)
    finally:
        engine.dispose()
    if before == after:
        click.echo(f"the store is current (schema revision {after})")
    else:
        click.echo(f"the store was upgraded from schema revision {before or 'none (before migrations)'}"
                   f" to {after}")


@cli.group()
def model() -> None:
    """Trained lead-value models: list, show a model card, train now, evaluate on a CSV export."""


@model.command("list")
@click.pass_context
@handle_errors
def model_list(click_ctx: click.Context) -> None:
    """List registered models, newest first."""
    from leadloop.scoring.registry import format_model_list

    ctx = _context(click_ctx)
    click.echo(format_model_list(ctx))


@model.command("show")
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the whole card as JSON.")
@click.pass_context
@handle_errors
def model_show(click_ctx: click.Context, version: str | None, as_json: bool) -> None:
    """Print a model card (default: the current model): what was chosen or why it fell back,
    its figures next to the baseline's, calibration (overall and by age), suspected leakage.

    Example: leadloop -c leadloop.toml model show --json
    """
    from leadloop.scoring.registry import format_model_card, load_card

    ctx = _context(click_ctx)
    if as_json:
        click.echo(json.dumps(load_card(ctx.settings, version).to_dict(), indent=2, default=str))
    else:
        click.echo(format_model_card(ctx, version))


@model.command("train")
@click.pass_context
@handle_errors
def model_train(click_ctx: click.Context) -> None:
    """Train a model on the store now and make it current (or record why it falls back).

    Example: leadloop -c leadloop.toml model train
    """
    from leadloop.jobs import run_job

    ctx = _context(click_ctx)
    sys.exit(_print_results([run_job(ctx, "retrain")]))


@model.command("evaluate")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--label", required=True, help="Column marking the macro conversion.")
@click.option("--positive", help="Label value meaning converted (default: yes/true/1).")
@click.option("--exclude", multiple=True, help="Column to leave out (leaky or an id). Repeatable.")
@click.option("--time", "time_column", help="Created-time column: enables a time-ordered split.")
@click.option("--sep", help="Delimiter (detected when absent).")
@click.option("--threads", type=click.IntRange(1), help="BLAS/OpenMP threads for fitting "
              "(default: the cores not busy).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as a JSON object.")
@handle_errors
def model_evaluate(csv_path: str, label: str, positive: str | None, exclude: tuple[str, ...],
                   time_column: str | None, sep: str | None, threads: int | None,
                   as_json: bool) -> None:
    """Evaluate the lead-value pipeline on any CRM export (ROC AUC, PR AUC, Brier, ECE).

    Prints the candidate's (uncalibrated) and the shipped model's figures, the calibration
    chosen and why, the gate's intervals, and warns about columns that look like leakage.

    Example: leadloop model evaluate --csv Leads.csv --label Converted --exclude Tags --json
    """
    from leadloop.scoring.model import evaluate_csv

    metrics = evaluate_csv(csv_path, label=label, positive=positive, exclude=list(exclude),
                           time_column=time_column, sep=sep, threads=threads)
    for leak in metrics["suspected_leakage"]:
        click.echo(f"Warning: suspected leakage in {leak['feature']!r}: {leak['reason']} "
                   "(leave it out with --exclude)", err=True)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, default=str))
    else:
        for k, v in metrics.items():
            if not isinstance(v, list | dict):
                click.echo(f"{k:<22} {v}")
        click.echo(f"{'calibration_method':<22} {metrics['calibration_method']['method']}: "
                   f"{metrics['calibration_method']['why']}")


@cli.group()
def stages() -> None:
    """The stage-to-value mapping."""


@stages.command("suggest")
@click.pass_context
@handle_errors
def stages_suggest(click_ctx: click.Context) -> None:
    """Suggest a value per stage from history: P(won | reached stage) x mean won value,
    printed as ready-to-paste TOML for [[stages]]."""
    from leadloop.values import suggest_stage_values_toml

    ctx = _context(click_ctx)
    click.echo(suggest_stage_values_toml(ctx))


@cli.command()
@click.option("--email", help="The person's e-mail (hashed before lookup; never stored).")
@click.option("--crm-id", help="The person's CRM record id.")
@click.pass_context
@handle_errors
def forget(click_ctx: click.Context, email: str | None, crm_id: str | None) -> None:
    """Erase a person (GDPR): hashed identities, events, scores and unsent conversions.

    The erasure itself is recorded (without the clear identity).
    """
    from leadloop.erasure import forget_person

    if bool(email) == bool(crm_id):
        raise click.UsageError("give exactly one of --email or --crm-id")
    ctx = _context(click_ctx)
    click.echo(forget_person(ctx, email=email, crm_id=crm_id))


def main() -> None:
    os.umask(0o077)  # the store, models, reports and payloads hold lead data: owner-only
    try:
        cli.main(standalone_mode=True)
    except LeadloopError as exc:  # errors raised while click itself runs
        _fail(exc)


if __name__ == "__main__":
    main()
