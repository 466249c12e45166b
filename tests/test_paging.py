"""Routed experts paged in chunks over captured groups of tokens give bit for bit what the one-chunk path
gives: saliency (every statistic, the expert output sums, every kept hidden state), eval losses and
fidelity figures, for every family the tests can build (bf16/fp32 and FP8, an MTP layer, the shared
trained fixtures). Also: `--memory-budget` refuses bad sizes in one line, a budget too small for one
expert is refused in one line, a small real budget chunks a layer and says so in the manifest, and
the CPU FP8 fast dequantisation equals `fp8.dequantize` for every e4m3 code.

Paging is forced with SURGERY_EXPERTS_PER_CHUNK / SURGERY_TOKENS_PER_GROUP (read by `EngineOptions`,
which Calibrator, Evaluator and run_fidelity build themselves); a spy on the engine's token grouping
proves the capture / stream / replay path ran with more than one group.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.arch.table import TABLE
from surgery.errors import SurgeryError
from surgery.executor import plan_memory
from surgery.executor.budget import MARGIN_FRACTION, MARGIN_MIN, rss_anon
from surgery.executor.cache import HiddenCache
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from surgery.synth import TINY
from tests.oracle import make_batch

LENGTHS = [17, 5, 11, 17, 2, 9, 13]  # batch size 3: batches of 3x17, 3x17 and 1x13 positions
# (experts per chunk, tokens per group): 3 groups of one batch each, chunks 3+3+2 (the last one short);
# 2 groups (the second holds two batches), chunks 5+3; one expert per chunk, one batch per group
PAGED = [(3, 40), (5, 70), (1, 1)]
ENV = ("SURGERY_EXPERTS_PER_CHUNK", "SURGERY_TOKENS_PER_GROUP")

FAMILIES = [spec.family for spec in TABLE if spec.family in TINY]
FP8_FAMILIES = ["minimax_m2", "glm4_moe", "qwen3_moe", "deepseek_v3"]
MODELS = [*FAMILIES, *(f"{f}-fp8" for f in FP8_FAMILIES), "glm4_moe-mtp", "shared:tinymoe-m2",
          "shared:tinymoe-m2-fp8"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on shared cores: one intra-op thread is ~10x faster than spinning two (both paths
    of every comparison run under the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_table_family_is_covered():
    assert len(FAMILIES) == len(TABLE) >= 9, sorted(set(s.family for s in TABLE) - set(FAMILIES))


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="session")
def model_of(tiny_checkpoint, tmp_path_factory, request):
    """`model_of(name)` -> checkpoint directory: a family's tiny checkpoint, `<family>-fp8` (24x24 blocks,
    partial edge blocks), `glm4_moe-mtp` (an MTP layer past the last decoder layer), `shared:<name>`."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name.startswith("shared:"):
                built[name] = request.getfixturevalue("shared_fixtures") / name.removeprefix("shared:")
            elif name == "glm4_moe-mtp":
                from tests.test_arch_coverage import with_mtp_layer

                built[name], _ = with_mtp_layer(tiny_checkpoint("glm4_moe"), tmp_path_factory.mktemp("mtp") / "m")
            elif name.endswith("-fp8"):
                built[name] = tiny_checkpoint(name.removesuffix("-fp8"), fp8=True)
            else:
                built[name] = tiny_checkpoint(name)
        return built[name]

    return get


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def num_experts_of(model_dir: Path) -> int:
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint

    with Checkpoint(model_dir) as ckpt:
        return MoEModel(ckpt).num_experts


def set_paging(monkeypatch, per_chunk: int | None, group: int | None) -> None:
    for key, value in zip(ENV, (per_chunk, group), strict=True):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))


@pytest.fixture
def groups(monkeypatch) -> list[int]:
    """The number of captured token groups of every paged MoE layer, as the engine forms them."""
    seen: list[int] = []
    real = plan_memory.groups

    def spy(batches, mask, tokens):
        out = real(batches, mask, tokens)
        seen.append(len(out))
        return out

    monkeypatch.setattr(plan_memory, "groups", spy)
    return seen


def tokens_for(model_dir: Path, seed: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(config_of(model_dir)["vocab_size"], LENGTHS, seed=seed)


def calibrate(model_dir: Path, work: Path, routing: str = "model", keep_hidden: bool = True,
              memory_budget: int | None = None) -> tuple[dict, dict]:
    ids, mask = tokens_for(model_dir)
    opts = CalibrateOptions(batch_size=3, dtype="float32", device="cpu", routing=routing, keep_hidden=keep_hidden,
                            progress=False, memory_budget=memory_budget)
    inputs = CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"t": "0"}, {"n": len(ids)})
    calibrator = Calibrator(model_dir, work, opts)
    saliency = calibrator.run(inputs)
    return saliency, calibrator.summary


