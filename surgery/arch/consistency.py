"""One consistency check for a checkpoint that may disagree with itself, from headers and config.json only.

Why a separate pass before any work: a checkpoint whose parts disagree (a partial download, a
hand-edited config, an index merged from two revisions, a quantized copy with the wrong config) is
otherwise accepted and ends in a traceback hours later or, worse, in a pruned output that looks
complete and is wrong. Every command that opens a checkpoint runs this (through `MoEModel`); `inspect`
reports the problems, every other command refuses on the first one, before a weight is read.

The rules, each named in the problem it reports:

- `family`: `architectures` and `model_type` name the same family of the table.
- `quantization`: a `quantization_config` whose method surgery reads (the hub FP8 block layout, W4A16
  auto-round in auto_gptq packing) and tensors that match it (FP8 tensors only under FP8, and so on);
  under W4A16 each linear is stored as `block_name_to_quantize`/`extra_config` declare it (what vLLM's
  AutoRound loader reads it as): packed where declared 4-bit, plain where declared 16-bit, never both.
- `index`: the index and the shard headers agree in both directions (the reader checks index -> shard).
- `layers`: layer indices within `num_hidden_layers` plus the family's MTP layers.
- `shape` / `dtype`: every tensor whose role the table knows has the shape config.json implies and a
  dtype of its kind; FP8 weights carry their block scales, W4A16 weights their qzeros and scales.
- `experts`: every MoE layer has its router and experts exactly 0..E-1 with identical tensor sets.
- `missing`: the embedding, final norm, lm_head (unless tied) and each layer's norms are present.
- `routing`: top-k within the expert count, group-limited routing fields consistent.

Cost: one pass over the tensor names with dict lookups and one regular expression each; shapes are
evaluated once per rule, not per tensor (about 0.2 s for MiniMax-M2's 100k tensors, see
tools/bench_consistency.py).
"""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.arch.table import BY_ARCHITECTURE, TABLE
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel

FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
FP8_SCALE = "weight_scale_inv"
W4A16_PARTS = ("qweight", "qzeros", "scales", "g_idx")
LINEAR_SUFFIXES = frozenset({"weight", "bias", FP8_SCALE, *W4A16_PARTS})
DEFAULT_FP8_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
SUPPORTED_QUANT = ("fp8 (hub FP8 block layout: float8_e4m3fn weights with weight_scale_inv), "
                   "auto-round W4A16 in auto_round:auto_gptq packing (bits 4)")
REGEX_CHARS = frozenset("*+?^$()[]{}|\\")  # an extra_config key with one of these is a pattern (as vLLM reads it)
MAX_PROBLEMS = 100  # a wholly wrong config makes every tensor a problem: the first hundred say enough
BY_MODEL_TYPE = {spec.model_type: spec for spec in TABLE}


@dataclass(frozen=True)
class Problem:
    """One disagreement: which rule, the tensor or config key it concerns, and one line saying what was
    found and what was expected."""

    rule: str
    subject: str
    message: str
    path: str | None = None

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------- dimensions
@cache
def _parse(expr: str) -> ast.expr:
    node = ast.parse(expr, mode="eval").body
    for sub in ast.walk(node):
        if not isinstance(sub, (ast.BinOp, ast.Name, ast.Constant, ast.Add, ast.Mult, ast.FloorDiv, ast.Load)):
            raise ValueError(f"unsupported shape expression {expr!r}")
    return node


def _names(expr: str) -> list[str]:
    return sorted({n.id for n in ast.walk(_parse(expr)) if isinstance(n, ast.Name)})


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


# ---------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Quant:
    """What quantization_config says the tensors are: "fp8" (with its block), "w4a16" (with its group)
    or None (plain floating point)."""

    kind: str | None
    block: tuple[int, int] = DEFAULT_FP8_BLOCK
    group: int = 128


