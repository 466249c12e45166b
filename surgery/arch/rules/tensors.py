"""The `shape` and `dtype` rules: every tensor whose role the family table knows has the shape
config.json implies and a dtype of its kind; linears may be stored in a quantized form (`fp8`,
`w4a16`). The rules are the table's data (`linear_shapes`, `param_shapes`, the router, the experts'
projections, embedding / norm / lm_head), keyed once per checkpoint in `ShapeRules`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.arch.rules.dims import Dims
from surgery.arch.rules.fp8 import check_fp8_scale, check_fp8_weight
from surgery.arch.rules.problem import FLOATS, FP8, FP8_SCALE, LINEAR_SUFFIXES, W4A16_PARTS, Problem
from surgery.arch.rules.quantization import Quant
from surgery.arch.rules.w4a16 import check_w4a16_part

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel


class ShapeRules:
    """The table entry's shape rules, keyed the way tensors are looked up: layer-relative names (`{moe}`
    expanded), global names, and `EXPERT:<proj>` for a routed expert's projection."""

    def __init__(self, model: MoEModel) -> None:
        spec = model.spec
        moe = spec.moe_disk

        def rel(name: str) -> str:
            return name.replace("{moe}", moe)

        self.linear: dict[str, tuple[str, str]] = {rel(k): v for k, v in spec.linear_shapes}
        self.param: dict[str, tuple[str, ...]] = {rel(k): v for k, v in spec.param_shapes}
        router = f"{moe}.{spec.router_weight}"
        self.linear[router.removesuffix(".weight")] = ("E", "hidden_size")
        for bias in spec.router_biases:
            self.param[f"{moe}.{bias}"] = spec.router_bias_shape
        inter = spec.expert_intermediate_key
        for role, proj in spec.projections.items():
            self.linear["EXPERT:" + proj] = ("hidden_size", inter) if role == "down" else (inter, "hidden_size")
        self.param[spec.embed] = ("vocab_size", "hidden_size")
        self.param[spec.final_norm] = ("hidden_size",)
        self.linear[spec.lm_head.removesuffix(".weight")] = ("vocab_size", "hidden_size")
        self.roles = {spec.embed: "the embedding", spec.final_norm: "the final norm", spec.lm_head: "lm_head"}
        self.routers = {router, *(f"{moe}.{bias}" for bias in spec.router_biases)}


