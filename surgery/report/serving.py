"""The "vLLM" part of a model card, computed from the checkpoint the card describes.

Why computed: a fixed `--tensor-parallel-size 8` is wrong for outputs it cannot load (an FP8
MiniMax-M2.1 pruned to 128 experts splits its 1536-wide experts into 192 columns per rank at TP 8, not
a multiple of the 128 FP8 block). `surgery.arch.serving` says which settings load this directory; the
card shows a command with one that does and lists the rest.
"""

from __future__ import annotations

from pathlib import Path

from surgery.arch.model import MoEModel
from surgery.arch.serving import serving_report
from surgery.checkpoint.reader import Checkpoint


def vllm_lines(out_dir: Path, served_name: str, remote: bool) -> list[str]:
    """Markdown: a `vllm serve` command for OUT with a tensor-parallel size that loads it, and one line
    per TP degree (loads / with --enable-expert-parallel / not, and why)."""
    if not (Path(out_dir) / "config.json").is_file():  # a card written before its checkpoint (tests)
        return [f"`surgery verify {out_dir}` prints the `vllm serve` settings that load it.", ""]
    with Checkpoint(out_dir) as ckpt:
        report = serving_report(MoEModel(ckpt, check=False))
    working = report.working()
    if not working:
        return ["vLLM loads this checkpoint at no setting: " + report.summary_lines()[0], ""]
    plain = [s for s in working if not s.expert_parallel]
    pick = plain[-1] if plain else working[0]
    degrees = ", ".join(str(s.tp) for s in plain) or "none"
    ep = [str(s.tp) for s in working if s.expert_parallel]
    comment = f"loads at TP {degrees}" + (f"; TP {', '.join(ep)} with --enable-expert-parallel" if ep else "")
    lines = ["```bash", f"vllm serve {out_dir} \\"]
    if remote:
        lines.append("    --trust-remote-code \\")
    lines += [f"    --served-model-name {served_name} \\", f"    {pick.flags}  # {comment}", "```", "",
              f"Settings read from this directory's shapes against vLLM's loader rules ({report.precision}; "
              "`surgery verify` prints the same):", ""]
    lines += [f"- {line}" for line in report.summary_lines()]
    return lines + [""]
