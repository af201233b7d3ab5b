"""The workbench's pages: `/` overview, `/stages`, `/micro-conversions`, `/uploads`, `/status`."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select, update
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from leadloop.config import MicroRole
from leadloop.errors import ConfigErrors
from leadloop.store import session_scope
from leadloop.tables import Conversion, ConversionStatus, ValidationResult
from leadloop.web import configedit
from leadloop.web.app import Workbench, form_of, in_thread, page_data, render
from leadloop.web.preview import EFFECTS, preview_change

ROLES: tuple[str, ...] = MicroRole.__args__  # type: ignore[attr-defined]
ROW_LIMIT = 50
EFFECT_LABELS = {"new_conversions": "new conversions", "value_changes": "conversions change value",
                 "restatements": "restatements sent", "retractions": "retractions sent",
                 "not_restated": "already sent, keep the old value"}


def _wb(request: Request) -> Workbench:
    return request.app.state.workbench


async def overview(request: Request) -> Response:
    data, view = await in_thread(page_data, request)
    return render(request, "overview.html", data=data, view=view)


# -- /stages --------------------------------------------------------------------------------------


def _stage_forms(settings: Any, edits: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The value each field shows: what was typed (after a preview or an error), else the file's."""
    forms = []
    for i, st in enumerate(settings.stages):
        typed = edits.get(i)
        forms.append(typed or {
            "value": f"{st.value:g}" if isinstance(st.value, float) else st.value,
            "dest": {d: st.destinations.get(d, "") for d in settings.destinations},
            "macro": st.macro,
        })
    return forms


def _read_stage_form(form: Any, destinations: list[str]) -> tuple[int, dict[str, Any]]:
    try:
        index = int(str(form.get("stage", "")))
    except ValueError:
        index = -1
    typed = {
        "value": str(form.get("value", "")).strip(),
        "dest": {d: str(form.get(f"dest_{d}", "")).strip() for d in destinations},
        "macro": form.get("macro") == "on",
    }
    return index, typed


async def stages(request: Request) -> Response:
    wb = _wb(request)
    settings = await in_thread(wb.settings)
    data, view = await in_thread(page_data, request)
    context: dict[str, Any] = {"edits": {}, "errors": {}, "general_errors": [], "preview": None,
                               "preview_index": None, "message": ""}
    if request.method == "POST":
        form = await form_of(request)
        index, typed = _read_stage_form(form, list(settings.destinations))
        if not 0 <= index < len(settings.stages):
            context["general_errors"] = ["unknown stage"]
        else:
            context["edits"] = {index: typed}
            result = await in_thread(_stage_post, wb, index, typed, str(form.get("version", "")),
                                     str(form.get("action", "preview")), data)
            if isinstance(result, Response):
                return result
            context.update(result)
    elif request.query_params.get("saved"):
        context["message"] = "Saved. The daemon applies the change from its next cycle."
    return render(
        request, "stages.html", status_code=422 if context["errors"] or context["general_errors"]
        else 200, data=data, view=view, settings=settings,
        forms=_stage_forms(settings, context["edits"]), evidence={s.name: s for s in
                                                                 data.stage_values},
        version=configedit.file_version(wb.config_path), history=configedit.read_log(wb.config_path),
        effect_labels=EFFECT_LABELS, effects=EFFECTS, **context)


def _stage_post(wb: Workbench, index: int, typed: dict[str, Any], version: str, action: str,
                data: Any) -> dict[str, Any] | Response:
    path = wb.config_path
    doc = configedit.load_document(path)
    dests = {d: a for d, a in typed["dest"].items() if a}
    change = configedit.edit_stage(doc, index, value=configedit.parse_value(typed["value"]),
                                   destinations=dests, macro=typed["macro"])
    out: dict[str, Any] = {}
    try:
        proposed = configedit.validate(doc, path)
    except ConfigErrors as exc:
        errors = configedit.field_errors(exc)
        prefix = f"stages[{index}]."
        out["errors"] = {k.removeprefix(prefix): v for k, v in errors.items() if k.startswith(prefix)}
        out["general_errors"] = [f"{k}: {v}" for k, v in errors.items() if not k.startswith(prefix)]
        return out
    if action == "save":
        if not change.diffs:
            return {"message": "Nothing to save: the values are those of the file."}
        try:
            configedit.save(path, doc, change, expected_version=version)
        except configedit.StaleConfig:
            return {"general_errors": ["The config file changed since this page was loaded: "
                                       "reload the page and make the change again."]}
        wb.invalidate()
        return RedirectResponse(f"/stages?saved={index}#stage-{index}", status_code=303)
    ctx = wb.context()
    name = proposed.stages[index].name
    out["preview"] = preview_change(ctx, proposed, [name], data)
    out["preview_index"] = index
    out["changed"] = change.diffs
    return out


# -- /micro-conversions ---------------------------------------------------------------------------


def _trends(wb: Workbench, data: Any) -> dict[str, dict[str, Any]]:
    run = data.validation_run or {}
    if not run.get("job_run_id"):
        return {}
    vr = ValidationResult.__table__  # type: ignore[attr-defined]
    with wb.context().engine.connect() as conn:
        rows = conn.execute(select(vr.c.micro, vr.c.details).where(
            vr.c.job_run_id == run["job_run_id"], vr.c.segment == "all"))
        return {m: (d or {}).get("trend") or {} for m, d in rows}


