"""vLLM's loader rules that decide whether a checkpoint loads at a tensor-parallel degree, as data.

Read from vLLM's own loader code (vllm-project/vllm; the seed card's 0.13.0 and 0.32.0 as installed by
`just serve-check`): where these numbers live there, so that a reader can check them against a newer
vLLM and change one line here.

- Tensor parallelism splits attention by heads (`QKVParallelLinear`: query heads divide by TP; key/value
  heads divide by TP, or TP by them, then each rank holds one replica), column-parallel linears
  (q/k/v, gate/up, w1/w3) along their output and row-parallel ones (o_proj, down_proj, w2) along their
  input; routed experts are split along their intermediate size, or, with `--enable-expert-parallel`,
  whole experts are spread over the ranks and the intermediate size is not split.
- FP8 block-scaled weights (`fp8_utils.validate_fp8_block_shape` / `validate_fp8_block_shape_moe`): a
  column-parallel output per rank must be a multiple of block_n, a row-parallel input per rank (TP > 1)
  of block_k; a fused MoE's intermediate per rank of block_n, and (TP > 1) of block_k.
- W4A16 (AutoRound `auto_round:auto_gptq`): a packed linear needs its input per rank to be a multiple
  of the group size (GPTQ's "input size is not aligned with the quantized weight shape"); Marlin also
  wants output % 64 and input % 128 per rank, else the plain GPTQ kernel runs it. Routed experts run on
  Marlin when hidden % 128 == 0 and the intermediate per rank is a multiple of max(64, group), else on
  `moe_wna16`, which halves the group until it divides both the intermediate per rank and the hidden
  size (never below 32) and repeats the checkpoint's scales; both size scales from full groups only, so
  a checkpoint whose input sizes are not multiples of its group size (a padded partial group) loads
  nowhere.
- Which linears are 4-bit (the AutoRound loader, `quant_method: auto-round`): a module whose name is an
  `extra_config` key takes that entry's bits; else 4 bits inside `block_name_to_quantize`. Names are
  vLLM's module names, which for some families differ from the checkpoint's (`VLLM_RENAMES`); fused
  modules (qkv_proj, gate_up_proj) look their parts up and need them to agree; a fused MoE layer
  (`<moe>.experts`) is matched by its own name (vLLM 0.32) or by the keys that start with it
  (0.13.0), so both forms are written and checked.
"""

from __future__ import annotations

TP_DEGREES = (1, 2, 4, 8)

# on-disk module-name substring -> vLLM module-name substring, per family (vLLM's model files: the
# module's `prefix`). MiniMax-M2 stores `block_sparse_moe.*` but builds its MoE under the prefix `mlp`.
VLLM_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "minimax_m2": ((".block_sparse_moe.", ".mlp."),),
}

# vLLM fuses these checkpoint linears into one module (the name's last part -> the fused module's)
FUSED_PARTS: dict[str, str] = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "w2"})  # split along their input
REPLICATED = frozenset({"gate", "shared_expert_gate", "q_a_proj", "kv_a_proj_with_mqa"})  # not split

# W4A16 kernels
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # marlin_utils: GPTQ_MARLIN_MIN_THREAD_N / _K
MARLIN_GROUPS = (-1, 32, 64, 128)
MOE_MARLIN_HIDDEN = 128  # check_moe_marlin_supports_layer: hidden_size % 128
MOE_WNA16_MIN_GROUP = 32  # moe_wna16: the halved group size must stay >= 32

# How the AutoRound loader resolves a module's bits, in the two forms read (see the module docstring)
RESOLVERS = {
    "vLLM 0.13 (AutoRoundConfig)": {"moe_subkeys": True, "regex": False, "suffix": False},
    "vLLM 0.32 (INCConfig)": {"moe_subkeys": False, "regex": True, "suffix": True},
}
REGEX_CHARS = frozenset("*+?^$()[]{}|\\")
