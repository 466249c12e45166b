"""Config values behind the table's shape expressions (`"hidden_size"`, `"E"`, `"n_heads * head_dim"`).

The family table states shapes as small arithmetic over config keys (+, *, //); they are parsed once
and evaluated against config.json, else the table's derivation, else transformers' default."""

from __future__ import annotations

import ast
from functools import cache
from typing import TYPE_CHECKING

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel


@cache
def _parse(expr: str) -> ast.expr:
    node = ast.parse(expr, mode="eval").body
    for sub in ast.walk(node):
        if not isinstance(sub, (ast.BinOp, ast.Name, ast.Constant, ast.Add, ast.Mult, ast.FloorDiv, ast.Load)):
            raise ValueError(f"unsupported shape expression {expr!r}")
    return node


def _evaluate(node: ast.expr, value) -> int | None:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return value(node.id)
    assert isinstance(node, ast.BinOp)
    a, b = _evaluate(node.left, value), _evaluate(node.right, value)
    if a is None or b is None:
        return None
    if isinstance(node.op, ast.Add):
        return a + b
    if isinstance(node.op, ast.Mult):
        return a * b
    return a // b if b else None


class Dims:
    """Config values for shape expressions: config.json, else the table's derivation (what the modeling
    code does for a missing key), else transformers' default for the family; None when none applies
    (the rule is then skipped rather than guessed)."""

    def __init__(self, model: MoEModel) -> None:
        self.model = model
        self.defaults = dict(model.spec.config_defaults)
        self._cache: dict[str, int | None] = {"E": model.num_experts}
        self._busy: set[str] = set()

    def __call__(self, key: str) -> int | None:
        if key not in self._cache:
            self._cache[key] = self._lookup(key)
        return self._cache[key]

    def _lookup(self, key: str) -> int | None:
        raw = self.model.ckpt.config.get(key)
        if raw is None and key in self.defaults and key not in self._busy:
            self._busy.add(key)
            try:
                return self.eval(self.defaults[key])
            finally:
                self._busy.discard(key)
        if raw is None:
            try:
                raw = self.model.cfg_value(key)
            except SurgeryError:  # transformers cannot read this config: leave the rule out
                return None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != int(raw):
            return None
        return int(raw)

    def eval(self, expr: str) -> int | None:
        return _evaluate(_parse(expr), self)

    def shape(self, exprs: tuple[str, ...]) -> tuple[int, ...] | None:
        dims = tuple(self.eval(e) for e in exprs)
        return None if any(d is None for d in dims) else dims  # type: ignore[return-value]

    def explain(self, exprs: tuple[str, ...]) -> str:
        """`[vocab_size=8192, hidden_size=256]`: where each expected dimension comes from."""
        parts = []
        for e in exprs:
            v = self.eval(e)
            label = self.model.experts_key if e == "E" else e  # the expert count under its config key
            parts.append(str(v) if e.isdigit() else f"{label}={v}")
        return "[" + ", ".join(parts) + "]"
