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

Each rule lives with its subject in `surgery.arch.rules` (config, quantization, index, tensors with
their FP8 and W4A16 forms, layers); this module is the pass that runs them in that order, and the
refusal every command but `inspect` makes on the first problem.

Cost: one pass over the tensor names with dict lookups and one regular expression each; shapes are
evaluated once per rule, not per tensor (about 0.2 s for MiniMax-M2's 100k tensors, see
tools/bench_consistency.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING

from surgery.arch.rules.config import family_problems, routing_problems
from surgery.arch.rules.dims import Dims
from surgery.arch.rules.index import index_problems
from surgery.arch.rules.layers import expert_problems, layer_problems, missing_problems
from surgery.arch.rules.problem import FP8, Problem
from surgery.arch.rules.quantization import Quant, quant_of, quant_presence, unsupported_problems
from surgery.arch.rules.tensors import TensorChecker
from surgery.arch.rules.w4a16 import w4a16_declared_problems
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel

MAX_PROBLEMS = 100  # a wholly wrong config makes every tensor a problem: the first hundred say enough


def find_problems(model: MoEModel) -> list[Problem]:
    """Every disagreement between config.json, the index and the shard headers (headers only), in the
    order of the module docstring's rules; at most MAX_PROBLEMS, the last saying how many were left out."""
    ckpt = model.ckpt
    cfg_where = str(ckpt.config_path)
    problems: list[Problem] = family_problems(model, cfg_where)
    quant = quant_of(ckpt.config, cfg_where, problems)
    problems += unsupported_problems(model)
    problems += index_problems(model)
    problems += _tensor_problems(model, quant)
    problems += routing_problems(model, cfg_where)  # after the tensors: a wrong expert count shows there first
    if len(problems) > MAX_PROBLEMS:
        left = len(problems) - MAX_PROBLEMS + 1
        problems = problems[:MAX_PROBLEMS - 1] + [Problem("more", "", f"... and {left} more problems")]
    return problems


def _tensor_problems(model: MoEModel, quant: Quant) -> list[Problem]:
    """One pass over the tensor names: each checked by its rule, and what the layer, expert and
    presence rules need gathered on the way."""
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
    out = layer_problems(model, beyond, mtp, where)
    out += quant_presence(ckpt.config_path, quant, fp8_count, w4_count)
    if quant.kind == "w4a16":
        out += w4a16_declared_problems(model, str(ckpt.config_path))
    out += checker.problems
    out += expert_problems(model, experts, where)
    out += missing_problems(model, seen_layers, where)
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