def quant_of(config: dict, where: str, problems: list[Problem]) -> Quant:
    """Read quantization_config; an unsupported method is a problem naming it and what is supported."""
    qcfg = config.get("quantization_config")
    if not qcfg:
        return Quant(None)
    if not isinstance(qcfg, dict):
        problems.append(Problem("quantization", "quantization_config", "config.json quantization_config is not "
                                f"an object; expected one of: {SUPPORTED_QUANT}", where))
        return Quant(None)
    method = str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    if method == "fp8":
        fmt = str(qcfg.get("fmt", "e4m3")).lower()
        block = qcfg.get("weight_block_size") or DEFAULT_FP8_BLOCK
        ok_block = (isinstance(block, (list, tuple)) and len(block) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))
        if "e4m3" not in fmt or not ok_block:
            problems.append(Problem("quantization", "quantization_config", f"config.json quantization_config is fp8 "
                                    f"with fmt {qcfg.get('fmt')!r} and weight_block_size {block!r}; surgery reads "
                                    "e4m3 weights in 2-D blocks (e.g. [128, 128])", where))
            return Quant(None)
        return Quant("fp8", block=(int(block[0]), int(block[1])))
    packing = str(qcfg.get("packing_format", ""))
    if method == "auto-round" and "auto_gptq" in packing and qcfg.get("bits") == 4:
        group = qcfg.get("group_size", 128)
        if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
            problems.append(Problem("quantization", "quantization_config.group_size", f"config.json "
                                    f"quantization_config.group_size is {group!r}; expected a positive integer "
                                    "(or -1 for one group per column)", where))
            return Quant(None)
        return Quant("w4a16", group=group)
    described = method or "(no quant_method)"
    if packing:
        described += f" (packing_format {packing!r}, bits {qcfg.get('bits')!r})"
    elif qcfg.get("bits") is not None:
        described += f" (bits {qcfg.get('bits')!r})"
    problems.append(Problem("quantization", "quantization_config.quant_method", f"config.json "
                            f"quantization_config.quant_method is {described}, which surgery does not read; "
                            f"supported: {SUPPORTED_QUANT}", where))
    return Quant(None)


def _family_problems(model: MoEModel, where: str) -> list[Problem]:
    cfg, spec = model.ckpt.config, model.spec
    out = []
    archs = cfg.get("architectures") or []
    others = sorted({BY_ARCHITECTURE[a].family for a in archs if a in BY_ARCHITECTURE} - {spec.family})
    if others:
        out.append(Problem("family", "architectures", f"config.json architectures {archs} name several families "
                           f"({', '.join([spec.family, *others])}); expected one", where))
    mt = cfg.get("model_type")
    if mt is not None and mt != spec.model_type:
        known = BY_MODEL_TYPE.get(mt)
        its = f" (family {known.family})" if known else ""
        out.append(Problem("family", "model_type", f"config.json model_type {mt!r}{its} disagrees with architectures "
                           f"{archs} (family {spec.family}); expected model_type {spec.model_type!r}", where))
    return out