async def micro_conversions(request: Request) -> Response:
    wb = _wb(request)
    settings = await in_thread(wb.settings)
    data, view = await in_thread(page_data, request)
    message, errors = "", []
    if request.method == "POST":
        form = await form_of(request)
        roles = {m.name: str(form.get(f"role_{m.name}", "")) or None for m in settings.micro_conversions}
        result = await in_thread(_roles_post, wb, roles, str(form.get("version", "")))
        if isinstance(result, Response):
            return result
        errors = result
    elif request.query_params.get("saved"):
        message = "Saved. The daemon applies the change from its next cycle."
    configured = {m.name: m for m in settings.micro_conversions}
    trends = await in_thread(_trends, wb, data)
    return render(request, "micro.html", status_code=422 if errors else 200, data=data, view=view,
                  configured=configured, roles=ROLES, trends=trends, message=message,
                  general_errors=errors, version=configedit.file_version(wb.config_path),
                  history=configedit.read_log(wb.config_path))


def _roles_post(wb: Workbench, roles: dict[str, str | None], version: str) -> list[str] | Response:
    path = wb.config_path
    doc = configedit.load_document(path)
    change = configedit.edit_roles(doc, roles)
    if not change.diffs:
        return RedirectResponse("/micro-conversions", status_code=303)
    try:
        configedit.save(path, doc, change, expected_version=version)
    except ConfigErrors as exc:
        return [f"{k}: {v}" for k, v in configedit.field_errors(exc).items()]
    except configedit.StaleConfig:
        return ["The config file changed since this page was loaded: reload and try again."]
    wb.invalidate()
    return RedirectResponse("/micro-conversions?saved=1", status_code=303)


# -- /uploads -------------------------------------------------------------------------------------


def _rows(wb: Workbench, destination: str, status: str, rule: str) -> list[dict[str, Any]]:
    conv = Conversion.__table__  # type: ignore[attr-defined]
    cols = ["id", "destination", "stage", "kind", "revision", "conversion_action",
            "conversion_time", "value", "currency", "status", "hold_rule", "attempts",
            "platform_code", "last_error", "order_id"]
    stmt = select(*[conv.c[c] for c in cols]).order_by(conv.c.id.desc()).limit(ROW_LIMIT)
    if destination:
        stmt = stmt.where(conv.c.destination == destination)
    if status:
        stmt = stmt.where(conv.c.status == status)
    if rule:
        stmt = stmt.where(conv.c.hold_rule == rule)
    with wb.context().engine.connect() as conn:
        return [
            {**r._mapping, "kind": getattr(r.kind, "value", r.kind),
             "status": getattr(r.status, "value", r.status)}
            for r in conn.execute(stmt)
        ]


async def uploads(request: Request) -> Response:
    wb = _wb(request)
    data, view = await in_thread(page_data, request)
    q = request.query_params
    destination, status, rule = q.get("destination", ""), q.get("status", ""), q.get("rule", "")
    rows = await in_thread(_rows, wb, destination, status, rule)
    rules = sorted({str(r) for r in data.holds["hold_rule"]}) if not data.holds.empty else []
    return render(request, "uploads.html", data=data, view=view, rows=rows, row_limit=ROW_LIMIT,
                  filters={"destination": destination, "status": status, "rule": rule},
                  statuses=[s.value for s in ConversionStatus], rules=rules,
                  retried=q.get("retried"))


def _retry(wb: Workbench, destination: str) -> int:
    conv = Conversion.__table__  # type: ignore[attr-defined]
    with session_scope(wb.context().engine) as session:
        n = session.connection().execute(  # a CursorResult: it has the rowcount
            update(conv).where(conv.c.destination == destination,
                               conv.c.status == ConversionStatus.dead.value)
            .values(status=ConversionStatus.pending.value, attempts=0, next_attempt_at=None)
        ).rowcount
    if n:
        configedit.append_log(wb.config_path, {
            "at": wb.context().now().isoformat(timespec="seconds").replace("+00:00", "Z"),
            "user": configedit.os_user(), "what": f"retry {n} dead conversions to {destination}",
            "changes": [{"key": f"outbox.{destination}.dead", "before": n, "after": 0}],
        })
    wb.invalidate()
    return int(n or 0)


async def retry_dead(request: Request) -> Response:
    form = await form_of(request)
    destination = str(form.get("destination", ""))
    n = await in_thread(_retry, _wb(request), destination)
    query = urlencode({"destination": destination, "status": "pending", "retried": n})
    return RedirectResponse(f"/uploads?{query}", status_code=303)


# -- /status --------------------------------------------------------------------------------------


async def status(request: Request) -> Response:
    from leadloop.status import STATUSES, collect_status

    wb = _wb(request)
    data, view = await in_thread(page_data, request)
    info = await in_thread(collect_status, wb.context())
    return render(request, "status.html", data=data, view=view, info=info, statuses=STATUSES,
                  history=configedit.read_log(wb.config_path))
