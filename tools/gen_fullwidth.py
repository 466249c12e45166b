"""Generate a few-layer checkpoint with a real model's EXACT per-layer shapes (random weights).

Why: every test runs at tiny width, where paging a layer is free. Paging, FP8 dequantisation and
expert chunking only show their cost at the real width, and a real MiniMax-M2.1 download is 230 GB.
This writes N decoder layers with MiniMax-M2's shapes (hidden 3072, 256 experts x intermediate 1536,
48 query / 8 KV heads of 128, q/k RMSNorm over all heads) in the hub's on-disk layout: FP8 e4m3 with
float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] on attention q/k/v/o and expert w1/w2/w3,
router `gate.weight` and `e_score_correction_bias` float32, embeddings / norms / lm_head bf16, and a
config.json like the hub's (MiniMaxM2ForCausalLM, quantization_config fp8 with 128x128 blocks,
sigmoid scoring, routing bias, rotary_dim 64) but with `num_hidden_layers = N`.

Deviations from the hub, on purpose:
  - `vocab_size` defaults to 8192 (the hub's is 200064): a full embedding + lm_head would be 2.5 GB of
    bf16 that calibration barely touches, and the shared fixture's tokenizer has 8192 tokens.
  - `bos/eos/pad_token_id` are set to the shipped tokenizer's ids (the hub's 200019/200020 are out of
    range at vocab 8192).
  - no MTP weights (the hub's config says `use_mtp` but the checkpoint ships none either).

Memory stays small: every tensor is generated in pieces of <= 64 MB and streamed into its shard with
surgery's own `SafetensorsWriter` (one shard per decoder layer, one for embeddings / norm / head).
Weights are fast to make: values are a discretised N(0, 1) looked up from random bytes (numpy's byte
generator is ~10x faster than its normal sampler), so a 256-expert layer takes seconds, not minutes.
Each tensor has its own seed (seed, layer, expert, projection), so expert e of layer l is the same
whatever the expert count. Scales are those of a real init (std 0.02 for linears, 1/sqrt(hidden) for
the router so that logits are O(1) and tokens spread over experts); hidden states stay finite.

    .venv/bin/python tools/gen_fullwidth.py --preset minimax-m2 --layers 2 --out .cache/bench/m2-2l
    .venv/bin/python tools/gen_fullwidth.py --layers 1 --experts 64 --out /tmp/m2-1x64
    .venv/bin/python tools/gen_fullwidth.py --hidden 256 --intermediate 128 --experts 8 --layers 1 \\
        --heads 4 --kv-heads 2 --head-dim 64 --out /tmp/tiny          # scaled down (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from surgery.checkpoint.writer import NO_HASH_ENV, SafetensorsWriter, TensorEntry  # noqa: E402

FIXTURE_TOKENIZER = REPO.parent / "shared" / "fixtures" / "tinymoe-m2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
BLOCK = 128
PIECE_BYTES = 64 * 1024 * 1024  # largest piece of a tensor held in memory at once
FP8_MAX = 448.0
FP8_SPREAD = 89.6  # fp8 value = N(0,1) * 89.6: the table's widest quantile (2.9 sigma) maps to ~260 of 448
WEIGHT_STD = 0.02

# MiniMax-M2 / M2.1 (hub config.json). Only the shapes and the routing matter to the tools; the rest is
# copied so that every code path that reads config.json sees what a user's download has.
PRESETS: dict[str, dict] = {
    "minimax-m2": dict(hidden=3072, intermediate=1536, experts=256, heads=48, kv_heads=8, head_dim=128,
                       rotary_dim=64, top_k=8),
}


@dataclass(frozen=True)
class Shape:
    """The per-layer shapes of the model to write (a preset, possibly scaled down for tests)."""

    layers: int
    experts: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    top_k: int
    vocab: int


# ---------------------------------------------------------------------------------------------- values
def _quantile_table(levels: int) -> np.ndarray:
    """`levels` equally likely quantiles of N(0, 1), symmetric: indexing it with uniform random codes
    samples a discretised normal."""
    nd = NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / levels) for i in range(levels)], dtype=np.float32)


def _fp8_table() -> np.ndarray:
    """uint8 bit patterns of float8_e4m3fn values N(0,1) * FP8_SPREAD for 256 codes (no NaN: |v| < 448)."""
    import torch

    values = torch.from_numpy(_quantile_table(256) * FP8_SPREAD).clamp(-FP8_MAX, FP8_MAX)
    return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()


def _bf16_table(std: float) -> np.ndarray:
    """uint16 bit patterns of bfloat16 values N(0,1) * std for 65536 codes."""
    import torch

    values = torch.from_numpy(_quantile_table(65536) * std)
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


class Values:
    """Random tensor contents, generated in pieces; every tensor seeded from its own identity."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.fp8 = _fp8_table()
        self.bf16_weight = _bf16_table(WEIGHT_STD)

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    @staticmethod
    def pieces(n: int, item: int) -> Iterator[int]:
        """Element counts of the pieces of an n-element tensor (<= PIECE_BYTES each)."""
        step = max(1, PIECE_BYTES // item)
        for start in range(0, n, step):
            yield min(step, n - start)

    def fp8_codes(self, rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
        for k in self.pieces(n, 1):
            yield self.fp8[np.frombuffer(rng.bytes(k), dtype=np.uint8)]

    def bf16_normal(self, rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
        for k in self.pieces(n, 2):
            yield self.bf16_weight[np.frombuffer(rng.bytes(2 * k), dtype=np.uint16)]

    @staticmethod
    def bf16_of(values: np.ndarray) -> np.ndarray:
        """float32 -> bfloat16 bit patterns (round to nearest even), without torch."""
        bits = values.astype(np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its entry in the shard and how to make its bytes."""

    entry: TensorEntry
    kind: str  # "fp8", "scale", "bf16_weight", "norm", "router", "bias", "embed"
    key: tuple[int, ...]  # seed key: (layer, expert, projection) or similar

    @property
    def numel(self) -> int:
        return math.prod(self.entry.shape)


KINDS = ("fp8", "scale", "bf16_weight", "norm", "router", "bias", "embed")
PROJ_IDS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "w1": 4, "w2": 5, "w3": 6}


def linear(name: str, rows: int, cols: int, fp8: bool, key: tuple[int, ...]) -> list[Tensor]:
    """A linear weight [rows, cols]: FP8 + block scale in the hub layout, or bf16."""
    if not fp8:
        return [Tensor(TensorEntry(name + ".weight", "BF16", (rows, cols)), "bf16_weight", key)]
    scale = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    return [Tensor(TensorEntry(name + ".weight", "F8_E4M3", (rows, cols)), "fp8", key),
            Tensor(TensorEntry(name + ".weight_scale_inv", "F32", scale), "scale", key)]


def layer_tensors(layer: int, s: Shape, fp8: bool) -> list[Tensor]:
    """Every tensor of decoder layer `layer`, in the hub's names (sorted as safetensors would)."""
    p = f"model.layers.{layer}."
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    moe = p + "block_sparse_moe."
    out: list[Tensor] = [
        Tensor(TensorEntry(moe + "e_score_correction_bias", "F32", (s.experts,)), "bias", (layer, 1)),
    ]
    for e in range(s.experts):
        x = f"{moe}experts.{e}."
        out += linear(x + "w1", s.intermediate, s.hidden, fp8, (layer, e, PROJ_IDS["w1"]))
        out += linear(x + "w2", s.hidden, s.intermediate, fp8, (layer, e, PROJ_IDS["w2"]))
        out += linear(x + "w3", s.intermediate, s.hidden, fp8, (layer, e, PROJ_IDS["w3"]))
    out += [
        Tensor(TensorEntry(moe + "gate.weight", "F32", (s.experts, s.hidden)), "router", (layer, 2)),
        Tensor(TensorEntry(p + "input_layernorm.weight", "BF16", (s.hidden,)), "norm", (layer, 3)),
        Tensor(TensorEntry(p + "post_attention_layernorm.weight", "BF16", (s.hidden,)), "norm", (layer, 4)),
        Tensor(TensorEntry(p + "self_attn.k_norm.weight", "BF16", (kv,)), "norm", (layer, 5)),
    ]
    big = 1 << 20  # attention keys sort apart from the experts' (layer, expert, proj) keys
    out += linear(p + "self_attn.k_proj", kv, s.hidden, fp8, (layer, big, PROJ_IDS["k_proj"]))
    out += linear(p + "self_attn.o_proj", s.hidden, q, fp8, (layer, big, PROJ_IDS["o_proj"]))
    out += [Tensor(TensorEntry(p + "self_attn.q_norm.weight", "BF16", (q,)), "norm", (layer, 6))]
    out += linear(p + "self_attn.q_proj", q, s.hidden, fp8, (layer, big, PROJ_IDS["q_proj"]))
    out += linear(p + "self_attn.v_proj", kv, s.hidden, fp8, (layer, big, PROJ_IDS["v_proj"]))
    return out


def head_tensors(s: Shape) -> list[Tensor]:
    """Embeddings, final norm and lm_head (bf16, as the hub ships them)."""
    top = 1 << 21
    return [
        Tensor(TensorEntry("lm_head.weight", "BF16", (s.vocab, s.hidden)), "bf16_weight", (top, 0)),
        Tensor(TensorEntry("model.embed_tokens.weight", "BF16", (s.vocab, s.hidden)), "embed", (top, 1)),
        Tensor(TensorEntry("model.norm.weight", "BF16", (s.hidden,)), "norm", (top, 2)),
    ]


def tensor_bytes(t: Tensor, v: Values, s: Shape) -> Iterator[np.ndarray]:
    """The bytes of tensor `t`, in pieces (numpy arrays of the stored dtype's bit patterns)."""
    rng = v.rng(*t.key, KINDS.index(t.kind))
    n = t.numel
    if t.kind == "fp8":
        yield from v.fp8_codes(rng, n)
    elif t.kind == "scale":
        # effective weight = N(0,1) * 0.02 * (0.75 .. 1.25): a real init's spread, uneven per block
        factor = rng.uniform(0.75, 1.25, size=t.entry.shape).astype(np.float32)
        yield (factor * (WEIGHT_STD / FP8_SPREAD)).astype(np.float32)
    elif t.kind in ("bf16_weight", "embed"):
        yield from v.bf16_normal(rng, n)
    elif t.kind == "norm":
        yield v.bf16_of(1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32))
    elif t.kind == "router":
        # logits = x . g with x RMS-normalised (O(1) entries): std 1/sqrt(hidden) gives O(1) logits,
        # so sigmoid scores differ per token and top-k spreads tokens over all experts
        for k in v.pieces(n, 4):
            yield rng.standard_normal(k, dtype=np.float32) / np.float32(math.sqrt(s.hidden))
    elif t.kind == "bias":
        yield (0.01 * rng.standard_normal(n)).astype(np.float32)
    else:  # pragma: no cover - the layout above names every kind
        raise ValueError(t.kind)


def write_shard(path: Path, tensors: list[Tensor], v: Values, s: Shape) -> int:
    """Stream one shard to disk; returns its tensor bytes."""
    entries = [t.entry for t in tensors]
    # the writer's SHA-256 is for rewrite manifests, not needed here: off for this writer only (the
    # variable is read when it opens), so a test process importing this module keeps its environment
    before = os.environ.get(NO_HASH_ENV)
    os.environ[NO_HASH_ENV] = "1"
    try:
        w = SafetensorsWriter(path, entries, {"format": "pt"}, fsync=False)
        w.open()
    finally:
        if before is None:
            del os.environ[NO_HASH_ENV]
        else:
            os.environ[NO_HASH_ENV] = before
    try:
        for t in tensors:
            for piece in tensor_bytes(t, v, s):
                w.write(t.entry.name, np.ascontiguousarray(piece).view(np.uint8))
    except BaseException:
        w.abort()
        raise
    w.close()
    return sum(e.nbytes for e in entries)


# ---------------------------------------------------------------------------------------------- config
def hub_config(s: Shape, fp8: bool, token_ids: dict[str, int | None]) -> dict:
    """config.json as MiniMax-M2.1 ships it, with this checkpoint's layer / expert / vocab counts."""
    cfg: dict = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attn_type_list": [1] * s.layers,
        "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                     "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 196608,
        "model_type": "minimax_m2",
        "mtp_transformer_layers": 1,
        "num_attention_heads": s.heads,
        "num_experts_per_tok": s.top_k,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "num_local_experts": s.experts,
        "num_mtp_modules": 3,
        "pad_token_id": token_ids.get("pad"),
        "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rotary_dim": s.rotary_dim,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": s.vocab,
    }
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                                      "weight_block_size": [BLOCK, BLOCK],
                                      "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    return dict(sorted(cfg.items()))


# ---------------------------------------------------------------------------------------------- tokenizer
def provide_tokenizer(out: Path, vocab: int, source: Path | None) -> dict[str, int | None]:
    """Put a tokenizer beside the weights so `surgery calibrate` can tokenise; return its special ids.

    The shared fixture's byte-level BPE (8192 tokens) is copied when it is beside the checkout and fits
    the vocabulary; otherwise (a bare machine with only the repository, or a smaller --vocab) one is
    trained on the Python standard library as `surgery demo` does (offline, a few seconds)."""
    src = source or FIXTURE_TOKENIZER
    tok_json = src / "tokenizer.json"
    if tok_json.is_file() and len(json.loads(tok_json.read_text())["model"]["vocab"]) <= vocab:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    else:
        from surgery.synth import make_tokenizer

        make_tokenizer(out, vocab_size=min(vocab, 8192))
    data = json.loads((out / "tokenizer.json").read_text())
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    ids = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    size = max(ids.values()) + 1
    if size > vocab:
        raise SystemExit(f"tokenizer has {size} tokens, more than --vocab {vocab}")

    def token_id(key: str) -> int | None:
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return ids.get(tok) if tok else None

    return {"bos": token_id("bos_token"), "eos": token_id("eos_token"), "pad": token_id("pad_token")}


# ---------------------------------------------------------------------------------------------- main
def _group(i: int, s: Shape, fp8: bool) -> list[Tensor]:
    """Shard i's tensors: 0 is embeddings / norm / head, i >= 1 is decoder layer i - 1."""
    return head_tensors(s) if i == 0 else layer_tensors(i - 1, s, fp8)


def _write_group(out: Path, i: int, n: int, s: Shape, fp8: bool, seed: int) -> tuple[str, list[str], int]:
    """Write shard i of n (in a worker process with --jobs); returns its name, tensor names and bytes."""
    shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    tensors = _group(i, s, fp8)
    nbytes = write_shard(out / shard, tensors, Values(seed), s)
    return shard, [t.entry.name for t in tensors], nbytes


def generate(out: Path, s: Shape, fp8: bool = True, seed: int = 0, tokenizer: Path | None = None,
             quiet: bool = False, jobs: int = 1) -> dict:
    """Write the checkpoint to `out` (replacing what is there); returns a summary (bytes, shards, seconds).

    `jobs` > 1 writes that many shards at once in worker processes (the values do not depend on it):
    a 16-core GPU host builds a 2-layer checkpoint in the time of one layer."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    token_ids = provide_tokenizer(out, s.vocab, tokenizer)
    n = s.layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def done(shard: str, names: list[str], nbytes: int) -> None:
        nonlocal total
        total += nbytes
        weight_map.update(dict.fromkeys(names, shard))
        if not quiet:
            print(f"  {shard}: {(out / shard).stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, n)) as pool:
            for result in pool.map(_write_group, *zip(*[(out, i, n, s, fp8, seed) for i in range(n)], strict=True)):
                done(*result)
    else:
        for i in range(n):
            done(*_write_group(out, i, n, s, fp8, seed))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(hub_config(s, fp8, token_ids), indent=2) + "\n")
    gen = {k: v for k, v in (("bos_token_id", token_ids["bos"]), ("eos_token_id", token_ids["eos"]),
                             ("pad_token_id", token_ids["pad"])) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"bytes": size, "shards": n, "seconds": time.perf_counter() - t0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="minimax-m2", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per layer (preset: 256)")
    p.add_argument("--vocab", type=int, default=8192,
                   help="vocabulary (default 8192, cut from the hub's 200064 to keep embeddings small)")
    p.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8",
                   help="fp8: hub FP8 block-scaled layout (default); bf16: plain bf16 linears")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="directory with tokenizer.json to copy")
    p.add_argument("--jobs", type=int, default=1, help="shards written in parallel (worker processes)")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("shape overrides (scaled-down checkpoints for tests)")
    for flag in ("hidden", "intermediate", "heads", "kv-heads", "head-dim", "rotary-dim", "top-k"):
        g.add_argument(f"--{flag}", type=int, default=None)
    return p.parse_args(argv)


def shape_from(args: argparse.Namespace) -> Shape:
    base = dict(PRESETS[args.preset])
    for key in ("experts", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "rotary_dim", "top_k"):
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    base["rotary_dim"] = min(base["rotary_dim"], base["head_dim"])
    base["top_k"] = min(base["top_k"], base["experts"])
    return Shape(layers=args.layers, vocab=args.vocab, **base)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = shape_from(args)
    if not args.quiet:
        print(f"writing {args.out}: {s.layers} layers x {s.experts} experts, hidden {s.hidden}, intermediate "
              f"{s.intermediate}, {s.heads}/{s.kv_heads} heads of {s.head_dim}, vocab {s.vocab}, {args.dtype}",
              flush=True)
    info = generate(args.out, s, fp8=args.dtype == "fp8", seed=args.seed, tokenizer=args.tokenizer,
                    quiet=args.quiet, jobs=args.jobs)
    print(f"{args.out}: {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards, {info['seconds']:.1f} s")


if __name__ == "__main__":
    main()
