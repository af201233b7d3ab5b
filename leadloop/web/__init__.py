"""`leadloop serve`: the stage-mapping workbench (see `app.py`)."""

from leadloop.web.app import create_app, serve

__all__ = ["create_app", "serve"]
