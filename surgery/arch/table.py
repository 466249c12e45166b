"""The architecture table: one data entry per MoE family, nothing else.

Everything the pipeline needs to know about a family lives here: where its decoder layers and MoE
blocks are (on disk and in the transformers module), which layers are MoE, the on-disk names of the
router, its biases and each expert's projections, shared experts, the config keys for expert count
and top-k, and the routing rule. Code elsewhere reads these fields; it never tests a family name.

Names on disk are the hub's (per-expert keys); transformers 5 fuses experts in memory
(`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`), see `surgery.arch.layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Routing:
    """How the model turns router logits into top-k choices and weights (documented, and used by
    `--routing reference`, plan validation and `inspect`; calibration runs the model's own router)."""

    scoring: str  # "softmax" or "sigmoid"
    bias_for_choice: bool = False  # e_score_correction_bias added for the choice only
    renormalize: bool | str = False  # True, False, or the config key that decides it
    scaling_key: str | None = None  # config key of routed_scaling_factor
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) config keys


@dataclass(frozen=True)
class ArchSpec:
    """One MoE family. Paths with `{moe}` are relative to the layer prefix; `{expert}` / `{proj}`
    are filled per expert and projection role."""

    family: str
    architectures: tuple[str, ...]
    model_type: str
    num_experts_keys: tuple[str, ...]  # config.json keys, first present wins and is written back
    moe_disk: str  # MoE block prefix inside a layer on disk ("block_sparse_moe", "mlp")
    moe_module: str  # attribute of the transformers decoder layer holding the MoE block
    projections: dict[str, str]  # role (gate, up, down) -> on-disk projection name
    routing: Routing
    router_weight: str = "gate.weight"  # relative to the MoE prefix, [E, H]
    router_biases: tuple[str, ...] = ()  # relative to the MoE prefix, [E], follow the kept rows
    router_bias_axis: int = 0  # the expert axis of the router biases (ERNIE stores [1, E])
    router_module: str = "gate"  # attribute of the transformers MoE block holding the router
    # [E, ...] expert tensors stored fused on disk (gpt-oss), relative to the MoE prefix; sliced on axis 0
    fused_on_disk: tuple[str, ...] = ()
    experts_transposed: bool = False  # fused in-memory weights are [E, in, out] (x @ W), not [E, out, in]
    unsupported_suffixes: tuple[tuple[str, str], ...] = ()  # (tensor-name suffix, why we refuse)
    expert_key: str = "experts.{expert}.{proj}"  # relative to the MoE prefix; tensors below it follow
    shared_experts: tuple[str, ...] = ()  # prefixes relative to the MoE prefix; never pruned
    # (on-disk substring, in-memory substring) for layer-relative keys transformers renames on load
    disk_to_memory: tuple[tuple[str, str], ...] = ()
    layer_prefix: str = "model.layers.{layer}."
    num_layers_key: str = "num_hidden_layers"
    top_k_key: str = "num_experts_per_tok"
    first_dense_key: str | None = None  # e.g. first_k_dense_replace: layers [0, k) are dense
    mlp_only_key: str | None = None  # explicit list of dense layers
    sparse_step_key: str | None = None  # MoE every n-th layer ((i + 1) % n == 0)
    start_key: str | None = None  # first MoE layer index (ERNIE: moe_layer_start_index)
    end_key: str | None = None  # last MoE layer index (ERNIE: moe_layer_end_index)
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    per_layer_counts: bool = False  # transformers builds every MoE layer with one config count
    mtp_key: str | None = None  # config key counting multi-token-prediction layers stored past the last layer
    # parts of an MTP module that are not its decoder layer (DeepSeek-V3 / GLM-4.x layout), relative to
    # the layer prefix: h' = eh_proj(cat(enorm(embed(next token)), hnorm(h))), then the decoder layer
    mtp_extras: tuple[str, ...] = ("enorm.", "hnorm.", "eh_proj.", "embed_tokens.", "shared_head.")
    # in-memory fused expert parameter -> the projection roles concatenated (dim 0) per expert and
    # stacked over experts: gate_up_proj[e] = cat(gate_e, up_e) [2I, H]; down_proj[e] = down_e [H, I]
    fused_experts: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("gate_up_proj", ("gate", "up")), ("down_proj", ("down",)))
    # ---- shapes as config.json implies them (surgery.arch.consistency). Dimensions are expressions over
    # config keys (`+`, `*`, `//`, integers; `E` is the expert count); names are relative to the layer
    # prefix, `{moe}` is `moe_disk`. A linear's rule covers `.weight` [out, in], `.bias` [out] and its
    # quantized forms (FP8 `weight_scale_inv`, W4A16 qweight/qzeros/scales).
    linear_shapes: tuple[tuple[str, tuple[str, str]], ...] = ()
    param_shapes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # exact tensors: norms, sinks, fused experts
    expert_intermediate_key: str = "intermediate_size"  # routed experts: gate/up [I, H], down [H, I]
    router_bias_shape: tuple[str, ...] = ("E",)
    # what a key absent from config.json means, where transformers derives it in the modeling code
    config_defaults: tuple[tuple[str, str], ...] = (("head_dim", "hidden_size//num_attention_heads"),)
    required_layer_tensors: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    # attribute of the transformers decoder layer holding the norm before the MoE block, where the layer is
    # pre-norm (output = h + moe(norm(h)), h the residual after attention): a paged layer's replay then
    # skips attention (surgery.executor.residual); None: the replay runs the whole layer again
    moe_norm: str | None = "post_attention_layernorm"
    # MTP fields a hub config may declare while its weights hold no MTP tensors (MiniMax-M2/M2.1): kept as
    # they are; tensors past the last layer of such a family are refused (no layout for them is known)
    declared_mtp_keys: tuple[str, ...] = ()
    # W4A16 (`surgery quantize`): layer-relative prefixes whose 2-D linear weights are quantized besides the
    # routed and shared experts, and a dense layer's MLP (quantized only when asked: --quantize-dense)
    quant_linears: tuple[str, ...] = ("self_attn.",)
    dense_mlp: str = "mlp."
    notes: tuple[str, ...] = field(default=())


