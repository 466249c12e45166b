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
    notes: tuple[str, ...] = field(default=())


SWIGLU_W = {"gate": "w1", "up": "w3", "down": "w2"}
SWIGLU_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

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
    ),
    QWEN3_MOE,
    # Qwen2-MoE: Qwen3-MoE's layout plus a gated shared expert (never pruned)
    replace(QWEN3_MOE, family="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe",
            shared_experts=("shared_expert.", "shared_expert_gate.")),
    ArchSpec(
        family="olmoe",
        architectures=("OlmoeForCausalLM",),
        model_type="olmoe",
        num_experts_keys=("num_experts", "num_local_experts"),
        moe_disk="mlp",
        moe_module="mlp",
        projections=SWIGLU_PROJ,
        routing=Routing(scoring="softmax", renormalize="norm_topk_prob"),
    ),
    GLM4_MOE,
    # DeepSeek-V3 / Kimi-K2 route, share experts and store MTP layers exactly as GLM-4.x does (MLA
    # attention differs, but that lives in transformers' decoder layer)
    replace(GLM4_MOE, family="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_type="deepseek_v3"),
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
        unsupported_suffixes=(("_blocks", "MXFP4 expert weights: dequantise the release to bf16 first "
                               "(transformers Mxfp4Config(dequantize=True)); MXFP4 surgery is not supported"),),
        notes=("experts are stored fused on disk ([E, ...], interleaved gate/up, per-expert biases); "
               "softmax over the top-k router logits",),
    ),
)

BY_ARCHITECTURE: dict[str, ArchSpec] = {a: spec for spec in TABLE for a in spec.architectures}