class TensorChecker:
    """Shape, dtype and quantized-form rules for every tensor (see the module docstring)."""

    def __init__(self, model: MoEModel, quant: Quant, dims: Dims) -> None:
        self.model, self.quant, self.dims = model, quant, dims
        self.rules = ShapeRules(model)
        self.tensors = model.ckpt.tensors
        self.where = str(model.ckpt.directory)
        self.problems: list[Problem] = []
        self._expected: dict[tuple[str, ...], tuple[int, ...] | None] = {}
        self._compiled: dict[str, tuple] = {}

    def _shape(self, exprs: tuple[str, ...]) -> tuple[int, ...] | None:
        if exprs not in self._expected:
            self._expected[exprs] = self.dims.shape(exprs)
        return self._expected[exprs]

    def add(self, rule: str, name: str, message: str) -> None:
        self.problems.append(Problem(rule, name, message, self.where))

    def how(self, exprs: tuple[str, ...] | None, template: str = "{}") -> str:
        """Where expected dimensions come from (only computed for a message: per tensor it would cost)."""
        return template.format(self.dims.explain(exprs)) if exprs else ""

    def _want_shape(self, name: str, key: str, found: tuple[int, ...], want: tuple[int, ...],
                    exprs: tuple[str, ...] | None, template: str = "{}") -> None:
        if found == want:
            return
        how = self.how(exprs, template)
        if key in self.rules.routers:  # the expert count is the usual culprit: say it in those words
            self.add("shape", name, f"router tensor {name!r} has shape {list(found)}; config.json says "
                      f"{self.model.num_experts} experts ({self.model.experts_key}), so expected {list(want)} {how}")
            return
        role = self.rules.roles.get(key)
        self.add("shape", name, f"tensor {name!r} has shape {list(found)} but config.json implies "
                  f"{list(want)} {how}" + (f" for {role}" if role else ""))

    def want_dtype(self, name: str, dtype: str, allowed: frozenset[str], what: str) -> None:
        if dtype not in allowed:
            self.add("dtype", name, f"tensor {name!r} is {dtype}; expected {what} ({', '.join(sorted(allowed))})")

    def check(self, name: str, key: str) -> None:
        """`key` is the rule lookup key of `name`: layer-relative, global, or `EXPERT:<proj>.<suffix>`. The
        rule of a key is worked out once (a checkpoint has ~100k tensors but a few dozen keys)."""
        rule = self._compiled.get(key)
        if rule is None:
            rule = self._compiled[key] = self._compile(key)
        kind, want, exprs, suffix, weight_key = rule
        info = self.tensors[name]
        if kind == "param":
            if want is not None and info.shape != want:
                self._want_shape(name, key, info.shape, want, exprs)
            if info.dtype not in FLOATS:
                self.want_dtype(name, info.dtype, FLOATS, "a floating-point dtype")
        elif kind == "linear":
            self._linear(name, name[:len(name) - len(suffix)], suffix, info, want, exprs, weight_key)
        else:
            self._unmatched(name, info)

    def _compile(self, key: str) -> tuple:
        """(kind, expected shape or [out, in], its expressions, linear suffix, the module weight's key)."""
        exprs = self.rules.param.get(key)
        if exprs is not None:
            return "param", self._shape(exprs), exprs, "", ""
        module, _, suffix = key.rpartition(".")
        if suffix not in LINEAR_SUFFIXES:
            return "other", None, None, "", ""
        exprs = self.rules.linear.get(module)
        return "linear", self._shape(exprs) if exprs is not None else None, exprs, suffix, module + ".weight"

    def _unmatched(self, name: str, info) -> None:
        """A tensor whose role the table does not know: only the quantized forms are checked."""
        base, _, suffix = name.rpartition(".")
        quantized = info.dtype in FP8 or suffix in (FP8_SCALE, "qweight") or (
            suffix in W4A16_PARTS and self.quant.kind == "w4a16")
        if quantized and suffix in LINEAR_SUFFIXES:
            self._linear(name, base + ".", suffix, info, None, None, "")
        elif info.dtype in FP8:
            self.add("quantization", name, f"FP8 tensor {name!r} is not a linear weight; expected FP8 only in "
                      "<module>.weight tensors with a weight_scale_inv beside them")

    def _linear(self, name: str, stem: str, suffix: str, info, logical: tuple[int, int] | None,
                exprs: tuple[str, ...] | None, key: str) -> None:
        """`stem` is `<module>.`; `logical` the [out, in] config.json implies (None: unknown role) from
        `exprs`; `key` the rule key of the module's weight."""
        if suffix == "weight":
            if info.dtype in FLOATS:
                pass
            elif info.dtype in FP8:
                check_fp8_weight(self, name, stem, info)
            else:
                self.want_dtype(name, info.dtype, FLOATS, "a floating-point or FP8 weight")
            if logical is not None and info.shape != logical:
                self._want_shape(name, key, info.shape, logical, exprs)
            return
        if suffix == "bias":
            self.want_dtype(name, info.dtype, FLOATS, "a floating-point bias")
            if logical is not None:
                self._want_shape(name, key.removesuffix(".weight") + ".bias", info.shape, logical[:1], exprs,
                                 "([out] of {})")
            return
        if suffix == FP8_SCALE:
            check_fp8_scale(self, name, stem, info)
            return
        check_w4a16_part(self, name, stem, suffix, info, logical, exprs)
