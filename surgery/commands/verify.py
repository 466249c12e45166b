"""`surgery verify OUT`: the checkpoint's tensors and expert counts agree with its config.json and, for a
rewrite's output, its tensors with the input's (`OUT/surgery.tensors.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from surgery.cli import app
from surgery.humanize import human_bytes
from surgery.rewrite import verify_checkpoint


@app.command("verify")
def verify_cmd(
    out: Path = typer.Argument(..., help="Checkpoint directory to check (e.g. a rewrite's OUT)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Every indexed tensor present with its dtype and shape, experts 0..n-1 in every MoE layer, router rows
    and biases == n, no tensor of a dropped expert (from headers); which `vllm serve` settings load it
    (tensor-parallel degrees 1/2/4/8, expert parallelism; vLLM's loader rules); then, when OUT/surgery.tensors.json
    exists (a rewrite's output), every kept tensor present and every copied one holding the input's bytes
    (SHA-256; reads the output's data once). Exit 2 with one line if not."""
    info = verify_checkpoint(out)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"OK: {info['architecture']}, {info['num_experts']} experts ({info['experts_key']}) in each of "
          f"{info['moe_layers']} MoE layers; {info['tensors']} tensors in {info['shards']} shards, "
          f"{human_bytes(info['total_bytes'])}")
    print(f"vLLM ({info['serving']['precision']}):")
    for line in info["serving_summary"]:
        print(f"  {line}")
    for warning in info["warnings"]:
        print(f"warning: {warning}")
