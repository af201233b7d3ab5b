"""Alembic migrations of the store (see leadloop/schema.py for how they are run).

One file per revision in `versions/`; a revision never imports `leadloop.tables`, which
describes the current schema only, so that an old revision keeps meaning what it did."""

HEAD = "0004_one_score_per_lead"  # the newest revision in versions/ (tests/test_migrations.py checks it)