SWIGLU_W = {"gate": "w1", "up": "w3", "down": "w2"}
SWIGLU_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def swiglu(prefix: str, inter: str) -> tuple[tuple[str, tuple[str, str]], ...]:
    """Linear shapes of a (dense or shared-expert) SwiGLU MLP under `prefix` with intermediate size `inter`."""
    return ((prefix + "gate_proj", (inter, "hidden_size")), (prefix + "up_proj", (inter, "hidden_size")),
            (prefix + "down_proj", ("hidden_size", inter)))


# grouped-query attention: q [heads * head_dim, H], k/v [kv_heads * head_dim, H], o [H, heads * head_dim]
GQA = (("self_attn.q_proj", ("num_attention_heads*head_dim", "hidden_size")),
       ("self_attn.k_proj", ("num_key_value_heads*head_dim", "hidden_size")),
       ("self_attn.v_proj", ("num_key_value_heads*head_dim", "hidden_size")),
       ("self_attn.o_proj", ("hidden_size", "num_attention_heads*head_dim")))
# multi-head latent attention (DeepSeek-V3 / Kimi-K2)
MLA = (("self_attn.q_proj", ("num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim)", "hidden_size")),
       ("self_attn.q_a_proj", ("q_lora_rank", "hidden_size")),
       ("self_attn.q_b_proj", ("num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim)", "q_lora_rank")),
       ("self_attn.kv_a_proj_with_mqa", ("kv_lora_rank+qk_rope_head_dim", "hidden_size")),
       ("self_attn.kv_b_proj", ("num_attention_heads*(qk_nope_head_dim+v_head_dim)", "kv_lora_rank")),
       ("self_attn.o_proj", ("hidden_size", "num_attention_heads*v_head_dim")))
NORMS = (("input_layernorm.weight", ("hidden_size",)), ("post_attention_layernorm.weight", ("hidden_size",)))
QK_NORM_PER_HEAD = (("self_attn.q_norm.weight", ("head_dim",)), ("self_attn.k_norm.weight", ("head_dim",)))
QK_NORM_FULL = (("self_attn.q_norm.weight", ("num_attention_heads*head_dim",)),
                ("self_attn.k_norm.weight", ("num_key_value_heads*head_dim",)))
