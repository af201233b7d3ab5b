"""Offline-conversion export.

- `engine.py`: the export job (`run_export`): build the outbox, check the rules, send, record.
- `transitions.py`: what each rule check and platform answer does to an outbox row (pure).
- `outbox.py`: building the outbox (`conversion` rows) from the store.
- `state.py`: what the export keeps between runs (build watermark, destination pauses).
- `base.py`: the destination contract; `rules.py`: the rules shared by every platform.
- `registry.py`: `DESTINATIONS`, found from the destination modules: every other module here is
  one platform (e.g. `meta.py`) declaring everything about it.
"""
