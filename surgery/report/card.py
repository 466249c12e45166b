"""OUT/README.md: the model card of a pruned checkpoint, in the style of the hub's REAP cards.

Everything on the card is computed, not typed: parameter counts and sizes from the source's shard
headers and the plan (an expert's tensors are dropped whole, a router keeps one row per kept expert),
experts per layer from the plan, calibration from saliency.json and the calibration manifest,
evaluation from eval.json, the `vllm serve` settings from the output's own shapes
(`surgery.report.serving`), and the command that made it as given by the caller.
"""

from __future__ import annotations

import re
from pathlib import Path

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import SCALE_SUFFIX
from surgery.checkpoint.reader import Checkpoint
from surgery.humanize import human_bytes, layer_ranges
from surgery.report.report import eval_markdown
from surgery.report.serving import vllm_lines

CITATION = "\n".join([
    "@article{lasby2025reap,",
    "  title={REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression},",
    "  author={Lasby, Mike and Lazarevich, Ivan and Sinnadurai, Nish and Lie, Sean and Ioannou, Yani and "
    "Thangarasa, Vithursan},",
    "  journal={arXiv preprint arXiv:2510.13999},",
    "  year={2025},",
    "  url={https://arxiv.org/abs/2510.13999}",
    "}",
])
METHOD_NAMES = {"reap": "REAP (router-weighted expert activation)", "frequency": "routing frequency",
                "weighted_frequency": "router-weighted frequency", "ean": "expert activation norm (EAN)",
                "random": "random (baseline)"}


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def base_model_id(source_dir: Path, config: dict) -> str:
    """The hub id when the source is a Hugging Face cache snapshot (.../models--org--name/snapshots/..)
    or the config names one; else the directory's name."""
    for part in Path(source_dir).resolve().parts:
        m = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    name = str(config.get("_name_or_path") or "")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return Path(source_dir).resolve().name


def pruned_counts(model: MoEModel, plan: dict) -> dict:
    """Parameters (scales of FP8 blocks are not parameters) and tensor bytes, before and after the plan."""
    kept = {int(k): set(v["keep"]) for k, v in plan["layers"].items()}
    num = model.num_experts
    out = {"params_before": 0, "params_after": 0.0, "bytes_before": 0, "bytes_after": 0.0}
    for name, info in model.ckpt.tensors.items():
        params = 0 if name.endswith(SCALE_SUFFIX) else info.numel
        out["params_before"] += params
        out["bytes_before"] += info.nbytes
        role = model.classify(name)
        share = 1.0
        if role.layer in kept:
            if role.kind == "expert":
                share = 1.0 if role.expert in kept[role.layer] else 0.0
            elif role.kind == "router" and info.shape and info.shape[0] == num:
                share = len(kept[role.layer]) / num
        out["params_after"] += params * share
        out["bytes_after"] += info.nbytes * share
    out["params_after"] = int(round(out["params_after"]))
    out["bytes_after"] = int(round(out["bytes_after"]))
    return out


def _precision(config: dict) -> str:
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "unknown")
    q = config.get("quantization_config") or {}
    if q.get("quant_method"):
        return f"{dtype}; {q['quant_method']} {q.get('fmt', '')} weights kept as shipped".replace("  ", " ")
    return dtype


def _calibration_lines(saliency: dict, calibration: dict | None) -> list[str]:
    inputs = (calibration or {}).get("inputs", calibration or {})
    datasets = inputs.get("datasets") or {}
    settings = inputs.get("data") or inputs.get("settings") or {}
    categories = (calibration or {}).get("categories") or []
    lines = []
    if categories:
        total = sum(int(c.get("tokens", 0)) for c in categories) or 1
        lines += ["| Dataset | Documents | Tokens | Share |", "|---|---:|---:|---:|"]
        for c in categories:
            lines.append(f"| `{c.get('spec', c.get('name'))}` | {c.get('documents', '-')} | "
                         f"{int(c.get('tokens', 0)):,} | {100 * int(c.get('tokens', 0)) / total:.0f}% |")
        lines.append("")
    elif datasets:
        lines += ["| Dataset | Content hash |", "|---|---|"]
        lines += [f"| `{spec}` | `{str(h)[:12]}` |" for spec, h in datasets.items()]
        lines.append("")
    else:
        lines += ["Calibration datasets were not recorded.", ""]
    facts = []
    if saliency.get("num_tokens") is not None:
        facts.append(f"{int(saliency['num_tokens']):,} calibration tokens in all")
    if settings:
        facts.append(", ".join(f"{k} {v}" for k, v in settings.items()))
    if saliency.get("routing"):
        facts.append(f"saliency recorded under the {'model' if saliency['routing'] == 'model' else 'reference'}'s "
                     "routing")
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    return lines