# the parts of a DeepSeek-V3 / GLM-4.x MTP module that are not its decoder layer
MTP_LINEARS = (("eh_proj", ("hidden_size", "2*hidden_size")), ("shared_head.head", ("vocab_size", "hidden_size")))
MTP_PARAMS = (("enorm.weight", ("hidden_size",)), ("hnorm.weight", ("hidden_size",)),
              ("shared_head.norm.weight", ("hidden_size",)), ("embed_tokens.weight", ("vocab_size", "hidden_size")))

QWEN3_MOE = ArchSpec(
    family="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_type="qwen3_moe",
    num_experts_keys=("num_experts", "num_local_experts"),
    moe_disk="mlp",
    moe_module="mlp",
    projections=SWIGLU_PROJ,
    routing=Routing(scoring="softmax", renormalize="norm_topk_prob"),
    mlp_only_key="mlp_only_layers",
    sparse_step_key="decoder_sparse_step",
    linear_shapes=GQA + swiglu("mlp.", "intermediate_size"),
    param_shapes=NORMS + QK_NORM_PER_HEAD,
    expert_intermediate_key="moe_intermediate_size",
)

GLM4_MOE = ArchSpec(
    family="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    model_type="glm4_moe",
    num_experts_keys=("n_routed_experts", "num_local_experts"),
    moe_disk="mlp",
    moe_module="mlp",
    projections=SWIGLU_PROJ,
    routing=Routing(scoring="sigmoid", bias_for_choice=True, renormalize="norm_topk_prob",
                    scaling_key="routed_scaling_factor", group_keys=("n_group", "topk_group")),
    router_biases=("gate.e_score_correction_bias",),
    shared_experts=("shared_experts.",),
    first_dense_key="first_k_dense_replace",
    mtp_key="num_nextn_predict_layers",
    linear_shapes=GQA + swiglu("mlp.", "intermediate_size")
    + swiglu("mlp.shared_experts.", "moe_intermediate_size*n_shared_experts") + MTP_LINEARS,
    param_shapes=NORMS + QK_NORM_PER_HEAD + MTP_PARAMS,
    expert_intermediate_key="moe_intermediate_size",
)

TABLE: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="minimax_m2",
        architectures=("MiniMaxM2ForCausalLM",),
        model_type="minimax_m2",
        num_experts_keys=("num_local_experts", "num_experts"),
        moe_disk="block_sparse_moe",
        moe_module="mlp",
        projections=SWIGLU_W,
        routing=Routing(scoring="sigmoid", bias_for_choice=True, renormalize=True),
        router_biases=("e_score_correction_bias",),
        disk_to_memory=((".block_sparse_moe.", ".mlp."),),
        linear_shapes=GQA,
        param_shapes=NORMS + QK_NORM_FULL,
        config_defaults=(),  # transformers' MiniMaxM2Config has its own head_dim default
        declared_mtp_keys=("use_mtp", "num_mtp_modules", "mtp_transformer_layers"),
        notes=("e_score_correction_bias lives on the MoE block, not the router",),
    ),
    ArchSpec(
        family="mixtral",
        architectures=("MixtralForCausalLM",),
        model_type="mixtral",
        num_experts_keys=("num_local_experts", "num_experts"),
        moe_disk="block_sparse_moe",
        moe_module="mlp",
        projections=SWIGLU_W,
        routing=Routing(scoring="softmax", renormalize=True),
        disk_to_memory=((".block_sparse_moe.", ".mlp."),),
        linear_shapes=GQA,
        param_shapes=NORMS,
    ),
    QWEN3_MOE,
    # Qwen2-MoE: Qwen3-MoE's layout plus a gated shared expert (never pruned)
    replace(QWEN3_MOE, family="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe",
            shared_experts=("shared_expert.", "shared_expert_gate."),
            linear_shapes=QWEN3_MOE.linear_shapes + swiglu("mlp.shared_expert.", "shared_expert_intermediate_size")
            + (("mlp.shared_expert_gate", ("1", "hidden_size")),)),
    ArchSpec(
        family="olmoe",
        architectures=("OlmoeForCausalLM",),
        model_type="olmoe",
        num_experts_keys=("num_experts", "num_local_experts"),
        moe_disk="mlp",
        moe_module="mlp",
        projections=SWIGLU_PROJ,
        routing=Routing(scoring="softmax", renormalize="norm_topk_prob"),
        linear_shapes=GQA,
        param_shapes=NORMS + QK_NORM_FULL,
    ),
    GLM4_MOE,
    # DeepSeek-V3 / Kimi-K2 route, share experts and store MTP layers exactly as GLM-4.x does (MLA
    # attention differs, but that lives in transformers' decoder layer)
    replace(GLM4_MOE, family="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_type="deepseek_v3",
            linear_shapes=MLA + GLM4_MOE.linear_shapes[len(GQA):],
            param_shapes=NORMS + (("self_attn.q_a_layernorm.weight", ("q_lora_rank",)),
                                  ("self_attn.kv_a_layernorm.weight", ("kv_lora_rank",))) + MTP_PARAMS),
)