def canonical(obj) -> str:
    """Exact text of a JSON value (every float by its repr, NaN and inf included)."""
    return json.dumps(obj, sort_keys=True)


def assert_same_stats_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "stats").iterdir())
    assert names == sorted(p.name for p in (b / "stats").iterdir())
    assert any(n.endswith(".outputs.npy") for n in names) and any(n.endswith(".json") for n in names)
    for name in names:
        if name.endswith(".npy"):
            x, y = np.load(a / "stats" / name), np.load(b / "stats" / name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.any(x != 0), name
            assert x.tobytes() == y.tobytes(), f"{name}: expert output sums differ when paged"
        else:
            assert json.loads((a / "stats" / name).read_text()) is not None
            assert canonical(json.loads((a / "stats" / name).read_text())) == canonical(
                json.loads((b / "stats" / name).read_text())), name


def assert_same_hidden(a: Path, b: Path, rows: int) -> None:
    ca, cb = HiddenCache(a / "cache.zarr"), HiddenCache(b / "cache.zarr")
    layers = ca.hidden_layers()
    assert layers == cb.hidden_layers() and len(layers) > 1
    for layer in layers:
        x, y = HiddenCache.read_rows(ca.hidden(layer), 0, rows), HiddenCache.read_rows(cb.hidden(layer), 0, rows)
        assert torch.equal(x, y), f"hidden_{layer} differs when paged"


# ---------------------------------------------------------------------------------------------- calibrate
@pytest.mark.parametrize("name", MODELS)
def test_paged_calibration_is_bit_identical(name, model_of, monkeypatch, groups, tmp_path):
    """Saliency, expert output sums and every layer's hidden states, one chunk vs three forced pagings."""
    model_dir = model_of(name)
    num = num_experts_of(model_dir)
    set_paging(monkeypatch, None, None)
    ref, ref_summary = calibrate(model_dir, tmp_path / "one")
    moe_layers = sorted(ref_summary["experts_per_chunk"], key=int)
    assert moe_layers and all(ref_summary["experts_per_chunk"][k] == num for k in moe_layers)  # one chunk
    assert set(ref["layers"]) <= set(moe_layers) and not groups  # not paged
    for layer, stats in ref["layers"].items():
        assert sum(stats["frequency"]) > 0 and any(v > 0 for v in stats["reap"]), layer
    for per_chunk, group in PAGED:
        set_paging(monkeypatch, per_chunk, group)
        groups.clear()
        work = tmp_path / f"paged-{per_chunk}-{group}"
        got, summary = calibrate(model_dir, work)
        assert summary["experts_per_chunk"] == dict.fromkeys(moe_layers, per_chunk)
        assert len(groups) == len(moe_layers) and min(groups) > 1, groups
        assert got["num_tokens"] == ref["num_tokens"]
        assert canonical(got["layers"]) == canonical(ref["layers"]), (per_chunk, group)
        assert_same_stats_files(tmp_path / "one", work)
        assert_same_hidden(tmp_path / "one", work, len(LENGTHS))


@pytest.mark.parametrize("name", ["minimax_m2", "gpt_oss", "glm4_moe-mtp"])
def test_paged_replay_runs_no_attention(name, model_of, monkeypatch, tmp_path):
    """A paged layer's second run is its second half only (h + moe(norm(h)), surgery.executor.residual):
    attention runs once per batch and MoE layer, where replaying the whole layer ran it twice, and the
    statistics are the same either way (and equal one chunk's: test above)."""
    from surgery.arch.layer import LayerFactory

    calls: list[str] = []

    def count(module, args, out) -> None:
        if type(module).__name__.endswith("Attention"):
            calls.append(type(module).__name__)

    model_dir = model_of(name)
    set_paging(monkeypatch, 3, 40)
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        short, summary = calibrate(model_dir, tmp_path / "short", keep_hidden=False)
        once = len(calls)
        calls.clear()
        monkeypatch.setattr(LayerFactory, "moe_norm", lambda self, module: None)
        whole, _ = calibrate(model_dir, tmp_path / "whole", keep_hidden=False)
    finally:
        handle.remove()
    batches = -(-len(LENGTHS) // 3)
    moe_layers = len(summary["experts_per_chunk"])
    assert once > 0 and len(calls) - once == moe_layers * batches, (once, len(calls))
    assert canonical(short["layers"]) == canonical(whole["layers"])


@pytest.mark.parametrize("name", ["minimax_m2-fp8", "glm4_moe", "gpt_oss"])
def test_paged_reference_routing_is_bit_identical(name, model_of, monkeypatch, groups, tmp_path):
    """Reference routing (the observer re-routes from the router's logits in each batch's capture)."""
    model_dir = model_of(name)
    set_paging(monkeypatch, None, None)
    ref, _ = calibrate(model_dir, tmp_path / "one", routing="reference", keep_hidden=False)
    model, _ = calibrate(model_dir, tmp_path / "model", routing="model", keep_hidden=False)
    set_paging(monkeypatch, 3, 40)
    got, _ = calibrate(model_dir, tmp_path / "paged", routing="reference", keep_hidden=False)
    assert groups and min(groups) > 1
    assert canonical(got["layers"]) == canonical(ref["layers"])
    assert_same_stats_files(tmp_path / "one", tmp_path / "paged")
    if name != "gpt_oss":  # gpt-oss's router is the reference rule (softmax over the top-k logits)
        assert canonical(ref["layers"]) != canonical(model["layers"])  # the routing did change the statistics


# ---------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("name", ["minimax_m2-fp8", "deepseek_v3", "gpt_oss", "shared:tinymoe-m2-fp8"])
def test_paged_eval_loss_is_bit_identical(name, model_of, monkeypatch, groups, tmp_path):
    from surgery.eval import EvalInputs, EvalOptions, Evaluator, ModelRef

    model_dir = model_of(name)
    ids, mask = tokens_for(model_dir, seed=32)
    rows = {"first": (0, 4), "second": (4, 7)}
    inputs = EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), rows, {k: f"h-{k}" for k in rows},
                        {"n": len(ids)})

    def evaluate(work: Path) -> dict:
        opts = EvalOptions(batch_size=3, device="cpu", dtype="float32", progress=False)
        return Evaluator(work, opts).run([ModelRef("m", model_dir)], inputs)["datasets"]

    set_paging(monkeypatch, None, None)
    ref = evaluate(tmp_path / "one")
    assert not groups
    for per_chunk, group in PAGED[:2]:
        set_paging(monkeypatch, per_chunk, group)
        groups.clear()
        got = evaluate(tmp_path / f"paged-{per_chunk}")
        assert groups and min(groups) > 1
        assert canonical(got) == canonical(ref), (per_chunk, group)
    for spec in rows:
        assert ref[spec]["m"]["tokens"] > 0 and 0 < ref[spec]["m"]["loss"] < 50


