"""A small, safe expression language for `[[micro_conversions]] expr` and `validate --micro`.

Expressions come from config files and command lines that other people edit, so they are never
handed to `eval`, `pandas.eval` or `DataFrame.query` (neither is a sandbox). The text is parsed
with `ast` and every node is checked against an allow-list; anything else is refused, naming the
first token refused. The checked tree is then evaluated column-wise on a DataFrame.

Grammar (Python syntax, a strict subset):

    expr     := expr "or" expr | expr "and" expr | "not" expr | "(" expr ")"
              | expr ("&" | "|") expr | "~" expr                 (element-wise and/or/not)
              | operand (cmp operand)+ | operand ["not"] "in" "[" literal, ... "]"
              | call | operand
    cmp      := "==" | "!=" | "<" | "<=" | ">" | ">="
    operand  := column | literal | operand ("+" | "-" | "*" | "/" | "//" | "%") operand
              | "-" operand | "(" operand ")"
    column   := name | "`" any text but a backtick "`"
    literal  := number | "string" | 'string' | True | False | None
    call     := "isna(" column ")" | "notna(" column ")" | column ".isna()" | column ".notna()"
              | column [".str"] ".contains(" string ")" | column [".str"] ".startswith(" string ")"

Arithmetic is numeric (text that is not a number becomes missing); `contains` matches a plain
substring, never a regular expression; a missing value makes a comparison false.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

MAX_LENGTH = 2000  # characters: a condition, not a program
_BACKTICK_NAME = "_bt{}_"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_ARITH: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_LOGIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
}
_FUNCTIONS = frozenset({"isna", "notna"})
_STRING_METHODS = frozenset({"contains", "startswith"})
_OP_TEXT: dict[type, str] = {
    ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitXor: "^", ast.MatMult: "@",
    ast.Is: "is", ast.IsNot: "is not", ast.UAdd: "+",
}


class ExpressionError(ValueError):
    """An expression outside the language, or one that cannot be evaluated on this data."""

    def __init__(self, expr: str, problem: str) -> None:
        super().__init__(f"expression {expr!r}: {problem}")
        self.expr = expr
        self.problem = problem


@dataclass(frozen=True)
class Expression:
    """A checked expression: evaluate it with `evaluate(frame)`."""

    text: str
    tree: ast.Expression
    columns: dict[str, str]  # placeholder identifier -> backticked column name

    def column_names(self) -> set[str]:
        """Every column the expression reads."""
        functions = {id(n.func) for n in ast.walk(self.tree) if isinstance(n, ast.Call)}
        return {self.columns.get(n.id, n.id) for n in ast.walk(self.tree)
                if isinstance(n, ast.Name) and id(n) not in functions}

    def evaluate(self, frame: pd.DataFrame) -> np.ndarray:
        """One bool per row of `frame` (missing counts as false)."""
        missing = sorted(self.column_names() - set(map(str, frame.columns)))
        if missing:
            raise ExpressionError(self.text, f"no column {missing[0]!r} in the data")
        try:
            value = _Evaluator(self, frame).eval(self.tree.body)
        except RecursionError:
            raise ExpressionError(self.text, "is nested too deeply") from None
        if not isinstance(value, pd.Series):
            return np.full(len(frame), _truth(value), dtype=bool)
        if value.dtype == bool:
            return value.to_numpy()
        if pd.api.types.is_numeric_dtype(value.dtype):  # a count: true when non-zero
            return (value.fillna(0) != 0).to_numpy(dtype=bool)
        if pd.api.types.is_bool_dtype(value.dtype):
            return value.fillna(False).to_numpy(dtype=bool)
        raise ExpressionError(self.text, "is not a true/false condition per row "
                                         "(compare the column to a value)")


def parse(text: str) -> Expression:
    """Check `text` against the grammar; raise `ExpressionError` naming the first token refused."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(str(text), "is empty")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(text[:40] + "…", f"is longer than {MAX_LENGTH} characters")
    source, columns = _replace_backticks(text)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        token = _token_at(source.strip(), (exc.offset or 1) - 1, columns)
        raise ExpressionError(text, f"refused {token!r} (not valid in an expression)") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError(text, "cannot be parsed") from None
    try:
        _Checker(text, columns).check(tree.body)
    except RecursionError:
        raise ExpressionError(text, "is nested too deeply") from None
    return Expression(text, tree, columns)


