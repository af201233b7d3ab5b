"""The destinations leadloop exports to, found from their classes.

Every module of `leadloop.export` except the shared machinery below is a destination module: it
defines one `BaseDestination` subclass whose `kind` names the platform, with everything about
that platform (config model, click ids, rules and windows, batch size, payload, error
classification, diagnostics). `DESTINATIONS` and the config's `kind` values are derived from
those classes, so adding a platform is adding its module (and its tests).

Destination modules must not import the engine, the outbox or `leadloop.config` (the config
imports this registry to know the kinds).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import leadloop.export as package
from leadloop.export.base import BaseDestination

# Shared machinery of the package, not destinations (and not importable from here: cycles).
_MACHINERY = frozenset({"base", "consent", "engine", "google_auth", "outbox", "registry", "rules",
                        "state", "transitions"})


def _discover() -> dict[str, type[BaseDestination]]:
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _MACHINERY:
            importlib.import_module(f"{package.__name__}.{module.name}")
    found: dict[str, type[BaseDestination]] = {}
    todo = list(BaseDestination.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if cls.kind:
            if cls.kind in found and found[cls.kind] is not cls:
                raise TypeError(f"two destinations declare kind {cls.kind!r}: "
                                f"{found[cls.kind].__module__} and {cls.__module__}")
            found[cls.kind] = cls
    return dict(sorted(found.items()))


DESTINATIONS: dict[str, type[BaseDestination]] = _discover()


def click_preference(kind: str) -> tuple[str, ...]:
    """The lead's click ids a destination of `kind` matches on, preferred first (the outbox
    stores the first one a lead has)."""
    return DESTINATIONS[kind].click_ids


def adjustment_support(settings: Any) -> dict[str, dict[str, bool]]:
    """Destination name -> whether its platform can restate a sent conversion's value and
    retract it (lost deal, deleted lead), for the report."""
    out = {}
    for name in settings.destinations:
        takes = DESTINATIONS[settings.destination_kind(name)].adjustments
        out[name] = {"can_restate": "restatement" in takes, "can_retract": "retraction" in takes}
    return out
