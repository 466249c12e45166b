"""`surgery report WORK`: what calibration found and what pruning will do, for people.

Gathers what WORK holds (saliency.json from calibrate; a plan; fidelity.json from `surgery fidelity`;
eval.json from `surgery eval --work WORK`) into WORK/report.json (the numbers) and WORK/report.md
(the same, readable, with two figures: WORK/report-saliency.png and WORK/report-fidelity.png).
Anything missing is left out and the report says how to produce it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.humanize import layer_ranges
from surgery.jsonio import read_json, write_json_atomic
from surgery.report.plots import fidelity_curves, saliency_heatmap

SALIENCY_METHODS = ("reap", "frequency", "weighted_frequency", "ean", "max_activation")
HEATMAP = "report-saliency.png"
FIDELITY_PLOT = "report-fidelity.png"


def find_plan(work: Path, plan_path: Path | None) -> tuple[dict | None, Path | None, str | None]:
    """(plan, its path, a note): --plan if given, else WORK/plan.json, else the only WORK/plan-*.json."""
    if plan_path is not None:
        return read_json(plan_path, "plan"), plan_path, None
    if (work / "plan.json").is_file():
        return read_json(work / "plan.json", "plan"), work / "plan.json", None
    found = sorted(work.glob("plan-*.json"))
    if len(found) == 1:
        return read_json(found[0], "plan"), found[0], None
    if found:
        names = ", ".join(p.name for p in found)
        return None, None, f"several plans in WORK ({names}); pass --plan to choose one"
    return None, None, "no plan (run `surgery plan WORK --method M --ratio R`, or pass --plan)"


def saliency_summary(saliency: dict) -> dict:
    """{method: {layer: {"min", "median", "max"}}} over each layer's experts."""
    out: dict = {}
    for method in SALIENCY_METHODS:
        per = {}
        for layer, stats in sorted(saliency["layers"].items(), key=lambda kv: int(kv[0])):
            if method in stats:
                v = np.asarray(stats[method], dtype=float)
                per[layer] = {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
        if per:
            out[method] = per
    return out


def build_report(work: Path, plan_path: Path | None = None) -> dict:
    """Write WORK/report.json, WORK/report.md and the figures; return the report object."""
    work = Path(work)
    saliency = read_json(work / "saliency.json", "saliency (run `surgery calibrate` first)")
    if not isinstance(saliency.get("layers"), dict) or not saliency["layers"]:
        raise SurgeryError("saliency.json has no layers", work / "saliency.json")
    plan, plan_file, plan_note = find_plan(work, plan_path)
    layers = sorted(int(k) for k in saliency["layers"])
    if plan is not None:
        missing = [k for k in layers if str(k) not in plan.get("layers", {})]
        if missing:
            raise SurgeryError(f"plan has no entry for MoE layer(s) {layer_ranges(missing)} of this calibration",
                               plan_file)
        plan_sha = (plan.get("source") or {}).get("sha256")
        if plan_sha and plan_sha != (saliency.get("model") or {}).get("sha256"):
            raise SurgeryError("plan was made for another model than this calibration", plan_file)
    manifest = read_json(work / "manifest.json", "manifest") if (work / "manifest.json").is_file() else {}
    fidelity = read_json(work / "fidelity.json", "fidelity") if (work / "fidelity.json").is_file() else None
    evaluation = read_json(work / "eval.json", "evaluation") if (work / "eval.json").is_file() else None

    method = plan.get("method") if plan and plan.get("method") in SALIENCY_METHODS else "reap"
    scores = np.array([saliency["layers"][str(k)][method] for k in layers], dtype=float)
    kept = None
    if plan is not None:
        kept = np.zeros_like(scores, dtype=bool)
        for i, k in enumerate(layers):
            kept[i, plan["layers"][str(k)]["keep"]] = True
    model_name = Path(saliency.get("model_path") or "model").name
    figures = {"saliency_heatmap": HEATMAP}
    saliency_heatmap(work / HEATMAP, layers, scores, kept, method, model_name)
    if fidelity is not None:
        fidelity_curves(work / FIDELITY_PLOT, fidelity)
        figures["fidelity"] = FIDELITY_PLOT
    report = {
        "model": {"path": saliency.get("model_path"), **(saliency.get("model") or {})},
        "calibration": {"num_tokens": saliency.get("num_tokens"), "routing": saliency.get("routing"),
                        "datasets": (manifest.get("inputs") or {}).get("datasets"),
                        "settings": (manifest.get("inputs") or {}).get("data")},
        "plan": None if plan is None else {
            "path": str(plan_file), "method": plan.get("method"), "ratio": plan.get("ratio"),
            "layers": {str(k): {"keep": sorted(plan["layers"][str(k)]["keep"]),
                                "drop": sorted(plan["layers"][str(k)].get("drop", []))} for k in layers}},
        "plan_note": plan_note,
        "saliency": saliency_summary(saliency),
        "fidelity": fidelity,
        "eval": evaluation,
        "figures": figures,
    }
    write_json_atomic(work / "report.json", report)
    (work / "report.md").write_text(render_markdown(report, len(saliency["layers"][str(layers[0])][method])))
    return report


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def render_markdown(report: dict, num_experts: int) -> str:
    model, calib, plan = report["model"], report["calibration"], report["plan"]
    lines = [f"# Pruning report: {Path(model.get('path') or 'model').name}", ""]
    lines += [f"- model: `{model.get('path')}` ({model.get('architecture')}, fingerprint "
              f"`{str(model.get('sha256'))[:16]}`)",
              f"- calibration: {calib['num_tokens']:,} tokens, routing `{calib['routing']}`"
              if calib.get("num_tokens") is not None else "- calibration: (token count not recorded)"]
    if calib.get("datasets"):
        lines.append("- calibration data: " + ", ".join(f"`{s}`" for s in calib["datasets"]))
    if calib.get("settings"):
        lines.append("- sampling: " + ", ".join(f"{k} {v}" for k, v in calib["settings"].items()))
    lines.append("")

    lines += ["## Plan", ""]
    if plan is None:
        lines += [report.get("plan_note") or "no plan", ""]
    else:
        counts = {k: len(v["keep"]) for k, v in plan["layers"].items()}
        by: dict[int, list[int]] = {}
        for k, n in counts.items():
            by.setdefault(n, []).append(int(k))
        summary = "; ".join(f"keep {n} of {num_experts} in layers {layer_ranges(sorted(ls))}" for n, ls in by.items())
        lines += [f"`{plan['path']}`: method **{plan['method']}**, ratio **{plan['ratio']}**: {summary}.", "",
                  "| layer | kept | dropped experts |", "|---:|---:|---|"]
        for k, v in plan["layers"].items():
            lines.append(f"| {k} | {len(v['keep'])} | {layer_ranges(v['drop']) or '-'} |")
        lines.append("")

    lines += ["## Saliency", "", f"![saliency heatmap]({report['figures']['saliency_heatmap']})", "",
              "Per layer, over its experts: min / median / max.", ""]
    methods = list(report["saliency"])
    lines += ["| layer | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
    first = report["saliency"][methods[0]]
    for layer in first:
        cells = []
        for m in methods:
            s = report["saliency"][m].get(layer)
            cells.append(f"{_g(s['min'])} / {_g(s['median'])} / {_g(s['max'])}" if s else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Fidelity", ""]
    fid = report.get("fidelity")
    if fid is None:
        lines += ["Not measured: run `surgery fidelity WORK --ratios 0.25,0.5` (fastest after "
                  "`surgery calibrate --keep-hidden`).", ""]
    else:
        ratios = list(fid["n_keep"])
        lines += [f"![fidelity]({report['figures']['fidelity']})", "",
                  f"`||y - y_pruned|| / ||y||` of each MoE block's routed output on {fid['tokens']:,} calibration "
                  f"tokens ({fid['hidden_source']} hidden states); mean over {len(fid['layers'])} MoE layers:", "",
                  "| method | " + " | ".join(f"ratio {r} (keep {fid['n_keep'][r]})" for r in ratios) + " |",
                  "|---|" + "---:|" * len(ratios)]
        for m in fid["methods"]:
            lines.append(f"| {m} | " + " | ".join(f"{fid['mean'][m][r]:.4f}" for r in ratios) + " |")
        lines.append("")

    lines += ["## Evaluation", ""]
    ev = report.get("eval")
    if ev is None:
        lines += ["Not run: `surgery eval MODEL [PRUNED ...] --dataset SPEC --work WORK` writes WORK/eval.json.", ""]
    else:
        lines += eval_markdown(ev) + [""]
    return "\n".join(lines)


def eval_markdown(ev: dict) -> list[str]:
    """eval.json as a markdown table: dataset rows, model columns, loss (perplexity)."""
    labels = list(ev.get("models") or sorted({m for per in ev["datasets"].values() for m in per}))
    out = ["Mean next-token loss in nats (perplexity), identical tokens for every model.", "",
           "| dataset | tokens | " + " | ".join(f"`{m}`" for m in labels) + " |",
           "|---|---:|" + "---:|" * len(labels)]
    for spec, per in ev["datasets"].items():
        tokens = next((f["tokens"] for f in per.values() if f), 0)
        cells = [f"{per[m]['loss']:.4f} ({per[m]['perplexity']:.2f})" if per.get(m, {}).get("loss") is not None
                 else "-" for m in labels]
        out.append(f"| `{spec}` | {tokens:,} | " + " | ".join(cells) + " |")
    return out