# ---------------------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("name,keep_hidden", [
    ("minimax_m2-fp8", False), ("minimax_m2-fp8", True), ("shared:tinymoe-m2-fp8", False), ("qwen3_moe", False),
    ("qwen3_moe", True), ("glm4_moe", True), ("mixtral", False), ("deepseek_v3", False),
    ("ernie4_5_moe", False), ("gpt_oss", False),
])
def test_paged_fidelity_is_bit_identical(name, keep_hidden, model_of, monkeypatch, groups, tmp_path):
    """run_fidelity on one calibration (hidden states kept, or streamed), one chunk vs paged."""
    from surgery.eval.fidelity import run_fidelity

    model_dir = model_of(name)
    work = tmp_path / "w"
    set_paging(monkeypatch, None, None)
    calibrate(model_dir, work, keep_hidden=keep_hidden)
    methods, ratios = ["reap", "frequency", "random"], [0.25, 0.5]
    ref = run_fidelity(work, methods, ratios, device="cpu", progress=False)
    assert ref["hidden_source"] == ("kept" if keep_hidden else "streamed")
    for per_chunk, group in PAGED[:2]:
        set_paging(monkeypatch, per_chunk, group)
        groups.clear()
        got = run_fidelity(work, methods, ratios, device="cpu", progress=False)
        assert groups and min(groups) > 1
        assert canonical(got) == canonical(ref), (per_chunk, group)
    for layer, per in ref["layers"].items():
        for m in methods:
            assert 0 < per[m]["0.25"] and 0.01 < per[m]["0.5"], (layer, m)


