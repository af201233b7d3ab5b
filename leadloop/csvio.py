"""Reading CRM exports: delimiter and encoding detection, missing markers, label parsing."""

from __future__ import annotations

import codecs
import csv
import re
from pathlib import Path

import pandas as pd

from leadloop.errors import LeadloopError

_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_ENCODINGS = ("utf-8-sig", "utf-8", "cp1252", "latin-1")
_POSITIVE = frozenset({"1", "1.0", "yes", "y", "true", "t", "won", "converted"})
_NEGATIVE = frozenset({"0", "0.0", "no", "n", "false", "f", "lost", ""})


def detect_encoding(path: Path, sample_bytes: int = 1 << 20) -> str:
    """The first of utf-8-sig, utf-8, cp1252 that decodes the file's first `sample_bytes`
    (only those are read), else latin-1. A bad byte further on is the reader's to handle:
    open with `errors="surrogateescape"` and check each record (`undecodable`)."""
    with path.open("rb") as f:
        raw = f.read(sample_bytes)
    for enc in _ENCODINGS:
        try:
            # incremental: a character cut at the end of the sample is not an error
            codecs.getincrementaldecoder(enc)().decode(raw, final=False)
            return enc
        except UnicodeDecodeError:
            continue
    return "latin-1"


def undecodable(text: str) -> bool:
    """Whether text read with `errors="surrogateescape"` held bytes its encoding refused."""
    return _ESCAPED_BYTE.search(text) is not None


def detect_delimiter(path: Path, encoding: str) -> str:
    with path.open(encoding=encoding, errors="replace", newline="") as f:
        sample = f.read(64 * 1024)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def read_csv(
    path: str | Path,
    *,
    sep: str | None = None,
    encoding: str | None = None,
    missing: list[str] | None = None,
    dtype: type | None = str,
) -> pd.DataFrame:
    """Read a CRM export as strings, detecting encoding and delimiter when not given.

    `missing` values (e.g. "Select", an untouched dropdown) become NaN.
    """
    p = Path(path)
    if not p.is_file():
        raise LeadloopError(f"CSV file not found: {p}")
    enc = encoding or detect_encoding(p)
    delimiter = sep or detect_delimiter(p, enc)
    try:
        return pd.read_csv(
            p,
            sep=delimiter,
            encoding=enc,
            encoding_errors="replace",  # a bad byte past the sample costs its cell, not the file
            dtype=dtype,
            keep_default_na=False,
            na_values=missing if missing is not None else [""],
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise LeadloopError(f"cannot read CSV {p.name}: {exc}") from None


def parse_label(values: pd.Series, positive: str | None = None) -> pd.Series:
    """Turn a label column into 0/1: the `positive` value, or yes/true/1 style values."""
    text = values.fillna("").astype(str).str.strip().str.lower()
    if positive is not None:
        return (text == positive.strip().lower()).astype(int)
    unknown = sorted(set(text) - _POSITIVE - _NEGATIVE)
    if unknown:
        raise LeadloopError(
            f"label values {unknown[:5]} are neither yes/true/1 nor no/false/0",
            hint="pass --positive VALUE to say which value means converted",
        )
    return text.isin(_POSITIVE).astype(int)
