"""The consistency rules, one module per subject; `surgery.arch.consistency` runs them in order.

- `problem`: the `Problem` every rule reports and the dtype vocabulary the rules share.
- `config`: `family` (architectures vs model_type) and `routing` (top-k, routing groups).
- `quantization`: which quantization_config surgery reads and whether the tensors match it.
- `dims`: config.json values behind the table's shape expressions.
- `tensors`: each tensor's shape and dtype by its role in the table (`shape`, `dtype`).
- `fp8`, `w4a16`: the quantized forms of a linear (block scales; the packed triple and the
  declared bits vLLM's loader reads).
- `index`: the index against the shard headers.
- `layers`: layer indices, the experts of each MoE layer, and the tensors every checkpoint has.
"""