# ---------------------------------------------------------------------------------------------- --memory-budget
def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`surgery ARGS` in-process through the real entry point; an exception escaping it is what the
    console script would print as a traceback (exit 1)."""
    from surgery.cli import main

    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    capsys.readouterr()  # drop what came before (a fixture building a checkpoint)
    code, crash = 0, ""
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - the console script would show a traceback
        code, crash = 1, f"Traceback (most recent call last): {type(exc).__name__}: {exc}"
    out = capsys.readouterr()
    return code, out.out, out.err + crash


def command_args(command: str, model_dir: Path, tmp: Path) -> list[str]:
    return {
        "calibrate": ["calibrate", str(model_dir), "--work", str(tmp / "work"), "--device", "cpu", "--no-progress"],
        "prune": ["prune", str(model_dir), "--out", str(tmp / "out"), "--work", str(tmp / "work"), "--device", "cpu",
                  "--no-progress"],
        "eval": ["eval", str(model_dir), "--work", str(tmp / "work"), "--device", "cpu", "--no-progress"],
        "fidelity": ["fidelity", str(tmp / "work"), "--device", "cpu", "--no-progress"],
    }[command]


@pytest.mark.parametrize("value", ["abc", "-1GB", "0", "12XB", "1e999"])
@pytest.mark.parametrize("command", ["calibrate", "prune", "eval", "fidelity"])
def test_bad_memory_budget_is_one_line_exit_2(command, value, model_of, monkeypatch, capsys, tmp_path):
    args = command_args(command, model_of("mixtral"), tmp_path)
    for form in (["--memory-budget", value], [f"--memory-budget={value}"]):
        code, _, err = run_cli(monkeypatch, capsys, *args, *form)
        lines = err.strip().splitlines()
        assert code == 2, (form, code, err[-600:])
        assert len(lines) == 1 and "Traceback" not in err, err[-600:]
        assert repr(value) in lines[0] and "memory size" in lines[0], lines[0]
        assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # refused before any work


def test_bad_memory_budget_from_the_environment(model_of, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SURGERY_MEMORY_BUDGET", "12XB")
    code, _, err = run_cli(monkeypatch, capsys, *command_args("calibrate", model_of("mixtral"), tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'12XB'" in err, err[-600:]


def test_memory_budget_sizes_parse():
    from surgery.executor.budget import parse_size

    assert parse_size("450MB") == 450_000_000 and parse_size("3.5GiB") == int(3.5 * 2**30)
    assert parse_size("2e9B") == 2_000_000_000 and parse_size("4") == 4_000_000_000 and parse_size(None) is None
    assert parse_size(" 1 kib ") == 1024


def refusal(exc_text: str) -> int:
    """The bytes the refusal says are needed: the budget it names ('raise --memory-budget to at least N
    MB'), else what it says one expert needs ('needs N MB')."""
    m = re.search(r"to at least (\d+(?:\.\d+)?) ?([MG])B", exc_text) or \
        re.search(r"needs?(?: at least)? (\d+(?:\.\d+)?) ?([MG])B", exc_text)
    assert m, exc_text
    return int(float(m.group(1)) * (10**6 if m.group(2) == "M" else 10**9))


@pytest.mark.parametrize("runner", ["calibrate", "eval", "fidelity"])
def test_budget_below_one_expert_is_refused(runner, model_of, monkeypatch, tmp_path):
    """1 MB leaves nothing for even one expert beside what the process holds: a SurgeryError naming the
    checkpoint, what the budget leaves and what one expert needs, and how to fix it."""
    model_dir = model_of("mixtral")
    set_paging(monkeypatch, None, None)
    with pytest.raises(SurgeryError) as info:
        if runner == "calibrate":
            calibrate(model_dir, tmp_path / "w", memory_budget=10**6)
        elif runner == "eval":
            from surgery.eval import EvalInputs, EvalOptions, Evaluator, ModelRef

            ids, mask = tokens_for(model_dir)
            inputs = EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"a": (0, 7)}, {"a": "h"}, {"n": 7})
            opts = EvalOptions(batch_size=3, device="cpu", dtype="float32", progress=False, memory_budget=10**6)
            Evaluator(tmp_path / "w", opts).run([ModelRef("m", model_dir)], inputs)
        else:
            from surgery.eval.fidelity import run_fidelity

            calibrate(model_dir, tmp_path / "w", keep_hidden=False)
            run_fidelity(tmp_path / "w", ["reap"], [0.5], device="cpu", progress=False, memory_budget=10**6)
    text = str(info.value)
    assert "\n" not in text and str(model_dir) in text, text
    assert "memory budget" in text and "--memory-budget" in text, text
    refusal(text)


