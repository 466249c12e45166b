"""OUT/README.md of a W4A16 checkpoint (`surgery quantize`, `surgery prune --quantize w4a16`).

Why its own card: the input's card describes the input (its title, its precision, its load commands
point at another directory). Everything here is read from OUT itself: config.json's
quantization_config (method, bits, group, calibration, the linears left 16-bit), surgery.json (the
job, and under `previous` the pruning that made the input, when there was one), the shard sizes, and
the `vllm serve` settings OUT's own shapes allow (`surgery.report.serving`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import surgery
from surgery.checkpoint.reader import Checkpoint
from surgery.humanize import human_bytes, layer_ranges
from surgery.report.card import CITATION, METHOD_NAMES, base_model_id
from surgery.report.serving import vllm_lines

LAYER_NAME = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")


def _kept_lines(extra: dict) -> list[str]:
    """extra_config's 16-bit modules, one line per layer-relative name with its layers."""
    layers: dict[str, list[int]] = {}
    other = []
    for name in extra:
        m = LAYER_NAME.match(name)
        if m:
            layers.setdefault(m.group(3), []).append(int(m.group(2)))
        else:
            other.append(name)
    lines = [f"- `{n}`" for n in sorted(other)]
    lines += [f"- `{rel}` in layers {layer_ranges(sorted(set(ls)))}" for rel, ls in sorted(layers.items())]
    return lines


def _pruning_lines(previous: dict | None) -> list[str]:
    if not previous or previous.get("operation") != "expert pruning":
        return ["Not pruned by surgery (the input's `surgery.json` records no pruning)."]
    experts = previous.get("num_experts") or {}
    method = previous.get("method", "?")
    ratio = previous.get("ratio")
    pct = f"{100 * float(ratio):g}% of the routed experts" if ratio is not None else "routed experts"
    calib = (previous.get("plan") or {}).get("calibration") or {}
    lines = [f"{pct} removed by {METHOD_NAMES.get(method, method)} "
             f"({experts.get('before', '?')} → {experts.get('after', '?')} per MoE layer, "
             f"{len(previous.get('moe_layers') or [])} MoE layers), one-shot, no fine-tuning."]
    if calib.get("num_tokens") is not None:
        lines.append(f"Calibrated on {int(calib['num_tokens']):,} tokens; plan sha256 `{previous.get('plan_sha256')}`.")
    source = previous.get("source") or {}
    if source.get("total_bytes"):
        lines.append(f"Unpruned source: {source.get('architecture', '?')}, {human_bytes(source['total_bytes'])}.")
    return lines


def write_quant_card(out_dir: str | Path, command: str) -> Path:
    """Write OUT/README.md for the W4A16 checkpoint in OUT; returns its path."""
    out_dir = Path(out_dir)
    prov = json.loads((out_dir / "surgery.json").read_text())
    job, previous = prov.get("job") or {}, prov.get("previous")
    with Checkpoint(out_dir) as ckpt:
        config, out_bytes = ckpt.config, ckpt.total_bytes
        arch = (config.get("architectures") or ["?"])[0]
        remote = bool(config.get("auto_map"))
    qcfg = config.get("quantization_config") or {}
    source_dir = Path((prov.get("source") or {}).get("path", out_dir))
    try:
        with Checkpoint(source_dir) as src:
            in_bytes = src.total_bytes
    except Exception:  # the input may be gone (a WORK directory cleaned up): the size is then not shown
        in_bytes = None
    origin = (previous or {}).get("source", {}).get("path") or str(source_dir)
    base = base_model_id(Path(origin), config)
    method = job.get("method", "rtn")
    how = {"rtn": "round-to-nearest, bit-identical to AutoRound 0.16.1's RTN, no calibration data",
           "gptq": "GPTQ, layer by layer on calibration data"}.get(method, method)
    calib = (f"{int(qcfg['calibration_tokens']):,} calibration tokens in {qcfg.get('nsamples', '?')} sequences"
             if qcfg.get("calibration_tokens") else "none (RTN reads no data)")
    name = out_dir.resolve().name
    size = f"{human_bytes(in_bytes)} → {human_bytes(out_bytes)}" if in_bytes else human_bytes(out_bytes)
    extra = qcfg.get("extra_config") or {}
    lines = ["---", *([f"base_model: {base}"] if "/" in base else []), "library_name: transformers",
             "tags:", "- mixture-of-experts", "- w4a16", "- auto-round", "---", "",
             f"# {name}", "",
             f"**{base}**" + (" after expert pruning," if previous else "") + f" quantized to 4-bit weights with "
             f"16-bit activations (W4A16, AutoRound's `{qcfg.get('packing_format')}` packing) by surgery "
             f"{surgery.__version__}.", "",
             "## Quantization", "", "| Property | Value |", "|---|---|",
             f"| Architecture | {arch} |",
             f"| Method | {method}: {how} |",
             f"| Bits / group | {qcfg.get('bits')} bits, group {qcfg.get('group_size')}, symmetric, "
             f"{'act-order' if qcfg.get('desc_act') else 'no act-order'} |",
             f"| Calibration | {calib} |",
             f"| Quantized | {prov.get('quantized_tensors', '?')} linear weights (attention, routed and shared experts"
             + (", dense MLPs" if job.get("quantize_dense") else "") + ") |",
             f"| Size (weights) | {size} |", "",
             "Linears left 16-bit (`extra_config`; routers, the head, and linears whose input size is not a "
             "multiple of the group size, which no vLLM kernel loads quantized):", "", *_kept_lines(extra), "",
             "## Pruning", "", *_pruning_lines(previous), "",
             "## Usage", "", "### vLLM", "", *vllm_lines(out_dir, name, remote),
             "### transformers", "", "Needs `auto-round` (or `gptqmodel`) installed to read the packing:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{out_dir}", dtype="auto", device_map="auto"'
             + (", trust_remote_code=True" if remote else "") + ")",
             f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")', "```", "",
             "### surgery", "", "```bash", f"surgery verify {out_dir}", f"surgery eval {out_dir} --dataset DATA", "```",
             "", "## Reproduction", "", "```bash", command.strip(), "```", "",
             f"Quantization job sha256 `{prov.get('quantize_sha256')}`.", "",
             "## Citation", "", "```bibtex", CITATION, "```", ""]
    path = out_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
