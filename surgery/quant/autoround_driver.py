"""`surgery quantize --method autoround`: the layer engine's walk with the SignRound pass
(`surgery.quant.autoround_pass`), then the W4A16 writer reading what the pass stored.

WORK holds `autoround.json` (identity: model data, sampling, the tuning knobs, seed; the last durable
boundary; experts left at RTN because no token reached them), the engine's hidden-state cache (the
quantized chain), `fp_hidden_NNNN.safetensors` (the float chain at the resume boundary) and
`layer_NNNN.safetensors` (packed tensors). A killed run continues from the last durable boundary with
the same inputs and the same per-layer seeds, so it writes the same bytes. MTP layers take RTN.
"""

from __future__ import annotations

from pathlib import Path

from surgery.checkpoint.reader import Checkpoint
from surgery.quant.autoround_pass import AutoRoundPass
from surgery.quant.driver import gptq_source, open_calibration, walk_quantizer
from surgery.quant.signround import SignRoundOptions

STATE = "autoround.json"


def tuned_config(opts: SignRoundOptions, nsamples: int, seqlen: int, tokens: int, reference: str) -> dict:
    """What the output's quantization_config says about the tuning (AutoRound's own keys)."""
    return {"iters": opts.iters, "nsamples": nsamples, "seqlen": seqlen, "batch_size": opts.batch_size,
            "lr": opts.rate, "minmax_lr": opts.minmax_rate, "gradient_accumulate_steps": 1,
            "enable_minmax_tuning": True, "enable_quanted_input": reference == "float", "seed": opts.seed,
            "calibration_tokens": tokens}


def run_autoround(model_dir: Path, out: Path, work: Path, data, *, group_size: int = 128,
                  quantize_dense: bool = False, opts: SignRoundOptions | None = None, reference: str = "float",
                  device: str = "auto", dtype: str = "auto", progress: bool = True, memory_budget: int | None = None,
                  inputs=None, partial_groups: str = "keep") -> dict:
    """Calibration inputs (`data`, or pre-tokenised `inputs`) -> SignRound layer by layer in WORK -> OUT.
    `opts.batch_size` is both AutoRound's rows per tuning step and the engine's forward batch;
    `partial_groups`: `surgery.quant.targets.find_targets`'s."""
    from surgery.executor.budget import hold_heap_to_live_memory
    from surgery.quant.run import finished_output, write_quantized

    opts = opts or SignRoundOptions()
    with Checkpoint(model_dir) as ckpt:
        model, targets, dev, dt, inputs = open_calibration(ckpt, data, inputs, group_size=group_size,
                                                           quantize_dense=quantize_dense,
                                                           partial_groups=partial_groups, device=device, dtype=dtype)
        ids, mask = inputs.input_ids, inputs.attention_mask
        identity = {"datasets": inputs.datasets, "data": inputs.settings, "dtype": str(dt).removeprefix("torch."),
                    "group_size": group_size, "quantize_dense": quantize_dense, "reference": reference,
                    "iters": opts.iters, "lr": opts.rate, "minmax_lr": opts.minmax_rate,
                    "batch_size": opts.batch_size, "seed": opts.seed}
        extra = {"autoround": identity}
        done = finished_output(ckpt, out, method="autoround", group_size=group_size, quantize_dense=quantize_dense,
                               extra=extra, partial_groups=partial_groups, progress=progress)
        if done is not None:
            return done
        # a tuning step makes and frees many mid-sized tensors (activations, chunks of experts): glibc's
        # heap would keep the worst fragmentation as RSS (measured on the 24-layer x 64-expert benchmark:
        # peak 1.88 GB without, 1.52 GB with freed memory handed back), so always as under a budget
        hold_heap_to_live_memory()
        qpass = AutoRoundPass(model, targets, work, mask, group_size, opts, reference, progress)
        untuned = walk_quantizer(model, qpass, work, identity, ids, mask, batch_size=opts.batch_size, device=dev,
                                 dtype=dt, progress=progress, memory_budget=memory_budget, state=STATE,
                                 command="quantize --method autoround", crash_prefix="autoround.")
        source = gptq_source(model, work, group_size)
        tuned = tuned_config(opts, int(ids.shape[0]), int(ids.shape[1]), int(mask.sum()), reference)
        summary = write_quantized(model_dir, out, source, method="autoround", group_size=group_size,
                                  quantize_dense=quantize_dense, job_extra=extra, progress=progress,
                                  gptq_config=tuned, partial_groups=partial_groups)
        summary["rtn_fallback"] = untuned + source.rtn
        summary["tuning"] = qpass.stats
        return summary
