"""`surgery quantize` as one resumable job: (GPTQ: calibrate layer by layer into WORK) then write OUT."""

from __future__ import annotations

from pathlib import Path

from surgery.checkpoint.reader import Checkpoint


def quantize(model_dir: Path, out: Path, *, method: str = "rtn", group_size: int = 128,
             quantize_dense: bool = False, work: Path | None = None, data=None, batch_size: int = 8,
             device: str = "auto", dtype: str = "auto", progress: bool = True,
             memory_budget: int | None = None, inputs=None, partial_groups: str = "keep", tuning=None,
             reference: str = "float") -> dict:
    """`surgery quantize`. GPTQ and autoround calibrate on `data` (a `DataOptions`), or on `inputs` (a
    `CalibrationInputs` of pre-tokenised ids and mask) when given. `partial_groups` (not a CLI option):
    "keep" leaves linears whose input is not a multiple of the group size 16-bit, which every vLLM kernel
    loads; "pad" quantizes them with a zero-padded partial group as AutoRound does (for comparisons with
    AutoRound's own outputs; vLLM loads such an output nowhere). autoround: `tuning` is a
    `SignRoundOptions` (default AutoRound's; its batch size replaces `batch_size`), `reference` the
    tuning target ("float": AutoRound's float chain; "quantized": the float layer on the same inputs)."""
    from surgery.checkpoint.output import check_paths
    from surgery.lock import directory_lock
    from surgery.quant.run import rtn_source, write_quantized

    check_paths(Path(model_dir), Path(out))  # OUT is never the model directory, not even for its lock file
    if method == "rtn":
        with Checkpoint(model_dir) as ckpt, directory_lock(out):
            return write_quantized(model_dir, out, rtn_source(ckpt, group_size), method="rtn",
                                   group_size=group_size, quantize_dense=quantize_dense, progress=progress,
                                   partial_groups=partial_groups)
    work = Path(work) if work is not None else out.with_name(out.name + ".quant-work")
    with directory_lock(out), directory_lock(work):  # both before the calibration data is built
        if method == "autoround":
            from surgery.quant.autoround_driver import run_autoround
            from surgery.quant.signround import SignRoundOptions

            tuning = tuning or SignRoundOptions(batch_size=batch_size)
            return run_autoround(model_dir, out, work, data, group_size=group_size, quantize_dense=quantize_dense,
                                 opts=tuning, reference=reference, device=device, dtype=dtype, progress=progress,
                                 memory_budget=memory_budget, inputs=inputs, partial_groups=partial_groups)
        from surgery.quant.driver import run_gptq

        return run_gptq(model_dir, out, work, data, group_size=group_size, quantize_dense=quantize_dense,
                        batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                        memory_budget=memory_budget, inputs=inputs, partial_groups=partial_groups)