def test_budget_below_one_expert_cli(shared_fixtures, monkeypatch, capsys, tmp_path):
    """The command line prints that refusal as one line and exits 2; the same work directory then
    calibrates with no budget."""
    data = str(shared_fixtures / "text" / "code.calib.jsonl")
    args = ["calibrate", str(shared_fixtures / "tinymoe-m2"), "--work", str(tmp_path / "w"), "--dataset", data,
            "--samples", "3", "--max-length", "24", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--memory-budget", "1MB")
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err[-800:]
    assert lines[-1].startswith("surgery: error: ") and "raise --memory-budget" in lines[-1], err[-800:]
    assert refusal(lines[-1]) > 0 and not any("error" in line for line in lines[:-1]), lines
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err[-800:]
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["complete"] is True


def test_budget_refusal_names_a_size_that_would_do(model_of, monkeypatch, tmp_path):
    """Raising --memory-budget to the size the refusal names as needed must be able to help: that size
    is at least what the process already holds (the budget bounds the whole process's anonymous
    memory), else the same refusal comes back at the named size."""
    model_dir = model_of("mixtral")
    set_paging(monkeypatch, None, None)
    with pytest.raises(SurgeryError) as info:
        calibrate(model_dir, tmp_path / "w", memory_budget=10**6)
    held = rss_anon()
    assert refusal(str(info.value)) >= held, (f"process holds {held / 1e6:.0f} MB; refusal: {info.value}")


# ---------------------------------------------------------------------------------------------- a real budget
def budget_leaving(free: int) -> int:
    """A --memory-budget under which `MemoryBudget.host_free()` is about `free` bytes right now (after
    collecting what earlier runs left to the garbage collector and handing freed heap back, so that
    it is not freed in the middle of the run, which would leave it more than `free`)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    held = rss_anon()
    total = int((held + free) / (1 - MARGIN_FRACTION))
    if int(MARGIN_FRACTION * total) < MARGIN_MIN:
        total = held + free + MARGIN_MIN
    return total


def test_small_budget_pages_and_records_chunks(tiny_checkpoint, monkeypatch, tmp_path):
    """Mixtral with 3 MB float32 experts (8 per layer: 25 MB, 75 MB with staging): a budget leaving
    ~45 MB beside what the process holds pages at least one layer in chunks of fewer than 8 experts;
    the manifest's summary records experts_per_chunk for every MoE layer, the saliency equals the
    unbudgeted run's bit for bit, and the sampled peak stays within the budget."""
    model_dir = tiny_checkpoint("mixtral", intermediate_size=4096, max_shard_size="20MB")
    set_paging(monkeypatch, None, None)
    ref, ref_summary = calibrate(model_dir, tmp_path / "ref", keep_hidden=False)  # also warms imports up
    assert ref_summary["experts_per_chunk"] == {"0": 8, "1": 8, "2": 8} and not ref_summary["memory_budget_given"]
    budget = budget_leaving(45 * 10**6)
    got, summary = calibrate(model_dir, tmp_path / "w", keep_hidden=False, memory_budget=budget)
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    chunks = manifest["summary"]["experts_per_chunk"]
    assert chunks == summary["experts_per_chunk"]
    assert sorted(chunks, key=int) == ["0", "1", "2"] and all(1 <= n <= 8 for n in chunks.values())
    assert min(chunks.values()) < 8, (chunks, budget)
    assert manifest["summary"]["memory_budget_given"] is True
    assert manifest["summary"]["memory_budget_mb"] == pytest.approx(budget / 2**20)
    assert summary["peak_anon_mb"] <= summary["memory_budget_mb"]
    assert canonical(got["layers"]) == canonical(ref["layers"])
    assert_same_stats_files(tmp_path / "ref", tmp_path / "w")


# ---------------------------------------------------------------------------------------------- FP8 dequantisation
def all_codes(rows: int, cols: int, nan: bool, seed: int) -> torch.Tensor:
    """A [rows, cols] float8_e4m3fn tensor holding every code (all 256, or all but the NaNs 0x7f/0xff)
    at least once when it has room, the rest random codes of the same set."""
    codes = torch.arange(256, dtype=torch.int64)
    if not nan:
        codes = codes[(codes & 0x7F) != 0x7F]
    n = rows * cols
    g = torch.Generator().manual_seed(seed)
    picks = codes[torch.randint(0, len(codes), (n,), generator=g)]
    k = min(n, len(codes))
    picks[torch.randperm(n, generator=g)[:k]] = codes[torch.randperm(len(codes), generator=g)[:k]]
    return picks.to(torch.uint8).view(torch.float8_e4m3fn).reshape(rows, cols)


SCALES = {  # fast path (|scale| < 2^7) and the generic one (>= 2^7)
    "tiny": lambda s: torch.full(s, 2.0 ** -20), "denormal": lambda s: torch.full(s, 1e-40),
    "per-block": lambda s: torch.rand(s, generator=torch.Generator().manual_seed(5)) / 448 + 1e-6,
    "127.9": lambda s: torch.full(s, 127.9), "mixed-sign": lambda s: torch.linspace(-3.0, 3.0, s[0] * s[1]).view(s),
    "128": lambda s: torch.full(s, 128.0), "large": lambda s: torch.full(s, 2.0 ** 100),
}
SHAPES = [((300, 260), (128, 128)), ((7, 5), (2, 3)), ((16, 16), (4, 8)), ((5, 3), (128, 128)),
          ((256, 260), (128, 128)), ((300, 256), (128, 128))]


def assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, what) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan), what
    ints = torch.int32 if ref.dtype == torch.float32 else torch.int16
    g, r = got.view(ints)[~nan], ref.view(ints)[~nan]
    bad = (g != r).nonzero()
    assert not bad.numel(), f"{what}: {bad.numel()} values differ, e.g. {got[~nan][bad[0]]} vs {ref[~nan][bad[0]]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_kind", list(SCALES))