def _made_by(method: str, plan: dict) -> str:
    """How the experts were removed, for the card's first sentence (which ends "One-shot, no fine-tuning.")."""
    if method == "merge":
        rank = (plan.get("merge") or {}).get("saliency", "reap")
        return (f"expert merging: the experts {METHOD_NAMES.get(rank, rank)} ranks highest are kept, and each "
                "dropped expert that calibration routed tokens to is folded into its most similar kept expert as a "
                "routed-frequency-weighted average of their weights.")
    return f"{METHOD_NAMES.get(method, method)} expert pruning."


def write_model_card(out_dir: str | Path, source_dir: str | Path, plan: dict, saliency: dict, command: str,
                     eval: dict | None = None, *, calibration: dict | None = None) -> Path:
    """Write OUT/README.md for the checkpoint `plan` made from `source_dir`; returns its path.

    `eval` is eval.json's object (figures per dataset and model) when evaluation ran; `calibration` may
    be the calibration manifest (WORK/manifest.json: its inputs name the datasets and settings) and may
    carry "categories" ([{spec, documents, tokens}]) for per-dataset token counts."""
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    with Checkpoint(source_dir) as ckpt:
        model = MoEModel(ckpt)
        counts = pruned_counts(model, plan)
        config = ckpt.config
        arch = (config.get("architectures") or ["?"])[0]
        num, top_k, n_layers, moe = model.num_experts, model.top_k, model.num_layers, model.moe_layers
        remote = bool(config.get("auto_map"))
    from surgery.plan import plan_hash

    base = base_model_id(source_dir, config)
    method, ratio = plan.get("method", "?"), plan.get("ratio")
    pct = f"{100 * float(ratio):g}%" if ratio is not None else "?"
    kept_counts = {int(k): len(v["keep"]) for k, v in plan["layers"].items()}
    by: dict[int, list[int]] = {}
    for layer, n in sorted(kept_counts.items()):
        by.setdefault(n, []).append(layer)
    after = " / ".join(str(n) for n in sorted(by))
    name = out_dir.resolve().name
    load_extra = ", trust_remote_code=True" if remote else ""
    front = [f"base_model: {base}"] if "/" in base else []  # the hub checks it names a hub model
    lines = ["---", *front, "library_name: transformers",
             "tags:", "- mixture-of-experts", "- expert-merging" if method == "merge" else "- expert-pruning",
             f"- {method}", "---", "",
             f"# {name}", "",
             f"{pct} of the routed experts of **{base}** removed in every MoE layer by "
             f"{_made_by(method, plan)} One-shot, no fine-tuning. "
             f"Made with surgery {surgery.__version__} "
             "([REAP the Experts](https://arxiv.org/abs/2510.13999)).", "",
             "## Model specifications", "", "| Property | Value |", "|---|---|",
             f"| Base model | {base} |",
             f"| Architecture | {arch} |",
             f"| {'Merging' if method == 'merge' else 'Pruning'} | {pct} of routed experts removed"
             + (" (folded into kept experts)" if method == "merge" else "") + f", method `{method}`"
             + (f" (seed {plan['seed']})" if "seed" in plan else "") + " |",
             f"| Experts per MoE layer | {num} → {after} (top-k {top_k}, unchanged) |",
             f"| MoE layers | {len(moe)} of {n_layers} decoder layers |",
             f"| Parameters | {human_count(counts['params_before'])} → {human_count(counts['params_after'])} |",
             f"| Size (weights) | {human_bytes(counts['bytes_before'])} → {human_bytes(counts['bytes_after'])} |",
             f"| Precision | {_precision(config)} |", ""]
    lines += ["## Calibration", ""] + _calibration_lines(saliency, calibration)
    if eval:
        lines += ["## Evaluation", ""] + eval_markdown(eval) + [""]
    lines += ["## Experts kept", ""]
    for n, layers in sorted(by.items()):
        lines.append(f"- {n} of {num} in MoE layers {layer_ranges(layers)}")
    lines += ["", "<details><summary>Dropped experts per layer (original ids)</summary>", "",
              "| Layer | Dropped |", "|---:|---|"]
    for layer, entry in sorted(plan["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {layer_ranges(sorted(entry.get('drop', []))) or '-'} |")
    lines += ["", "</details>", "",
              "Kept experts keep their original order and are renumbered 0..n-1; routers keep their rows."
              + (" A kept expert with a merge group holds the group's frequency-weighted average."
                 if method == "merge" else ""), "",
              "## Usage", "", "### transformers", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{out_dir}", dtype="auto", device_map="auto"{load_extra})',
              f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")', "```", "", "### vLLM", "",
              *vllm_lines(out_dir, name, remote),
              "## Reproduction", "", "```bash", command.strip(), "```", "",
              f"Plan sha256 `{plan_hash(plan)}`; source fingerprint "
              f"`{str((plan.get('source') or {}).get('sha256'))[:16]}`.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    path = out_dir / "README.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
