"""The project's own pruning-quality table on the shared trained fixture (docs/quality.md).

On `tinymoe-m2` (MiniMax-M2 architecture, trained on code, prose and tool calls), measure the mean
next-token loss on held-out code / prose / tools text after pruning 25% and 50% of the experts of
every MoE layer by each method (reap, frequency, ean, random), by REAP with super-expert protection
(`--protect super`) and by expert merging (`--method merge`, REAP's kept experts), calibrated on code
only and on a mix of the three domains, with the streaming pieces end to end:

    Calibrator (saliency) -> make_plan -> rewrite_checkpoint (a real pruned checkpoint) -> Evaluator

Then W4A16 (group 128) of each REAP checkpoint (0.25 and 0.5, both calibrations): RTN, and GPTQ and
autoround (AutoRound's tuned SignRound, its defaults: 200 steps of 8 windows per layer) calibrated on
exactly the calibration windows of the REAP row it follows (passed as pre-tokenised
`CalibrationInputs` to `surgery.quant.pipeline.quantize(..., inputs=...)`: `DataOptions` samples
documents and cannot express "the first N windows in file order"); each quantization runs in a fresh
(spawned) process so its wall time and peak RSS are its own; the W4A16 checkpoint itself is evaluated
(the engine decodes the packed weights).

Text layout, as the fixture README describes: each jsonl file's documents in file order, tokenised
without special tokens and joined with the end-of-text token (id 0), cut into 512-token windows.
Evaluation: the first 32,768 tokens of each `text/*.eval.jsonl` (64 windows per domain), float32.
Calibration: 32 windows (16,384 tokens) either all from code.calib.jsonl, or 11 + 11 + 10 windows
from code, prose and tools .calib.jsonl (the same token budget, so only the mix differs).

    .venv/bin/python tools/quality_table.py [--out docs/quality.md] [--work DIR]

About 30 minutes on 2 CPU cores, plus several per autoround row; the evaluation is resumable (rerun
with the same --work: finished rows, W4A16 ones included with their run's time and memory, are not
measured again). A protected plan that
keeps exactly REAP's experts is not evaluated again (same checkpoint, same losses).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.arch.model import MoEModel  # noqa: E402
from surgery.checkpoint.reader import Checkpoint  # noqa: E402
from surgery.eval.loss import EvalInputs, EvalOptions, Evaluator, ModelRef  # noqa: E402
from surgery.jsonio import write_json_atomic  # noqa: E402
from surgery.plan import make_plan, plan_hash  # noqa: E402
from surgery.plan.merge import outputs_loader  # noqa: E402
from surgery.rewrite import rewrite_checkpoint  # noqa: E402
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
WINDOW = 512
EVAL_TOKENS = 32_768
DOMAINS = ("code", "prose", "tools")
METHODS = ("reap", "frequency", "ean", "random")
RATIOS = (0.25, 0.5)
CALIBRATIONS = {"code": {"code": 32}, "mixed": {"code": 11, "prose": 11, "tools": 10}}
VARIANTS = ("reap-protect", "merge")  # REAP + --protect super, and --method merge (REAP's kept experts)
QUANT = ("rtn", "gptq", "autoround")  # W4A16 of each REAP checkpoint
CALIBRATED = ("gptq", "autoround")
GROUP = 128
EOT = 0
# The fixture README's figures (in-memory pruning, code-only calibration), to print beside ours.
README_BASE = {"code": 2.585, "prose": 1.615, "tools": 0.148}
README_PRUNED = {
    ("reap", 0.25): (2.821, 2.186, 0.628), ("frequency", 0.25): (2.800, 2.637, 2.229),
    ("ean", 0.25): (2.789, 2.395, 2.380), ("random", 0.25): (3.048, 2.329, 0.546),
    ("reap", 0.5): (3.329, 3.123, 2.096), ("frequency", 0.5): (3.850, 4.571, 4.342),
    ("ean", 0.5): (3.563, 4.302, 4.012), ("random", 0.5): (4.865, 3.416, 2.014),
}


def windows(path: Path, tokenizer, n_windows: int) -> np.ndarray:
    """The first n_windows * 512 tokens of a jsonl file (documents joined by end-of-text), [n, 512]."""
    need = n_windows * WINDOW
    ids: list[int] = []
    with open(path) as f:
        for line in f:
            if len(ids) >= need:
                break
            if ids:
                ids.append(EOT)
            ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
    if len(ids) < need:
        raise SystemExit(f"{path}: only {len(ids)} tokens, need {need}")
    return np.asarray(ids[:need], dtype=np.int64).reshape(n_windows, WINDOW)


def _quantize_run(model_dir: str, out: str, method: str, work: str, inputs, batch_size: int) -> dict:
    """One W4A16 quantization, in a fresh process: its wall time (the `quantize` call) and peak RSS
    (imports included, as a `surgery quantize` process would have) are this run's alone. Peak RSS is
    VmHWM, this process image's own high-water mark: getrusage's ru_maxrss survives execve, so a spawned
    child would report the parent's size at the fork."""
    from surgery.quant.pipeline import quantize
    from surgery.quant.signround import SignRoundOptions

    extra = {"tuning": SignRoundOptions()} if method == "autoround" else {}  # AutoRound's defaults (8 rows a step)
    t = time.perf_counter()
    summary = quantize(Path(model_dir), Path(out), method=method, group_size=GROUP, work=Path(work),
                       inputs=inputs, batch_size=batch_size, device="cpu", dtype="float32", progress=False,
                       partial_groups="pad", **extra)  # the fixture's hidden 192: AutoRound's padded partial group
    return {"seconds": time.perf_counter() - t,
            "peak_rss_mb": _vm_hwm_mb(),
            "rtn_fallback": int(summary.get("rtn_fallback", 0)), "output_bytes": int(summary["output_bytes"]),
            "load": os.getloadavg()[0]}


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status (peak RSS of a quantization needs Linux)")


