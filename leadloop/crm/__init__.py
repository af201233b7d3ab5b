"""CRM connectors, one module per CRM; `build_source` picks the one the config names.

A connector module is named after its config `kind` (`leadloop/crm/<kind>.py`) and names its
`CrmSource` class `SOURCE`; every module of this package except the shared machinery below is
one. Modules are imported only when their CRM is used, so one CRM's optional needs never block
another.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leadloop.context import Context
    from leadloop.crm.base import CrmSource

# The package's shared machinery, not connectors.
_MACHINERY = frozenset({"base", "rest", "screening", "stage_check"})

CRM_KINDS: tuple[str, ...] = tuple(sorted(
    m.name for m in pkgutil.iter_modules(__path__) if m.name not in _MACHINERY))


def build_source(ctx: Context) -> CrmSource:
    source: CrmSource = import_module(f"{__name__}.{ctx.settings.crm.kind}").SOURCE(ctx)
    return source
