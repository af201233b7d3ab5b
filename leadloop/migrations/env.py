"""Alembic environment: runs on the connection leadloop/schema.py hands over (no alembic.ini,
no URL of its own)."""

from alembic import context

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most of a table: batch operations copy it instead.
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
