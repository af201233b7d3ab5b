"""Compare two `leadloop demo --out` folders: the payload files and report.json, with what
legitimately moves from run to run (timestamps, the output folder) normalised.

    python bench/compare_demo.py BEFORE AFTER [BEFORE_AGAIN]

BEFORE_AGAIN, a second demo run of the code that made BEFORE, tells run-to-run noise (the model
card and the validation table move with `now`) from a change: a difference at a place that also
differs between BEFORE and BEFORE_AGAIN is reported as noise. Exit 1 when something else differs.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")
STAMP = re.compile(r"\d{8}T\d{6}Z")
INDEX = re.compile(r"\[\d+\]")


UNIX_TIMES = ("event_time", "eventTime", "timestamp")  # Meta seconds, Microsoft/LinkedIn ms


def normalised(value: Any, folders: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: "<UNIX>" if k in UNIX_TIMES and isinstance(v, int) else normalised(v, folders)
                for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v, folders) for v in value]
    if isinstance(value, str):
        for folder in folders:
            value = value.replace(folder, "<OUT>")
        return STAMP.sub("<STAMP>", TIMESTAMP.sub("<TS>", value))
    return value


def differences(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(place, what) for every difference between two JSON documents."""
    if type(a) is not type(b):
        yield path, f"{a!r} != {b!r}"
    elif isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{path}.{k}", f"only in {'after' if k not in a else 'before'}"
            else:
                yield from differences(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        if len(a) != len(b):
            yield path, f"{len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, f"{a!r} != {b!r}"


def load(folder: Path, rel: Path, folders: tuple[str, ...]) -> Any:
    return normalised(json.loads((folder / rel).read_text()), folders)


def main(before: Path, after: Path, again: Path | None) -> int:
    folders = tuple(str(f) for f in (before, after, again) if f is not None)
    payloads = {p.relative_to(d) for d in (before, after) for p in d.glob("payloads/**/*.json")}
    changed = 0
    for rel in [*sorted(payloads), Path("report.json")]:
        if not (before / rel).exists() or not (after / rel).exists():
            print(f"{rel}: only in {'before' if (before / rel).exists() else 'after'}")
            changed += 1
            continue
        found = list(differences(load(before, rel, folders), load(after, rel, folders)))
        noise: set[str] = set()
        if again is not None and (again / rel).exists():
            noise = {INDEX.sub("[]", place) for place, _ in differences(
                load(before, rel, folders), load(again, rel, folders))}
        real = [(p, what) for p, what in found if INDEX.sub("[]", p) not in noise]
        print(f"{rel}: {'same' if not real else f'{len(real)} differences'}"
              + (f" ({len(found) - len(real)} run-to-run noise)" if len(found) > len(real) else ""))
        for place, what in real[:20]:
            print(f"    {place}: {what}")
        changed += bool(real)
    return 1 if changed else 0


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(args[0], args[1], args[2] if len(args) == 3 else None))