def quantize_in_child(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_quantize_run, *args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=FIXTURES / "tinymoe-m2")
    ap.add_argument("--text", type=Path, default=FIXTURES / "text")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    ap.add_argument("--work", type=Path, default=None, help="Work directory (default: a temporary one, removed).")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    per_domain = EVAL_TOKENS // WINDOW
    eval_ids = np.concatenate([windows(args.text / f"{d}.eval.jsonl", tok, per_domain) for d in DOMAINS])
    rows = {d: (i * per_domain, (i + 1) * per_domain) for i, d in enumerate(DOMAINS)}
    inputs = EvalInputs(eval_ids, np.ones_like(eval_ids, dtype=np.uint8), rows,
                        {d: f"first {EVAL_TOKENS} tokens of {d}.eval.jsonl" for d in DOMAINS},
                        {"window": WINDOW, "eot": EOT})
    evaluator = Evaluator(work / "eval", EvalOptions(batch_size=args.batch_size, device="cpu", dtype="float32",
                                                     progress=False))
    # Finished rows survive an interruption: results.json maps a row to the plan it was measured for.
    done_path = work / "results.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    results: dict[str, dict] = {}
    details: dict[str, dict] = {}  # per variant row: what protection / merging did
    runs: dict[str, dict] = {}  # per W4A16 row: the quantization's time, peak RSS, RTN fallbacks
    reused = 0

    def evaluate(name: str, directory: Path) -> dict:
        out = evaluator.run([ModelRef(name, directory)], inputs)
        results[name] = {d: out["datasets"][d][name]["loss"] for d in DOMAINS}
        print(f"{time.perf_counter() - t0:6.0f}s  {name:24s} "
              + "  ".join(f"{d} {results[name][d]:.3f}" for d in DOMAINS), flush=True)
        return results[name]

    def pruned_row(name: str, plan: dict) -> None:
        """Row `name`: `plan` rewritten and evaluated, or its losses from an earlier run of the same plan."""
        nonlocal reused
        phash = plan_hash(plan)
        if done.get(name, {}).get("plan") == phash:
            results[name] = done[name]["losses"]
            reused += 1
            return
        out_dir = work / "pruned" / name
        shutil.rmtree(out_dir, ignore_errors=True)
        rewrite_checkpoint(args.model, plan, out_dir, progress=False)
        evaluate(name, out_dir)
        shutil.rmtree(out_dir)
        done[name] = {"plan": phash, "losses": results[name]}
        write_json_atomic(done_path, done)

    evaluate("base", args.model)
    ckpt = Checkpoint(args.model)
    model = MoEModel(ckpt)
    for calib, mix in CALIBRATIONS.items():
        calib_ids = np.concatenate([windows(args.text / f"{d}.calib.jsonl", tok, n) for d, n in mix.items()])
        cal_inputs = CalibrationInputs(calib_ids, np.ones_like(calib_ids, dtype=np.uint8),
                                       {d: f"first {n} windows" for d, n in mix.items()}, {"window": WINDOW})
        saliency = Calibrator(args.model, work / f"calib-{calib}",
                              CalibrateOptions(batch_size=args.batch_size, device="cpu", dtype="float32",
                                               progress=False)).run(cal_inputs)
        print(f"{time.perf_counter() - t0:6.0f}s  calibrated on {calib} ({calib_ids.size} tokens)", flush=True)
        for method in METHODS:
            for ratio in RATIOS:
                name = f"{method}-{ratio:g}" + ("" if method == "random" else f"-{calib}")
                if name in results:
                    continue  # random ignores the calibration: one model serves both rows
                pruned_row(name, make_plan(saliency, model, method, ratio, seed=0))
        for ratio in RATIOS:
            reap_plan = make_plan(saliency, model, "reap", ratio)
            for variant in VARIANTS:
                name = f"{variant}-{ratio:g}-{calib}"
                if variant == "merge":
                    plan = make_plan(saliency, model, "merge", ratio, outputs=outputs_loader(work / f"calib-{calib}"))
                else:
                    plan = make_plan(saliency, model, "reap", ratio, protect="super")
                details[name] = _describe(plan, reap_plan)
                if variant == "reap-protect" and details[name]["same_as_reap"]:
                    results[name] = results[f"reap-{ratio:g}-{calib}"]  # the same checkpoint: same losses
                    continue
                pruned_row(name, plan)
        calib_hash = hashlib.sha256(calib_ids.tobytes()).hexdigest()[:16]
        for ratio in RATIOS:
            reap = _name("reap", ratio, calib)
            phash = plan_hash(make_plan(saliency, model, "reap", ratio, seed=0))
            pruned = work / "pruned" / reap
            for qm in QUANT:
                name = f"{reap}+{qm}"
                # GPTQ's result also depends on its calibration tokens (the REAP row's windows)
                key = f"{phash}:{qm}:g{GROUP}" + (f":{calib_hash}" if qm in CALIBRATED else "")
                if done.get(name, {}).get("plan") == key:
                    results[name], runs[name] = done[name]["losses"], done[name]["run"]
                    reused += 1
                    continue
                if not (pruned / "config.json").is_file():
                    shutil.rmtree(pruned, ignore_errors=True)
                    rewrite_checkpoint(args.model, make_plan(saliency, model, "reap", ratio, seed=0), pruned,
                                       progress=False)
                qdir, qwork = work / "w4a16" / name, work / "w4a16" / f"{name}.work"
                shutil.rmtree(qdir, ignore_errors=True)
                shutil.rmtree(qwork, ignore_errors=True)
                runs[name] = quantize_in_child(str(pruned), str(qdir), qm, str(qwork), cal_inputs, args.batch_size)
                print(f"{time.perf_counter() - t0:6.0f}s  {name}: W4A16 in {runs[name]['seconds']:.0f} s, peak RSS "
                      f"{runs[name]['peak_rss_mb']:.0f} MB", flush=True)
                evaluate(name, qdir)
                shutil.rmtree(qdir)
                shutil.rmtree(qwork, ignore_errors=True)
                done[name] = {"plan": key, "losses": results[name], "run": runs[name]}
                write_json_atomic(done_path, done)
            shutil.rmtree(pruned, ignore_errors=True)
    ckpt.close()
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timing = {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "reused": reused,
              "rows": len(results), "load": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, timing, details, runs))
    print(f"-> {args.out} ({seconds:.0f} s)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def _describe(plan: dict, reap_plan: dict) -> dict:
    """What a variant's plan did: protected experts and threshold, merged experts, and whether it keeps
    exactly REAP's experts."""
    same = all(plan["layers"][k]["keep"] == reap_plan["layers"][k]["keep"] for k in plan["layers"])
    info: dict = {"same_as_reap": same}
    if "protect" in plan:
        info["threshold"] = plan["protect"]["threshold"]
        info["protected"] = {k: sorted(int(e) for e in v["protected"]) for k, v in plan["layers"].items()
                             if v.get("protected")}
        info["rescued"] = {k: [e for e in ids if e not in reap_plan["layers"][k]["keep"]]
                           for k, ids in info["protected"].items()}
    if plan.get("method") == "merge":
        info["merged"] = sum(len(ds) for v in plan["layers"].values() for ds in v["merge"].values())
        info["dropped"] = sum(len(v["drop"]) for v in plan["layers"].values())
    return info


def _name(method: str, ratio: float, calib: str) -> str:
    return f"{method}-{ratio:g}" + ("" if method == "random" else f"-{calib}")


def _mean(r: dict) -> float:
    return float(np.mean([r[d] for d in DOMAINS]))


def render(results: dict, timing: dict, details: dict, runs: dict) -> str:
    base = results["base"]
    lines = [
        "# Pruning quality on the trained tiny MiniMax-M2 fixture",
        "",
        "Generated by `tools/quality_table.py` (do not edit by hand). Mean next-token loss (nats/token) on the "
        f"first {EVAL_TOKENS:,} tokens of each held-out `text/*.eval.jsonl` of `../shared/fixtures` (documents "
        f"joined with end-of-text id {EOT}, {WINDOW}-token windows, float32), after pruning every MoE layer of "
        "`tinymoe-m2` (32 experts, top-4, 6 layers) with the streaming pipeline: `Calibrator` -> `make_plan` -> "
        "`rewrite_checkpoint` -> `Evaluator`. Each pruned model is a real checkpoint on disk, evaluated layer by "
        "layer.",
        "",
        "Calibration: **code** = 32 windows (16,384 tokens) from `code.calib.jsonl`, as in the fixture README; "
        "**mixed** = 11 + 11 + 10 windows from code, prose and tools `.calib.jsonl` (the same 16,384-token budget, "
        "so only the mix differs). `random` (seed 0) ignores calibration, so it has one row per ratio.",
        "",
        "## Unpruned",
        "",
        "| | code | prose | tools |",
        "|---|---:|---:|---:|",
        "| this table | " + " | ".join(f"{base[d]:.3f}" for d in DOMAINS) + " |",
        "| fixture README | " + " | ".join(f"{README_BASE[d]:.3f}" for d in DOMAINS) + " |",
        "",
        "## Pruned",
        "",
        "README columns: the fixture README's in-memory figures (code-only calibration, its own windows).",
        "",
        "| method | ratio | calibration | code | prose | tools | mean | README code | README prose | README tools |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio in RATIOS:
        for method in METHODS:
            for calib in (("code",) if method == "random" else tuple(CALIBRATIONS)):
                r = results[_name(method, ratio, calib)]
                readme = README_PRUNED[(method, ratio)] if calib == "code" else ("", "", "")
                label = "-" if method == "random" else calib
                lines.append(f"| {method} | {ratio:g} | {label} | " + " | ".join(f"{r[d]:.3f}" for d in DOMAINS)
                             + f" | {_mean(r):.3f} | " + " | ".join(f"{x:.3f}" if x != "" else "" for x in readme)
                             + " |")
    lines += ["", "## Does mixed calibration help out-of-domain loss?", "",
              "Out-of-domain here means prose and tools for the code-only calibration. Change in loss, mixed minus "
              "code-only (negative: mixed is better):", "",
              "| method | ratio | code | prose | tools |", "|---|---:|---:|---:|---:|"]
    better = total = 0
    for ratio in RATIOS:
        for method in METHODS:
            if method == "random":
                continue
            c, m = results[_name(method, ratio, "code")], results[_name(method, ratio, "mixed")]
            lines.append(f"| {method} | {ratio:g} | " + " | ".join(f"{m[d] - c[d]:+.3f}" for d in DOMAINS) + " |")
            for d in ("prose", "tools"):
                total += 1
                better += m[d] < c[d]
    code_cost = [results[_name(me, ra, "mixed")]["code"] - results[_name(me, ra, "code")]["code"]
                 for ra in RATIOS for me in METHODS if me != "random"]
    ood_gain = [results[_name(me, ra, "code")][d] - results[_name(me, ra, "mixed")][d]
                for ra in RATIOS for me in METHODS if me != "random" for d in ("prose", "tools")]
    mean_better = sum(_mean(results[_name(me, ra, "mixed")]) < _mean(results[_name(me, ra, "code")])
                      for ra in RATIOS for me in METHODS if me != "random")
    pairs = len(RATIOS) * (len(METHODS) - 1)
    verdict = ("So yes, clearly: calibrating on the domains the model will serve protects them." if better > total / 2
               else "So no: on this fixture mixing the calibration does not protect the other domains.")
    lines += ["", f"Mixed calibration lowers the out-of-domain loss in {better} of {total} (method, ratio, domain) "
              f"cases, by {np.mean(ood_gain):.3f} nats on average (median {np.median(ood_gain):.3f}). {verdict} "
              f"It is not free: with the same token budget it raises the code loss by {np.mean(code_cost):.3f} nats "
              f"on average (from {min(code_cost):.3f} to {max(code_cost):.3f}): at a fixed expert count the experts "
              f"kept for prose and tools are experts code loses, and code gets a third of the calibration tokens. "
              f"Averaged over the three domains, mixed calibration is better in "
              f"{mean_better} of {pairs} (method, ratio) pairs.", ""]
    lines += ["## Which method", ""]
    for calib in CALIBRATIONS:
        for ratio in RATIOS:
            ranked = sorted((m for m in METHODS), key=lambda m: _mean(results[_name(m, ratio, calib)]))
            lines.append(f"- {calib} calibration, ratio {ratio:g}: by mean loss "
                         + " < ".join(f"{m} ({_mean(results[_name(m, ratio, calib)]):.3f})" for m in ranked))
    lines += _variants_section(results, details)
    lines += _quant_section(results, runs)
    lines += ["", "The streaming evaluator equals transformers' own loss on the same tokens (to 1e-5, "
              "tests/test_eval.py), so the unpruned row is the model's loss on these windows; it differs slightly "
              f"from the README's (prose {base['prose']:.3f} vs {README_BASE['prose']:.3f}), whose windows must be cut "
              "a little differently. The pruned rows are in the README's neighbourhood; the exact kept sets depend on "
              "which tokens calibrate, as the README warns.", ""]
    reuse = f"; {timing['reused']} of {timing['rows']} rows reused from an earlier run" if timing["reused"] else ""
    lines += [f"Run time: {timing['seconds']:.0f} s wall, {timing['cpu_seconds']:.0f} s CPU, on {os.cpu_count()} "
              f"CPU cores ({platform.machine()}), float32, load average {timing['load']:.1f} at the end{reuse}.", ""]
    return "\n".join(lines)


def _variants_section(results: dict, details: dict) -> list[str]:
    """REAP vs REAP + protection (super) vs merge, per ratio and calibration, and what the numbers say."""
    lines = ["", "## Super-expert protection and expert merging", "",
             "Same calibration and evaluation as above. **protect** = REAP with `--protect super` (the reference's "
             "rule: max activation > max(quantile 0.995, max / 10) over all 6 x 32 experts, protected in the first "
             "int(0.75 * 6) = 4 MoE layers); **merge** = `--method merge`: REAP's kept experts, each dropped expert "
             "folded into the kept expert with the most similar mean output (cosine), frequency-weighted average "
             "(docs/plan.md).", "",
             "| ratio | calibration | REAP code | prose | tools | mean | protect code | prose | tools | mean | "
             "merge code | prose | tools | mean |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    merge_wins, merge_domain_wins, protect_changed, protect_wins, pairs = 0, 0, 0, 0, 0
    for ratio in RATIOS:
        for calib in CALIBRATIONS:
            reap = results[_name("reap", ratio, calib)]
            prot = results[f"reap-protect-{ratio:g}-{calib}"]
            merge = results[f"merge-{ratio:g}-{calib}"]
            cells: list[str] = []
            for r in (reap, prot, merge):
                cells += [f"{r[d]:.3f}" for d in DOMAINS] + [f"{_mean(r):.3f}"]
            lines.append(f"| {ratio:g} | {calib} | " + " | ".join(cells) + " |")
            pd, md = details[f"reap-protect-{ratio:g}-{calib}"], details[f"merge-{ratio:g}-{calib}"]
            pairs += 1
            merge_wins += _mean(merge) < _mean(reap)
            merge_domain_wins += sum(merge[d] < reap[d] for d in DOMAINS)
            if not pd["same_as_reap"]:
                protect_changed += 1
                protect_wins += _mean(prot) < _mean(reap)
            protected = "; ".join(f"layer {k}: {v}" for k, v in pd["protected"].items()) or "none"
            rescued = "; ".join(f"layer {k}: {v}" for k, v in pd["rescued"].items() if v) or "none"
            notes.append(f"- ratio {ratio:g}, {calib}: threshold {pd['threshold']:.3f}; protected {protected}; of "
                         f"these REAP alone would drop {rescued}"
                         + (" (same kept experts as REAP: same checkpoint, same losses)" if pd["same_as_reap"] else "")
                         + f"; merge folded {md['merged']} of {md['dropped']} dropped experts into kept ones.")
    lines += ["", "What each variant did:", "", *notes, ""]
    if protect_changed == 0:
        verdict_p = ("Protection changes nothing here: on a model this small the 99.5% quantile sits just under the "
                     "largest max activation, so at most one or two experts qualify, and REAP keeps them anyway. "
                     "It neither helps nor hurts; it is insurance for large models with real super experts.")
    else:
        verdict_p = (f"Protection changed the kept experts in {protect_changed} of {pairs} (ratio, calibration) "
                     f"cases and lowered the mean loss in {protect_wins} of them: "
                     + ("it helps where it acts." if protect_wins * 2 > protect_changed else
                        "it does not reliably help on this model (at most one or two experts qualify, and keeping "
                        "one costs another expert REAP ranked higher)."))
    if merge_wins * 2 > pairs:
        verdict_m = (f"Merging beats pruning on mean loss in {merge_wins} of {pairs} cases ({merge_domain_wins} of "
                     f"{3 * pairs} domain cells); a plausible reason, not tested here, is that folding the dropped "
                     "experts in keeps some of what they did.")
    else:
        verdict_m = (f"Merging does not beat plain pruning: lower mean loss in only {merge_wins} of {pairs} cases "
                     f"({merge_domain_wins} of {3 * pairs} domain cells). Why is not measured here. One hypothesis: "
                     "experts trained apart need not have aligned hidden units, so averaging their weights need not "
                     "average their functions and may blur the kept expert (untested: no permutation alignment was "
                     "tried). The REAP paper also finds pruning ahead of merging on generative tasks, and explains it "
                     "differently: merging takes away the router's independent, input-dependent control of the "
                     "merged experts.")
    lines += [verdict_p, "", verdict_m]
    return lines


def _quant_section(results: dict, runs: dict) -> list[str]:
    """REAP vs REAP + W4A16 by RTN, GPTQ and autoround, what quantization costs, whether GPTQ < RTN and
    whether autoround < GPTQ."""
    lines = ["", "## W4A16 after REAP", "",
             f"Each REAP checkpoint above (0.25 and 0.5, both calibrations) quantized to W4A16 (group {GROUP}, "
             "symmetric 4-bit, AutoRound's packing; docs/quantize.md) by `surgery.quant.pipeline.quantize`: "
             "**RTN** (no data), **GPTQ** calibrated on exactly the REAP row's calibration windows (the same "
             "16,384 tokens: code-only or mixed), sequential within each layer (attention quantized first, the "
             "experts then see the quantized attention's outputs) and across layers, and **AUTOROUND** (AutoRound's "
             "tuned rounding, SignRound, with its defaults: 200 signed-gradient steps of 8 windows per layer, "
             "the layer's output matched to the float model's) on the same windows. Every linear is quantized, "
             "partial groups padded (hidden 192 = 128 + 64), as AutoRound does. The W4A16 checkpoint itself is "
             "evaluated (the layer engine decodes the packed weights), same held-out windows and `Evaluator`. "
             "Δ = loss minus the pruned (bf16) REAP checkpoint's.", "",
             "| ratio | calibration | model | code | prose | tools | mean | Δ code | Δ prose | Δ tools | Δ mean |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cases = [(ratio, calib) for ratio in RATIOS for calib in CALIBRATIONS]
    cost = {qm: [] for qm in QUANT}
    wins = {d: 0 for d in (*DOMAINS, "mean")}
    removed = {d: [] for d in ("code", "tools")}
    losses = []
    order_ok = 0
    for ratio, calib in cases:
        reap = _name("reap", ratio, calib)
        p = results[reap]
        lines.append(f"| {ratio:g} | {calib} | REAP | " + " | ".join(f"{p[d]:.3f}" for d in DOMAINS)
                     + f" | {_mean(p):.3f} | | | | |")
        for qm in QUANT:
            r = results[f"{reap}+{qm}"]
            lines.append(f"| {ratio:g} | {calib} | + W4A16-{qm.upper()} | " + " | ".join(f"{r[d]:.3f}" for d in DOMAINS)
                         + f" | {_mean(r):.3f} | " + " | ".join(f"{r[d] - p[d]:+.3f}" for d in DOMAINS)
                         + f" | {_mean(r) - _mean(p):+.3f} |")
            cost[qm].append(_mean(r) - _mean(p))
        a = results[f"{reap}+autoround"]
        order_ok += _mean(a) < _mean(results[f"{reap}+gptq"]) < _mean(results[f"{reap}+rtn"])
        r, g = results[f"{reap}+rtn"], results[f"{reap}+gptq"]
        for d in DOMAINS:
            wins[d] += g[d] < r[d]
        wins["mean"] += _mean(g) < _mean(r)
        for d in removed:
            if r[d] - p[d] > 1e-3:
                removed[d].append((r[d] - g[d]) / (r[d] - p[d]))
        losses += [f"{d} at {ratio:g}/{calib} ({g[d]:.3f} vs {r[d]:.3f})" for d in ("code", "tools") if g[d] >= r[d]]
    n = len(cases)
    lines += ["", "Quantization runs, each in a fresh process (wall s: the `quantize` call, writing the W4A16 "
              "checkpoint included; peak RSS: the process's high-water mark, importing torch included; "
              f"{os.cpu_count()} CPU cores, float32, batch size 16; autoround 8 rows a step, AutoRound's):", "",
              "| ratio | calibration | method | wall s | peak RSS MB | linears on RTN | W4A16 MB |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for ratio, calib in cases:
        for qm in QUANT:
            run = runs[f"{_name('reap', ratio, calib)}+{qm}"]
            fallback = str(run["rtn_fallback"]) if qm in CALIBRATED else "-"
            lines.append(f"| {ratio:g} | {calib} | {qm.upper()} | {run['seconds']:.1f} | {run['peak_rss_mb']:.0f} | "
                         f"{fallback} | {run['output_bytes'] / 1e6:.1f} |")

    def span(xs: list[float]) -> str:
        return f"{np.mean(xs):+.3f} nats on average (from {min(xs):+.3f} to {max(xs):+.3f})"

    text = (f"What W4A16 costs over the pruned model (mean over the three domains): RTN {span(cost['rtn'])}, "
            f"GPTQ {span(cost['gptq'])}, autoround {span(cost['autoround'])}, across the {n} (ratio, calibration) "
            f"cases. By mean loss autoround < GPTQ < RTN in {order_ok} of {n} cases. GPTQ's loss is below RTN's on "
            f"code in {wins['code']} of {n} cases and on tools in {wins['tools']} of {n} (prose {wins['prose']} of "
            f"{n}, mean {wins['mean']} of {n}). ")
    share = [x for d in removed for x in removed[d]]
    if wins["code"] == n and wins["tools"] == n:
        text += "So yes: GPTQ < RTN on code and on tools in every case."
    elif wins["code"] + wins["tools"] == 0:
        text += "So no: GPTQ is not below RTN on code or on tools in any case here."
    else:
        text += ("So not uniformly: GPTQ is at or above RTN on " + "; ".join(losses) + ".")
    if share:
        text += (f" Of the loss RTN adds on code and tools, GPTQ removes {100 * np.mean(share):.0f}% on average "
                 f"(per cell from {100 * min(share):.0f}% to {100 * max(share):.0f}%; negative: GPTQ adds more).")
    text += (" With code-only calibration, tools (and prose) are outside GPTQ's calibration data as they are outside "
             "REAP's; with mixed calibration GPTQ sees all three domains.")
    lines += ["", text, "", "Linears on RTN: GPTQ's experts with fewer than 256 routed calibration tokens; autoround's "
              "expert weights no calibration token reached (no gradient: their offsets stay 0)."]
    return lines


if __name__ == "__main__":
    main()