@pytest.mark.parametrize("nan", [False, True])
def test_dequantize_into_equals_reference(nan, scale_kind, dtype):
    from surgery.checkpoint.fp8 import dequantize
    from surgery.executor import dequantize as experts

    for i, (shape, block) in enumerate(SHAPES):
        weight = all_codes(*shape, nan=nan, seed=i)
        if shape[0] * shape[1] >= 256:
            assert len(set(weight.view(torch.uint8).flatten().tolist())) == (256 if nan else 254)
        scale_shape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        scale = SCALES[scale_kind](scale_shape).float()
        has_nan = bool(((weight.view(torch.uint8) & 0x7F) == 0x7F).any())
        assert has_nan == (nan and shape[0] * shape[1] >= 256) or (nan and shape[0] * shape[1] < 256)
        fast = experts._fast_e4m3(weight, scale)
        assert fast == (not has_nan and scale_kind not in ("128", "large")), "fast path taken where it should (not) be"
        buf = torch.full((2, shape[0] + 3, shape[1]), float("nan"), dtype=dtype)
        dst = buf[1, 2:2 + shape[0]]  # a row slice of a fused buffer, as materialize fills it
        experts.dequantize_into(dst, weight, scale, block)
        ref = dequantize(weight, scale, block, dtype)
        assert_bits_equal(dst, ref, (shape, block, scale_kind, dtype))
        assert torch.isnan(buf[0]).all() and torch.isnan(buf[1, :2]).all() and torch.isnan(buf[1, 2 + shape[0]:]).all()
        if not nan:
            assert torch.isfinite(ref).all() or scale_kind == "large"


def test_dequantize_into_every_code_value():
    """Scale 1, one block: each code's value itself (the fast path's bit trick against torch's own
    float8 -> float32 conversion), ±0 kept apart, NaN codes NaN."""
    from surgery.executor.dequantize import dequantize_into

    weight = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    for codes in (weight, weight.clone().view(torch.uint8).masked_fill_((weight.view(torch.uint8) & 0x7F) == 0x7F, 0)
                  .view(torch.float8_e4m3fn)):
        dst = torch.empty(16, 16)
        dequantize_into(dst, codes, torch.ones(1, 1), (16, 16))
        assert_bits_equal(dst, codes.float(), "scale 1")
    dst = torch.empty(16, 16)
    dequantize_into(dst, weight, torch.ones(1, 1), (16, 16))
    assert torch.isnan(dst.flatten()[[0x7F, 0xFF]]).all() and torch.isnan(dst).sum() == 2
    assert dst.flatten()[0x7E] == 448 and dst.flatten()[0xFE] == -448 and dst.flatten()[1] == 2.0 ** -9
    assert dst.flatten()[0x80].item() == 0 and torch.signbit(dst.flatten()[0x80])
