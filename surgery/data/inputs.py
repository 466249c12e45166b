"""The calibration tokens a run reads: the data options every calibrating command takes (`--dataset`,
`--samples`, `--max-length`, `--seed`, `--pack`) and their tokenisation with the model's tokenizer.

Here, in the data layer, because more than the prune pipeline calibrates: GPTQ (`surgery.quant.driver`)
reads the same inputs, and a module below the commands must not reach up into `surgery.pipeline`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from surgery.data.calibration import build_calibration_set
from surgery.data.tokenizer import load_tokenizer
from surgery.errors import SurgeryError
from surgery.executor.options import CalibrationInputs

console = Console(stderr=True)


@dataclass
class DataOptions:
    datasets: list[str] = field(default_factory=list)
    samples: int = 64
    max_length: int = 512
    seed: int = 42
    pack: bool = False


def calibration_inputs(model_dir: Path, data: DataOptions) -> CalibrationInputs:
    """Tokenise the calibration data with the model's tokenizer (deterministic for a seed)."""
    tokenizer = load_tokenizer(model_dir)
    calib = build_calibration_set(data.datasets, tokenizer, samples=data.samples, max_length=data.max_length,
                                  seed=data.seed, pack=data.pack)
    if calib.input_ids.size == 0 or int(calib.attention_mask.sum()) == 0:
        raise SurgeryError("the calibration data produced no tokens")
    for cat in calib.categories:
        short = f" (asked for {cat.requested})" if cat.documents < cat.requested else ""
        console.print(f"[dim]data[/dim] {cat.name}: {cat.documents} documents{short}, {cat.tokens} tokens, "
                      f"{cat.truncated} truncated, {cat.skipped} skipped")
    if calib.default_used:
        console.print("[yellow]No --dataset given: using the built-in generic corpus (Python stdlib code, "
                      "docs, tool calls). Domain-matched calibration data prunes better.[/yellow]")
    settings = {"samples": data.samples, "max_length": data.max_length, "seed": data.seed, "pack": data.pack}
    return CalibrationInputs(calib.input_ids, calib.attention_mask, dict(calib.spec_hashes), settings,
                             [asdict(c) for c in calib.categories])
