"""Editing the config file from the workbench: tomlkit keeps the user's comments and layout.

A change is validated by the same pydantic model as the CLI (`settings_from_dict`) before
anything is written. A valid change is written atomically (temporary file + rename) after a
timestamped copy of the previous file is kept, and it is appended to the change log with who
(the OS user), when, and every key's value before and after. Both live in a folder next to the
config file: `<name>.history/<name>-<UTC time>.toml` and `<name>.history/changes.jsonl`.

The daemon re-reads the file at its next job (see `leadloop.daemon`), so a saved change applies
from the next cycle on.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Table

from leadloop.config import Settings, settings_from_dict
from leadloop.errors import ConfigErrors

VALUE_RULES = ("deal_amount", "predicted")
_SAVE_LOCK = threading.Lock()  # the version check and the write are one step


class StaleConfig(Exception):
    """The file changed on disk since the page showing it was rendered."""


@dataclass
class Change:
    """What one save does: key path → (before, after)."""

    what: str
    diffs: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def file_version(path: Path) -> str:
    """A short hash of the file's bytes: a form carries it so two edits cannot overwrite each
    other unseen."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def history_dir(path: Path) -> Path:
    return path.with_name(path.name + ".history")


def _plain(value: Any) -> Any:
    """A tomlkit value as plain Python (for validation, diffs and the change log)."""
    if hasattr(value, "unwrap"):
        return value.unwrap()
    return value


def load_document(path: Path) -> tomlkit.TOMLDocument:
    return tomlkit.parse(path.read_text(encoding="utf-8"))


def validate(doc: tomlkit.TOMLDocument, path: Path) -> Settings:
    """Raise `ConfigErrors` (one per bad key) exactly as `leadloop -c FILE` would."""
    return settings_from_dict(doc.unwrap(), source=str(path), base_dir=path.resolve().parent)


def field_errors(exc: ConfigErrors) -> dict[str, str]:
    """Config key path (e.g. `stages[2].value`) → message, for showing next to each field."""
    return {e.key: e.message.split(": ", 1)[-1] for e in exc.errors}


def parse_value(text: str) -> float | str:
    """A stage value from a form: a number, or one of the rules 'deal_amount' / 'predicted'.
    Anything else is passed through so the config model rejects it with its own message."""
    text = text.strip()
    if text in VALUE_RULES:
        return text
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def _stages(doc: tomlkit.TOMLDocument) -> AoT:
    stages = doc.get("stages")
    if not isinstance(stages, AoT):
        raise KeyError("stages")
    return stages


def edit_stage(doc: tomlkit.TOMLDocument, index: int, *, value: float | str,
               destinations: dict[str, str], macro: bool) -> Change:
    """Set one stage's value, destinations and macro flag in `doc` (in place). Marking a stage
    macro unmarks the others: there is one macro conversion."""
    stages = _stages(doc)
    stage: Table = stages[index]
    name = str(stage.get("name", index))
    change = Change(f"stage {name!r}")
    before = _plain(stage.get("value", 0.0))
    if before != value:
        stage["value"] = value
        change.diffs[f"stages[{index}].value"] = (before, value)
    old_dest = dict(_plain(stage.get("destinations", {})))
    if old_dest != destinations:
        if destinations:
            table = tomlkit.inline_table()
            table.update(destinations)
            stage["destinations"] = table
        elif "destinations" in stage:
            del stage["destinations"]
        change.diffs[f"stages[{index}].destinations"] = (old_dest, destinations)
    for i, other in enumerate(stages):
        want = macro if i == index else (False if macro else bool(_plain(other.get("macro", False))))
        had = bool(_plain(other.get("macro", False)))
        if want != had:
            if want:
                other["macro"] = True
            else:
                del other["macro"]
            change.diffs[f"stages[{i}].macro"] = (had, want)
    return change


def edit_roles(doc: tomlkit.TOMLDocument, roles: dict[str, str | None]) -> Change:
    """Set `role` on `[[micro_conversions]]` entries by name (None or "" removes it)."""
    micros = doc.get("micro_conversions")
    change = Change("micro-conversion roles")
    if not isinstance(micros, AoT):
        return change
    for i, micro in enumerate(micros):
        name = str(_plain(micro.get("name", "")))
        if name not in roles:
            continue
        before = _plain(micro.get("role"))
        after = roles[name] or None
        if before == after:
            continue
        if after is None:
            del micro["role"]
        else:
            micro["role"] = after
        change.diffs[f"micro_conversions[{i}].role"] = (before, after)
    return change


def save(path: Path, doc: tomlkit.TOMLDocument, change: Change, *, expected_version: str,
         now: datetime | None = None) -> dict[str, Any]:
    """Validate, back up, write and log `change`. Raises `ConfigErrors` (nothing written) or
    `StaleConfig` (the file changed since `expected_version`). Returns the change record."""
    validate(doc, path)
    with _SAVE_LOCK:
        if file_version(path) != expected_version:
            raise StaleConfig(str(path))
        return _write(path, doc, change, now or datetime.now(UTC))


def _write(path: Path, doc: tomlkit.TOMLDocument, change: Change, now: datetime) -> dict[str, Any]:
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    hist = history_dir(path)
    hist.mkdir(exist_ok=True)
    backup = hist / f"{path.stem}-{stamp}{path.suffix}"
    original = path.read_bytes()
    backup.write_bytes(original)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tomlkit.dumps(doc))
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {
        "at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "user": os_user(),
        "what": change.what,
        "changes": [{"key": k, "before": b, "after": a} for k, (b, a) in change.diffs.items()],
        "backup": backup.name,
    }
    append_log(path, record)
    return record


def append_log(path: Path, record: dict[str, Any]) -> None:
    hist = history_dir(path)
    hist.mkdir(exist_ok=True)
    with (hist / "changes.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def read_log(path: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The latest changes first."""
    log = history_dir(path) / "changes.jsonl"
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out[::-1][:limit]
