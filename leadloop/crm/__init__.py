"""CRM connectors, one module per CRM; `build_source` picks the one the config names."""

from __future__ import annotations

from importlib import import_module

from leadloop.context import Context
from leadloop.crm.base import CrmSource

# kind -> "module:class"; imported lazily so one CRM's optional needs never block another.
SOURCES = {
    "hubspot": "leadloop.crm.hubspot:HubSpotSource",
    "salesforce": "leadloop.crm.salesforce:SalesforceSource",
    "pipedrive": "leadloop.crm.pipedrive:PipedriveSource",
    "csv": "leadloop.crm.csv:CsvSource",
}


def build_source(ctx: Context) -> CrmSource:
    module, cls = SOURCES[ctx.settings.crm.kind].split(":")
    return getattr(import_module(module), cls)(ctx)