TABLE = TABLE + (
    ArchSpec(
        family="ernie4_5_moe",
        architectures=("Ernie4_5_MoeForCausalLM",),
        model_type="ernie4_5_moe",
        num_experts_keys=("moe_num_experts",),
        moe_disk="mlp",
        moe_module="mlp",
        projections=SWIGLU_PROJ,
        routing=Routing(scoring="softmax", bias_for_choice=True, renormalize=True),
        router_biases=("moe_statics.e_score_correction_bias",),
        router_bias_axis=1,
        shared_experts=("shared_experts.",),
        disk_to_memory=((".mlp.moe_statics.", ".mlp.gate.moe_statics."),),
        sparse_step_key="moe_layer_interval",
        start_key="moe_layer_start_index",
        end_key="moe_layer_end_index",
        top_k_key="moe_k",
        linear_shapes=GQA + swiglu("mlp.", "intermediate_size")
        + swiglu("mlp.shared_experts.", "moe_intermediate_size*moe_num_shared_experts"),
        param_shapes=NORMS,
        expert_intermediate_key="moe_intermediate_size",
        router_bias_shape=("1", "E"),
        notes=("e_score_correction_bias is [1, E] (one group) and follows its experts along axis 1",),
    ),
    ArchSpec(
        family="gpt_oss",
        architectures=("GptOssForCausalLM",),
        model_type="gpt_oss",
        num_experts_keys=("num_local_experts", "num_experts"),
        moe_disk="mlp",
        moe_module="mlp",
        projections={},
        routing=Routing(scoring="softmax", renormalize=True),
        router_weight="router.weight",
        router_biases=("router.bias",),
        router_module="router",
        fused_on_disk=("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj",
                       "experts.down_proj_bias"),
        experts_transposed=True,
        linear_shapes=GQA,
        param_shapes=NORMS + (("self_attn.sinks", ("num_attention_heads",)),
                              ("{moe}.experts.gate_up_proj", ("E", "hidden_size", "2*intermediate_size")),
                              ("{moe}.experts.gate_up_proj_bias", ("E", "2*intermediate_size")),
                              ("{moe}.experts.down_proj", ("E", "intermediate_size", "hidden_size")),
                              ("{moe}.experts.down_proj_bias", ("E", "hidden_size"))),
        config_defaults=(),  # transformers' GptOssConfig has its own head_dim default
        unsupported_suffixes=(("_blocks", "MXFP4 expert weights: dequantise the release to bf16 first "
                               "(transformers Mxfp4Config(dequantize=True)); MXFP4 surgery is not supported"),),
        notes=("experts are stored fused on disk ([E, ...], interleaved gate/up, per-expert biases); "
               "softmax over the top-k router logits",),
    ),
)

BY_ARCHITECTURE: dict[str, ArchSpec] = {a: spec for spec in TABLE for a in spec.architectures}