def _replace_backticks(text: str) -> tuple[str, dict[str, str]]:
    """Swap each `quoted column` for an identifier that does not occur in the text."""
    out: list[str] = []
    columns: dict[str, str] = {}
    i, quote = 0, ""
    while i < len(text):
        ch = text[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise ExpressionError(text, "refused '`' (a backtick without its closing one)")
            name = text[i + 1:end]
            placeholder = _BACKTICK_NAME.format(len(columns))
            while placeholder in text or placeholder in columns:
                placeholder = "_" + placeholder
            columns[placeholder] = name
            out.append(placeholder)
            i = end
        else:
            out.append(ch)
        i += 1
    return "".join(out), columns


def _token_at(source: str, offset: int, columns: dict[str, str]) -> str:
    """The token starting at `offset` of the parsed text, as the user wrote it."""
    rest = source[max(offset, 0):].lstrip() or source[-1:]
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*|\d[\w.]*|\S", rest)
    token = match.group(0) if match else rest[:1]
    return f"`{columns[token]}`" if token in columns else token


class _Checker:
    """Walks the tree in source order and refuses the first node outside the grammar."""

    def __init__(self, text: str, columns: dict[str, str]) -> None:
        self.text = text
        self.columns = columns

    def refuse(self, token: str, why: str = "") -> None:
        raise ExpressionError(self.text, f"refused {token!r}" + (f" ({why})" if why else ""))

    def check(self, node: ast.expr) -> None:
        match node:
            case ast.BoolOp(values=values):
                for v in values:
                    self.check(v)
            case ast.UnaryOp(op=ast.Not() | ast.USub() | ast.Invert(), operand=operand):
                self.check(operand)
            case ast.UnaryOp(op=op):
                self.refuse(_OP_TEXT.get(type(op), type(op).__name__))
            case ast.BinOp(left=left, op=op, right=right):
                self.check(left)
                if type(op) not in _ARITH and type(op) not in _LOGIC:
                    self.refuse(_OP_TEXT.get(type(op), type(op).__name__), "not an allowed operator")
                self.check(right)
            case ast.Compare(left=left, ops=ops, comparators=comparators):
                self.check(left)
                for cmp, right in zip(ops, comparators, strict=True):
                    if isinstance(cmp, ast.In | ast.NotIn):
                        self.check_list(right)
                    elif type(cmp) in _COMPARE:
                        self.check(right)
                    else:
                        self.refuse(_OP_TEXT.get(type(cmp), type(cmp).__name__),
                                    "use isna()/notna() to test for missing values")
            case ast.Call():
                self.check_call(node)
            case ast.Name(id=name):
                self.check_name(name)
            case ast.Constant(value=value):
                if not isinstance(value, str | int | float | bool | type(None)):
                    self.refuse(repr(value), "not a number, string, True, False or None")
            case ast.Attribute(attr=attr):
                self.check_receiver(node)
                self.refuse(f".{attr}", "attribute access is not allowed")
            case ast.Subscript():
                self.check(node.value)
                self.refuse("[", "subscripts are not allowed")
            case ast.Lambda():
                self.refuse("lambda")
            case ast.IfExp():
                self.check(node.body)
                self.refuse("if")
            case ast.ListComp() | ast.SetComp() | ast.GeneratorExp() | ast.DictComp():
                self.refuse("for", "comprehensions are not allowed")
            case ast.NamedExpr():
                self.refuse(":=")
            case ast.JoinedStr():
                self.refuse("f-string")
            case ast.List() | ast.Tuple() | ast.Set():
                token = {ast.List: "[", ast.Tuple: "(", ast.Set: "{"}[type(node)]
                self.refuse(token, "a list only goes on the right of 'in'")
            case ast.Dict():
                self.refuse("{")
            case ast.Starred():
                self.refuse("*")
            case _:
                self.refuse(type(node).__name__)

    def check_receiver(self, node: ast.Attribute) -> None:
        if not isinstance(node.value, ast.Name):
            self.check(node.value)
        else:
            self.check_name(node.value.id)

    def check_name(self, name: str) -> None:
        if name in self.columns:
            return
        if name.startswith("__") or not _IDENT.match(name):
            self.refuse(name, "dunder names are not allowed")
        if name in _FUNCTIONS | _STRING_METHODS:
            self.refuse(name, "a function only in a call like isna(`column`)")

    def check_list(self, node: ast.expr) -> None:
        if not isinstance(node, ast.List | ast.Tuple | ast.Set):
            self.check(node)
            self.refuse("in", "'in' needs a list of literals: x in ['a', 'b']")
        for item in node.elts:  # type: ignore[attr-defined]
            negative_number = (isinstance(item, ast.UnaryOp) and isinstance(item.op, ast.USub)
                               and isinstance(item.operand, ast.Constant))
            if not isinstance(item, ast.Constant) and not negative_number:
                self.check(item)
                self.refuse(ast.unparse(item)[:30], "a list for 'in' holds only literals")
            self.check(item)

    def check_call(self, node: ast.Call) -> None:
        func = node.func
        if node.keywords:
            self.refuse(f"{node.keywords[0].arg}=", "keyword arguments are not allowed")
        if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
            if len(node.args) != 1 or not isinstance(node.args[0], ast.Name):
                self.refuse(f"{func.id}(", "takes one column")
            self.check_name(node.args[0].id)  # type: ignore[attr-defined]
            return
        if isinstance(func, ast.Attribute):
            receiver = func.value
            if (isinstance(receiver, ast.Attribute) and receiver.attr == "str"
                    and isinstance(receiver.value, ast.Name)):
                receiver = receiver.value
            if not isinstance(receiver, ast.Name):
                self.check(receiver)
                self.refuse(f".{func.attr}(", "methods apply to a column")
            self.check_name(receiver.id)  # type: ignore[attr-defined]
            if func.attr in _FUNCTIONS and not node.args:
                return
            if (func.attr in _STRING_METHODS and len(node.args) == 1
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                return
            if func.attr in _FUNCTIONS | _STRING_METHODS:
                self.refuse(f".{func.attr}(", "isna()/notna() take nothing, contains/startswith "
                                              "one string")
            self.refuse(f".{func.attr}", "not an allowed method")
        if isinstance(func, ast.Name):
            self.check_name(func.id)
            self.refuse(f"{func.id}(", "not an allowed function (isna, notna)")
        self.check(func)
        self.refuse("(", "calls are not allowed")


class _Evaluator:
    """Evaluates a checked tree column-wise; values are pandas Series or Python scalars."""

    def __init__(self, expression: Expression, frame: pd.DataFrame) -> None:
        self.expression = expression
        self.frame = frame

    def column(self, name: str) -> pd.Series:
        return self.frame[self.expression.columns.get(name, name)]

    def eval(self, node: ast.expr) -> Any:
        match node:
            case ast.BoolOp(op=op, values=values):
                result = _boolean(self.eval(values[0]))
                for v in values[1:]:
                    right = _boolean(self.eval(v))
                    result = (result & right) if isinstance(op, ast.And) else (result | right)
                return result
            case ast.UnaryOp(op=ast.Not() | ast.Invert(), operand=operand):
                value = _boolean(self.eval(operand))
                return ~value if isinstance(value, pd.Series) else not value
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                return -_numeric(self.eval(operand))
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _LOGIC:
                return _LOGIC[type(op)](_boolean(self.eval(left)), _boolean(self.eval(right)))
            case ast.BinOp(left=left, op=op, right=right):
                with np.errstate(all="ignore"):
                    return _ARITH[type(op)](_numeric(self.eval(left)), _numeric(self.eval(right)))
            case ast.Compare(left=left, ops=ops, comparators=comparators):
                return self.compare(left, ops, comparators)
            case ast.Call():
                return self.call(node)
            case ast.Name(id=name):
                return self.column(name)
            case ast.Constant(value=value):
                return value
        raise ExpressionError(self.expression.text, f"cannot evaluate {ast.unparse(node)!r}")

    def compare(self, left_node: ast.expr, ops: list[ast.cmpop],
                comparators: list[ast.expr]) -> Any:
        result: Any = True
        left = self.eval(left_node)
        for op, right_node in zip(ops, comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                options = [ast.literal_eval(e) for e in right_node.elts]  # type: ignore[attr-defined]
                hit = _isin(left, options)
                step = ~hit if isinstance(op, ast.NotIn) else hit
                right = left
            else:
                right = self.eval(right_node)
                step = _compare(_COMPARE[type(op)], left, right)
            result = _boolean(step) if result is True else result & _boolean(step)
            left = right
        return result

    def call(self, node: ast.Call) -> pd.Series:
        func = node.func
        if isinstance(func, ast.Name):
            series, name = self.eval(node.args[0]), func.id
        else:
            assert isinstance(func, ast.Attribute)
            receiver = func.value
            if isinstance(receiver, ast.Attribute):  # `col`.str.contains(...)
                receiver = receiver.value
            series, name = self.eval(receiver), func.attr
        if name == "isna":
            return series.isna()
        if name == "notna":
            return series.notna()
        needle = node.args[0].value  # type: ignore[attr-defined]
        text = series.astype("string")
        hits = text.str.contains(needle, regex=False) if name == "contains" else \
            text.str.startswith(needle)
        return hits.fillna(False).astype(bool)


def _numeric(value: Any) -> Any:
    if isinstance(value, pd.Series):
        if pd.api.types.is_bool_dtype(value.dtype):
            return value.astype(float)
        return pd.to_numeric(value, errors="coerce").astype(float)
    try:
        return np.float64(value)  # numpy scalars: x / 0 is inf, not an exception
    except (TypeError, ValueError, OverflowError):
        return np.nan  # text that is not a number, None


def _boolean(value: Any) -> Any:
    if isinstance(value, pd.Series):
        if value.dtype == bool:
            return value
        if pd.api.types.is_numeric_dtype(value.dtype):
            return value.fillna(0) != 0
        return value.map(_truth).astype(bool)
    return _truth(value)


def _truth(value: Any) -> bool:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return False
    return bool(value)


def _isin(value: Any, options: list[Any]) -> Any:
    if not isinstance(value, pd.Series):
        return value in options
    hits = value.isin(options)
    numbers = [o for o in options if isinstance(o, int | float) and not isinstance(o, bool)]
    if numbers and not pd.api.types.is_numeric_dtype(value.dtype):
        hits |= pd.to_numeric(value, errors="coerce").isin(numbers)
    return hits.fillna(False).astype(bool)


def _compare(op: Callable[[Any, Any], Any], left: Any, right: Any) -> Any:
    """Element-wise comparison. A missing value compares false. When either side is a number,
    both sides compare as numbers (text that is not a number is missing); `<`-style comparisons
    of text compare it as text."""
    if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
        if left is None or right is None:
            return False
        try:
            return bool(op(left, right))
        except TypeError:
            return False
    if _is_number(left) or _is_number(right):
        left, right = _numeric(left), _numeric(right)
    elif op not in (operator.eq, operator.ne):
        left, right = _text(left), _text(right)
    try:
        result = pd.Series(op(left, right))
    except TypeError:
        result = pd.Series(op(_text(left), _text(right)))
    return result.fillna(False).astype(bool) & _present(left) & _present(right)


def _is_number(value: Any) -> bool:
    if isinstance(value, pd.Series):
        return pd.api.types.is_numeric_dtype(value.dtype) and not pd.api.types.is_bool_dtype(
            value.dtype)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> Any:
    if isinstance(value, pd.Series):
        return value.astype("string")
    return None if value is None else str(value)


def _present(value: Any) -> Any:
    if isinstance(value, pd.Series):
        return value.notna()
    return value is not None and not (isinstance(value, float) and np.isnan(value))