def _routing_problems(model: MoEModel, where: str) -> list[Problem]:
    spec, e, k = model.spec, model.num_experts, model.top_k
    key = model.experts_key
    if e < 1:
        return [Problem("routing", key, f"config.json {key} is {e}; expected at least 1 expert", where)]
    out = []
    if not 1 <= k <= e:
        out.append(Problem("routing", spec.top_k_key, f"config.json {spec.top_k_key} is {k} but {key} is {e}; "
                           f"expected top-k between 1 and {e}", where))
    if spec.routing.group_keys:
        facts = model.routing_facts()
        g, tg = facts.get("n_group", 1), facts.get("topk_group", 1)
        gk, tk = spec.routing.group_keys
        if g < 1 or e % g:
            out.append(Problem("routing", gk, f"config.json {gk} is {g}, which does not divide {key} {e} into equal "
                               "routing groups", where))
        elif not 1 <= tg <= g:
            out.append(Problem("routing", tk, f"config.json {tk} is {tg}; expected 1..{gk} ({g})", where))
        elif g > 1 and (e // g < 2 or tg * (e // g) < k):
            out.append(Problem("routing", tk, f"config.json {tk} {tg} of {g} groups of {e // g} experts cannot "
                               f"supply {spec.top_k_key} {k} (groups are scored by their top 2)", where))
    return out


def _index_problems(model: MoEModel) -> list[Problem]:
    """Shard -> index: every tensor a shard's header holds is the one the index lists for that name."""
    ckpt = model.ckpt
    if ckpt.index_path is None:
        return []
    out = []
    for rel, shard in ckpt.shards.items():
        for name in shard.tensors:
            listed = ckpt.tensors.get(name)
            if listed is None:
                out.append(Problem("index", name, f"shard {rel} holds tensor {name!r}, which "
                                   f"{ckpt.index_path.name} does not list (expected every shard tensor in the "
                                   "index: an index from another revision or a partial merge?)", str(shard.path)))
            elif listed.shard != rel:
                out.append(Problem("index", name, f"tensor {name!r} is stored in shard {rel} and in {listed.shard}; "
                                   f"the index lists {listed.shard} (expected each tensor once)", str(shard.path)))
    return out


class _Rules:
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
        self.rules = _Rules(model)
        self.tensors = model.ckpt.tensors
        self.where = str(model.ckpt.directory)
        self.problems: list[Problem] = []
        self._expected: dict[tuple[str, ...], tuple[int, ...] | None] = {}
        self._compiled: dict[str, tuple] = {}

    def _shape(self, exprs: tuple[str, ...]) -> tuple[int, ...] | None:
        if exprs not in self._expected:
            self._expected[exprs] = self.dims.shape(exprs)
        return self._expected[exprs]

    def _add(self, rule: str, name: str, message: str) -> None:
        self.problems.append(Problem(rule, name, message, self.where))

    def _how(self, exprs: tuple[str, ...] | None, template: str = "{}") -> str:
        """Where expected dimensions come from (only computed for a message: per tensor it would cost)."""
        return template.format(self.dims.explain(exprs)) if exprs else ""

    def _want_shape(self, name: str, key: str, found: tuple[int, ...], want: tuple[int, ...],
                    exprs: tuple[str, ...] | None, template: str = "{}") -> None:
        if found == want:
            return
        how = self._how(exprs, template)
        if key in self.rules.routers:  # the expert count is the usual culprit: say it in those words
            self._add("shape", name, f"router tensor {name!r} has shape {list(found)}; config.json says "
                      f"{self.model.num_experts} experts ({self.model.experts_key}), so expected {list(want)} {how}")
            return
        role = self.rules.roles.get(key)
        self._add("shape", name, f"tensor {name!r} has shape {list(found)} but config.json implies "
                  f"{list(want)} {how}" + (f" for {role}" if role else ""))

    def _want_dtype(self, name: str, dtype: str, allowed: frozenset[str], what: str) -> None:
        if dtype not in allowed:
            self._add("dtype", name, f"tensor {name!r} is {dtype}; expected {what} ({', '.join(sorted(allowed))})")

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
                self._want_dtype(name, info.dtype, FLOATS, "a floating-point dtype")
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
            self._add("quantization", name, f"FP8 tensor {name!r} is not a linear weight; expected FP8 only in "
                      "<module>.weight tensors with a weight_scale_inv beside them")

    def _linear(self, name: str, stem: str, suffix: str, info, logical: tuple[int, int] | None,
                exprs: tuple[str, ...] | None, key: str) -> None:
        """`stem` is `<module>.`; `logical` the [out, in] config.json implies (None: unknown role) from
        `exprs`; `key` the rule key of the module's weight."""
        q = self.quant
        if suffix == "weight":
            if info.dtype in FLOATS:
                pass
            elif info.dtype in FP8:
                scale = stem + FP8_SCALE
                if q.kind != "fp8":
                    self._add("quantization", name, f"tensor {name!r} is {info.dtype} but config.json has "
                              f"{'no' if q.kind is None else 'a ' + q.kind} quantization_config; expected "
                              "quantization_config quant_method 'fp8' with weight_block_size")
                elif scale not in self.tensors:
                    self._add("quantization", name, f"FP8 tensor {name!r} {list(info.shape)} has no {scale!r}; "
                              f"expected its block scales [{self._blocks(info.shape)}] (the hub FP8 layout)")
            else:
                self._want_dtype(name, info.dtype, FLOATS, "a floating-point or FP8 weight")
            if logical is not None and info.shape != logical:
                self._want_shape(name, key, info.shape, logical, exprs)
            return
        if suffix == "bias":
            self._want_dtype(name, info.dtype, FLOATS, "a floating-point bias")
            if logical is not None:
                self._want_shape(name, key.removesuffix(".weight") + ".bias", info.shape, logical[:1], exprs,
                                 "([out] of {})")
            return
        if suffix == FP8_SCALE:
            weight = self.tensors.get(stem + "weight")
            self._want_dtype(name, info.dtype, FLOATS, "floating-point FP8 block scales")
            if weight is None or weight.dtype not in FP8:
                found = "no weight" if weight is None else f"weight {weight.dtype}"
                self._add("quantization", name, f"scale tensor {name!r} belongs to an FP8 weight but there is "
                          f"{found} {stem + 'weight'!r}; expected an F8_E4M3 weight beside it")
            elif len(weight.shape) == 2:
                want = (-(-weight.shape[0] // q.block[0]), -(-weight.shape[1] // q.block[1]))
                if info.shape != want:
                    self._add("shape", name, f"FP8 scale {name!r} has shape {list(info.shape)} but weight "
                              f"{list(weight.shape)} in blocks of {list(q.block)} (quantization_config "
                              f"weight_block_size) needs {list(want)}")
            return
        self._w4a16(name, stem, suffix, info, logical, exprs)

    def _blocks(self, shape: tuple[int, ...]) -> str:
        if len(shape) != 2:
            return "?"
        b = self.quant.block if self.quant.kind == "fp8" else DEFAULT_FP8_BLOCK
        return ", ".join(str(math.ceil(d / x)) for d, x in zip(shape, b, strict=True))

    def _w4a16(self, name: str, stem: str, suffix: str, info, logical: tuple[int, int] | None,
               exprs: tuple[str, ...] | None) -> None:
        """qweight int32 [in/8, out], qzeros int32 [ceil(in/G), out/8], scales float [ceil(in/G), out],
        g_idx int32 [in] (auto-round's auto_gptq packing)."""
        if self.quant.kind != "w4a16":
            self._add("quantization", name, f"tensor {name!r} is a W4A16 {suffix} but config.json has "
                      f"{'no' if self.quant.kind is None else 'a ' + self.quant.kind} quantization_config; expected "
                      "quant_method 'auto-round' with packing_format 'auto_round:auto_gptq' and bits 4")
            return
        qweight = self.tensors.get(stem + "qweight")
        if suffix != "qweight" and qweight is None:
            self._add("quantization", name, f"tensor {name!r} has no {stem + 'qweight'!r} beside it; expected the "
                      "W4A16 triple qweight, qzeros, scales")
            return
        if suffix == "qweight":
            for part in ("qzeros", "scales"):
                if stem + part not in self.tensors:
                    self._add("quantization", name, f"W4A16 tensor {name!r} has no {stem + part!r}; expected "
                              "the triple qweight, qzeros, scales")
            if len(info.shape) != 2:
                self._add("shape", name, f"W4A16 tensor {name!r} has shape {list(info.shape)}; expected [in/8, out]")
                return
        assert qweight is not None or suffix == "qweight"
        ref = info if suffix == "qweight" else qweight
        if len(ref.shape) != 2:
            return  # reported on the qweight itself
        out_dim, in_dim = logical if logical is not None else (ref.shape[1], ref.shape[0] * 8)
        groups = 1 if self.quant.group == -1 else math.ceil(in_dim / self.quant.group)
        want, dtypes = {
            "qweight": ((in_dim // 8, out_dim), frozenset({"I32"})),
            "qzeros": ((groups, math.ceil(out_dim / 8)), frozenset({"I32"})),
            "scales": ((groups, out_dim), FLOATS),
            "g_idx": ((in_dim,), frozenset({"I32"})),
        }[suffix]
        self._want_dtype(name, info.dtype, dtypes, f"the W4A16 {suffix} dtype")
        if info.shape != want:
            source = (f"[out, in] {list(logical)} {self._how(exprs)}" if logical is not None
                      else f"qweight {list(ref.shape)}")
            self._add("shape", name, f"W4A16 tensor {name!r} has shape {list(info.shape)}; {source} with group_size "
                      f"{self.quant.group} implies {list(want)}")


# ---------------------------------------------------------------------------------------------- the pass
def find_problems(model: MoEModel) -> list[Problem]:
    """Every disagreement between config.json, the index and the shard headers (headers only), in the
    order of the module docstring's rules; at most MAX_PROBLEMS, the last saying how many were left out."""
    ckpt, spec = model.ckpt, model.spec
    cfg_where = str(ckpt.config_path)
    problems: list[Problem] = _family_problems(model, cfg_where)
    quant = quant_of(ckpt.config, cfg_where, problems)
    for suffix, why in spec.unsupported_suffixes:
        hit = next((n for n in ckpt.tensors if n.endswith(suffix)), None)
        if hit is not None:
            problems.append(Problem("quantization", hit, f"{spec.family}: {why} (tensor {hit!r})", str(ckpt.directory)))
    problems += _index_problems(model)
    problems += _tensor_problems(model, quant)
    problems += _routing_problems(model, cfg_where)  # after the tensors: a wrong expert count shows there first
    if len(problems) > MAX_PROBLEMS:
        left = len(problems) - MAX_PROBLEMS + 1
        problems = problems[:MAX_PROBLEMS - 1] + [Problem("more", "", f"... and {left} more problems")]
    return problems


def _tensor_problems(model: MoEModel, quant: Quant) -> list[Problem]:
    ckpt, spec = model.ckpt, model.spec
    where = str(ckpt.directory)
    dims = Dims(model)
    checker = TensorChecker(model, quant, dims)
    layer_re = re.compile("^" + re.escape(spec.layer_prefix).replace(r"\{layer\}", r"(\d+)"))
    expert_rel = spec.moe_disk + "." + spec.expert_key.split("{expert}")[0]
    n_layers = model.num_layers
    mtp = int(dims(spec.mtp_key) or 0) if spec.mtp_key else 0
    beyond: dict[int, str] = {}
    experts: dict[int, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    seen_layers: dict[int, set[str]] = defaultdict(set)
    fp8_count = w4_count = 0
    match, check, skip, limit = layer_re.match, checker.check, len(expert_rel), n_layers + mtp
    for name, info in ckpt.tensors.items():  # ~100k on the largest checkpoints: kept tight
        dtype = info.dtype
        if dtype in FP8:
            fp8_count += 1
        elif dtype == "I32" and name.endswith(".qweight"):
            w4_count += 1
        m = match(name)
        if m is None:
            check(name, name)
            continue
        layer, rel = int(m.group(1)), name[m.end():]
        if layer >= limit:
            beyond.setdefault(layer, name)
            continue
        if rel.startswith(expert_rel):
            idx, _, rest = rel[skip:].partition(".")
            if idx.isdigit():
                experts[layer][int(idx)][rest] = (dtype, info.shape)
                check(name, "EXPERT:" + rest)
                continue
        seen_layers[layer].add(rel)
        check(name, rel)
    out = _layer_problems(model, beyond, mtp, where)
    out += _quant_presence(ckpt.config_path, quant, fp8_count, w4_count)
    if quant.kind == "w4a16":
        out += _w4a16_declared_problems(model, str(ckpt.config_path))
    out += checker.problems
    out += _expert_problems(model, experts, where)
    out += _missing_problems(model, seen_layers, where)
    return out


def _layer_problems(model: MoEModel, beyond: dict[int, str], mtp: int, where: str) -> list[Problem]:
    if not beyond:
        return []
    spec, n = model.spec, model.num_layers
    from surgery.humanize import layer_ranges

    layers = sorted(beyond)
    example = beyond[layers[0]]
    found = f"tensors of layer(s) {layer_ranges(layers)} (e.g. {example!r})"
    if spec.mtp_key:
        msg = (f"{found} are stored, but num_hidden_layers {n} + {spec.mtp_key} {mtp} allow layers 0..{n + mtp - 1}; "
               f"expected {spec.mtp_key} to count the stored MTP layers")
    else:
        declared = {k: model.ckpt.config[k] for k in spec.declared_mtp_keys if k in model.ckpt.config}
        said = (f"; config.json declares {', '.join(f'{k}={v}' for k, v in declared.items())}, but"
                if declared else ";")
        msg = (f"{found} are stored past num_hidden_layers ({n}) (MTP modules?){said} the {spec.family} table entry "
               "knows no layout for them: expected no tensors past the last decoder layer")
    return [Problem("layers", example, msg, where)]


def _quant_presence(config_path: Path, quant: Quant, fp8_count: int, w4_count: int) -> list[Problem]:
    """A quantization_config over tensors that are not quantized that way (e.g. FP8 claimed over bf16)."""
    where = str(config_path)
    if quant.kind == "fp8" and not fp8_count:
        return [Problem("quantization", "quantization_config", "config.json quantization_config says fp8 but no "
                        "tensor is FP8 (F8_E4M3); expected FP8 weights with weight_scale_inv, or no "
                        "quantization_config", where)]
    if quant.kind == "w4a16" and not w4_count:
        return [Problem("quantization", "quantization_config", "config.json quantization_config says W4A16 "
                        "(auto-round) but no tensor is a .qweight; expected packed weights, or no "
                        "quantization_config", where)]
    return []


def declared_bits(qcfg: dict, module: str) -> int:
    """The bits vLLM's AutoRound loader gives linear `module`: an exact `extra_config` key, else the
    first regex key (one with a regex metacharacter) found in the name by `re.search`, else the
    checkpoint's bits inside `block_name_to_quantize` (comma-separated or a list; absent: everywhere)
    and 16 outside. AutoRound writes regex keys (`.*model[.]layers[.]0[.]mlp[.]gate.*`, with escaped dots),
    surgery exact names."""
    bits = int(qcfg.get("bits", 4))
    extra = qcfg.get("extra_config") or {}
    cfg = extra.get(module)
    if cfg is None:
        for key, value in extra.items():
            if isinstance(key, str) and any(c in REGEX_CHARS for c in key):
                try:
                    if re.search(key, module):
                        cfg = value
                        break
                except re.error:
                    continue
    if isinstance(cfg, dict) and "bits" in cfg:
        return int(cfg["bits"])
    blocks = qcfg.get("block_name_to_quantize")
    if isinstance(blocks, str):
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]
    return bits if not blocks or any(module.startswith(b) for b in blocks) else 16


def _w4a16_declared_problems(model: MoEModel, where: str) -> list[Problem]:
    """Each linear stored as the quantization_config declares it. Why: vLLM decides from the config
    alone whether to build a packed or a plain linear and then looks for `qweight` or `weight`, so a
    packed expert written into a checkpoint whose extra_config calls it 16-bit, or a plain attention or
    expert weight (e.g. a rewrite that wrote merged experts unpacked) where 4 bits are declared, loads
    nowhere, while the shapes alone look fine. Plain weights are checked only for the linears every
    loader builds with the quantization config (attention, routed and shared experts, dense MLPs):
    routers and MTP extras are often built unquantized whatever the config says; and only when the
    config names modules at all (`block_name_to_quantize` or `extra_config`, as AutoRound and surgery
    write): a bare GPTQ-style config leaves the choice to its loader's own defaults."""
    ckpt, spec = model.ckpt, model.spec
    qcfg = ckpt.config.get("quantization_config") or {}
    declares = bool(qcfg.get("block_name_to_quantize") or qcfg.get("extra_config"))
    moe = set(model.moe_layers) | set(model.mtp_expert_layers())
    shared = tuple(spec.moe_disk + "." + s for s in spec.shared_experts)
    out: list[Problem] = []
    for name, info in ckpt.tensors.items():
        stem, _, suffix = name.rpartition(".")
        if suffix not in ("qweight", "weight") or (layer := model.layer_of(name)) is None:
            continue
        if suffix == "qweight":
            if stem + ".weight" in ckpt.tensors:
                out.append(Problem("quantization", name, f"linear {stem!r} is stored both packed ({name!r}) and plain "
                                   f"({stem + '.weight'!r}); expected one of them", where))
            elif (bits := declared_bits(qcfg, stem)) >= 16:
                out.append(Problem("quantization", name, f"W4A16 tensor {name!r} is packed but quantization_config "
                                   f"declares {stem!r} {bits}-bit (extra_config / block_name_to_quantize); expected a "
                                   f"plain {stem + '.weight'!r} or the module declared 4-bit", where))
            continue
        if not declares or len(info.shape) != 2 or info.dtype not in FLOATS:
            continue
        rel = name[len(model.layer_prefix(layer)):]
        if layer >= model.num_layers and rel.startswith(spec.mtp_extras):
            continue
        role = model.classify(name).kind
        packable = role == "expert" or (role == "other" and (
            rel.startswith(spec.quant_linears) or (layer in moe and bool(shared) and rel.startswith(shared))
            or (layer not in moe and rel.startswith(spec.dense_mlp))))
        if packable and (bits := declared_bits(qcfg, stem)) < 16:
            out.append(Problem("quantization", name, f"linear {stem!r} is stored plain ({name!r}) but "
                               f"quantization_config declares it {bits}-bit (block_name_to_quantize "
                               f"{qcfg.get('block_name_to_quantize')!r}, not in extra_config with bits 16): a W4A16 "
                               f"loader reads {stem + '.qweight'!r}; expected it packed or listed in extra_config",
                               where))
    return out


def _expert_problems(model: MoEModel, experts: dict[int, dict[int, dict[str, tuple]]], where: str) -> list[Problem]:
    """Each MoE layer: its router, and experts exactly 0..E-1 with the same tensors (or its fused tensors)."""
    from surgery.humanize import layer_ranges

    ckpt, spec, n = model.ckpt, model.spec, model.num_experts
    key = model.experts_key
    stem = spec.expert_key.split("{expert}")[0]

    def expert_name(layer: int, e: int) -> str:
        return f"{model.moe_prefix(layer)}{stem}{e}.{next(iter(experts[layer][e]))}"

    # the MTP layers past the decoder layers that hold routed experts (families with an MTP layout)
    mtp = [layer for layer in sorted(experts) if layer >= model.num_layers] if spec.mtp_key else []
    moe = model.moe_layers + mtp
    moe_set = set(moe)
    out = []
    for layer in sorted(experts):
        if layer not in moe_set:
            name = expert_name(layer, min(experts[layer]))
            out.append(Problem("experts", name, f"tensor {name!r} is an expert's but layer {layer} is not a MoE "
                               f"layer by config.json (MoE layers: {layer_ranges(model.moe_layers)})", where))
    for layer in moe:
        router = model.router_weight_name(layer)
        if router not in ckpt:
            out.append(Problem("experts", router, f"MoE layer {layer} has no router weight {router!r}; expected "
                               f"[{n}, hidden_size]", where))
        if spec.fused_on_disk:
            for rel in spec.fused_on_disk:
                if model.moe_prefix(layer) + rel not in ckpt:
                    out.append(Problem("experts", model.moe_prefix(layer) + rel, f"MoE layer {layer} has no fused "
                                       f"expert tensor {model.moe_prefix(layer) + rel!r}", where))
            continue
        have = experts.get(layer, {})
        extra = sorted(e for e in have if e >= n)
        if extra:
            name = expert_name(layer, extra[0])
            out.append(Problem("experts", name, f"tensor {name!r} belongs to expert {extra[0]} but config.json says "
                               f"{n} experts ({key}); a dropped expert remains (layer {layer} stores experts "
                               f"{layer_ranges(sorted(have))}, expected 0..{n - 1})", where))
        missing = sorted(set(range(n)) - set(have))
        if missing:
            out.append(Problem("experts", f"layer {layer}", f"MoE layer {layer} has no tensors for expert(s) "
                               f"{layer_ranges(missing)} of 0..{n - 1} ({key} {n})", where))
            continue
        reference = have[0]
        for e in range(1, n):
            if have[e] != reference:
                diff = sorted(set(have[e].items()) ^ set(reference.items()))
                out.append(Problem("experts", f"layer {layer} expert {e}", f"MoE layer {layer}: expert {e}'s tensors "
                                   f"differ from expert 0's ({diff[0][0]}: {have[e].get(diff[0][0])} vs "
                                   f"{reference.get(diff[0][0])})", where))
                break
    return out


def _missing_problems(model: MoEModel, seen_layers: dict[int, set[str]], where: str) -> list[Problem]:
    """Tensors every checkpoint of the family has: embedding, final norm, lm_head unless tied, and each
    decoder layer's norms (a layer missing them is a partial download)."""
    ckpt, spec = model.ckpt, model.spec
    out = []
    for name, what in ((spec.embed, "the embedding"), (spec.final_norm, "the final norm")):
        if name not in ckpt:
            out.append(Problem("missing", name, f"tensor {name!r} ({what}) is missing", where))
    if spec.lm_head not in ckpt and not model.cfg_value("tie_word_embeddings", False):
        out.append(Problem("missing", spec.lm_head, f"tensor {spec.lm_head!r} is missing and config.json "
                           "tie_word_embeddings is false; expected lm_head [vocab_size, hidden_size]", where))
    for layer in range(model.num_layers):
        have = seen_layers.get(layer, set())
        lost = [r for r in spec.required_layer_tensors if r not in have]
        if lost:
            name = model.layer_prefix(layer) + lost[0]
            detail = "holds no tensors at all" if not have else f"has no {name!r}"
            out.append(Problem("missing", name, f"decoder layer {layer} {detail}; expected num_hidden_layers "
                               f"{model.num_layers} complete layers", where))
    return out


def check_consistency(model: MoEModel) -> None:
    """Raise the first problem as a one-line `SurgeryError` (how many more there are, and where to see
    them, appended); the checkpoint is then refused before any weight is read."""
    problems = find_problems(model)
    if problems:
        first = problems[0]
        more = (f" ({len(problems) - 1} more problem(s); `surgery inspect` lists them)"
                if len(problems) > 1 else "")
        raise SurgeryError(first.message + more, first.path)
