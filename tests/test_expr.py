"""The micro-conversion expression language: what it evaluates, and that nothing runs as code."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from leadloop.cli import cli
from leadloop.config import settings_from_dict
from leadloop.errors import ConfigErrors
from leadloop.expr import ExpressionError, parse

EXPLOIT = '@pd.core.frame.com.builtins.__import__("os").system("id") == 0'


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "visits": [0, 3, 700, np.nan, 12],
        "Total Time": ["10", "650", "n/a", None, "601"],
        "source": ["Google", "Organic Search", None, "google ads", "Referral"],
        "page": ["https://x.io/pricing", "/blog", None, "https://x.io/demo", "pricing"],
    })


def run(expr: str, frame: pd.DataFrame) -> list[bool]:
    return parse(expr).evaluate(frame).tolist()


@pytest.mark.parametrize(("expr", "expected"), [
    ("visits > 0", [False, True, True, False, True]),
    ("visits >= 600 or `Total Time` >= 600", [False, True, True, False, True]),
    ("`Total Time` > 600", [False, True, False, False, True]),  # text read as numbers
    ("not visits > 0", [True, False, False, True, False]),  # missing compares false
    ("(visits > 0) & ~(visits > 100)", [False, True, False, False, True]),
    ("1 < visits <= 12", [False, True, False, False, True]),
    ('source in ["Google", "Referral"]', [True, False, False, False, True]),
    ('source not in ["Google"]', [False, True, True, True, True]),
    ("visits in [3, 12]", [False, True, False, False, True]),
    ("visits * 2 + 1 > 10", [False, False, True, False, True]),
    ("visits / 0 > 1", [False, True, True, False, True]),  # inf, not an exception
    ("visits % 2 == 0", [True, False, True, False, True]),
    ("-visits < -5", [False, False, True, False, True]),
    ("isna(source)", [False, False, True, False, False]),
    ("source.notna() and visits.isna()", [False, False, False, True, False]),
    ('page.str.contains("pricing")', [True, False, False, False, True]),
    ('page.contains(".*")', [False] * 5),  # a plain substring, never a regular expression
    ('page.str.startswith("https://")', [True, False, False, True, False]),
    ('source == "Google" and page.str.contains("x.io")', [True, False, False, False, False]),
    ("visits", [False, True, True, False, True]),  # a number alone: non-zero
    ("True", [True] * 5),
    ('source != None', [False] * 5),  # missing never compares true
])
def test_expressions_evaluate_column_wise(frame: pd.DataFrame, expr: str, expected: list[bool]
                                          ) -> None:
    assert run(expr, frame) == expected


@pytest.mark.parametrize(("expr", "token"), [
    (EXPLOIT, "@"),
    ('__import__("os").system("id")', "__import__"),
    ("visits.__class__", ".__class__"),
    ("visits.__class__.__mro__[1].__subclasses__()", ".__class__"),
    ("().__class__.__bases__[0].__subclasses__()", "("),
    ("visits.apply(print)", ".apply"),
    ('open("/etc/passwd").read() == ""', "open("),
    ('eval("1")', "eval("),
    ("getattr(visits, 'x')", "getattr("),
    ("visits[0] > 1", "["),
    ("(lambda: 1)() == 1", "lambda"),
    ("[x for x in visits]", "for"),
    ("visits if visits else 0", "if"),
    ("(y := 3) > 1", ":="),
    ('f"{visits}" == "1"', "f-string"),
    ("visits ** 99999999", "**"),
    ("visits is None", "is"),
    ("__builtins__", "__builtins__"),
    ("visits > 1; import os", ";"),
    ("{'a': 1}", "{"),
    ('page.str.contains("a", regex=True)', "regex="),
    ("page.str.replace('a', 'b') == 'b'", ".replace"),
    ("source in visits", "in"),
    ("source in [visits]", "visits"),
    ("isna(visits.str)", "isna("),
    ("`a` == `b", "`"),
])
def test_everything_else_is_refused_naming_the_first_token(expr: str, token: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(expr)
    assert f"refused {token!r}" in str(caught.value)
    assert repr(expr) in str(caught.value)


@pytest.mark.parametrize("expr", ["not " * 490 + "x", "-" * 1990 + "x", "(" * 900 + "x" + ")" * 900,
                                  "x" * 3000])
def test_deep_or_long_expressions_are_refused_not_crashed(expr: str) -> None:
    frame = pd.DataFrame({"x": [1, 0]})
    with contextlib.suppress(ExpressionError):  # refused, or evaluated: never a crash
        parse(expr).evaluate(frame)


def test_an_unknown_column_is_named(frame: pd.DataFrame) -> None:
    with pytest.raises(ExpressionError, match="no column 'nope'"):
        parse("nope > 1").evaluate(frame)


def test_text_is_not_a_condition(frame: pd.DataFrame) -> None:
    with pytest.raises(ExpressionError, match="not a true/false condition"):
        parse("source").evaluate(frame)


def test_backticked_names_may_hold_anything_but_a_backtick(frame: pd.DataFrame) -> None:
    odd = frame.assign(**{'we"ird) __name__': [1, 0, 1, 0, 1]})
    assert run('`we"ird) __name__` == 1', odd) == [True, False, True, False, True]
    assert run('source == "`not a column`"', frame) == [False] * 5


def test_config_refuses_an_unsafe_expression_at_load() -> None:
    data = {"crm": {"kind": "csv", "csv": {"path": "x.csv", "id_column": "id"}},
            "stages": [{"name": "won", "crm_values": ["won"], "macro": True, "value": 1}],
            "micro_conversions": [{"name": "x", "expr": EXPLOIT}]}
    with pytest.raises(ConfigErrors) as caught:
        settings_from_dict(data)
    assert "micro_conversions[0].expr" in str(caught.value)
    assert "refused '@'" in str(caught.value)


def test_validate_csv_refuses_the_exploit_and_runs_nothing(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    csv = tmp_path / "leads.csv"
    csv.write_text("id,x,Converted\n" + "".join(f"{i},{i % 2},{i % 3 == 0}\n" for i in range(60)))
    attempts = [
        f'x=@pd.core.frame.com.builtins.__import__("os").system("touch {marker}") == 0',
        f'x=__import__("os").system("touch {marker}") == 0',
        f'x=x.__class__.__init__.__globals__["os"].system("touch {marker}") == 0',
    ]
    for micro in attempts:
        result = CliRunner().invoke(cli, ["validate", "--csv", str(csv), "--label", "Converted",
                                          "--micro", micro])
        assert result.exit_code == 2, result.output
        assert "refused" in result.output and len(result.output.strip().splitlines()) <= 2
    assert not marker.exists()
    ok = CliRunner().invoke(cli, ["validate", "--csv", str(csv), "--label", "Converted",
                                  "--micro", "odd=x == 1", "--json"])
    assert ok.exit_code == 0, ok.output
