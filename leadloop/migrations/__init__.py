"""Alembic migrations of the store (see leadloop/schema.py for how they are run).

One file per revision in `versions/`; a revision never imports `leadloop.tables`, which
describes the current schema only, so that an old revision keeps meaning what it did."""

HEAD = "0003_rejected_record_ref"  # the newest revision in versions/ (tests/test_migrations.py checks it)
