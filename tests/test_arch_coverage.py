"""Architecture coverage beyond the per-family equivalence tests: group-limited routing keeps its
groups valid, FP8 block-scaled checkpoints of other families calibrate and rewrite, and variants we
cannot handle are refused in one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import make_plan, validate_plan
from surgery.rewrite import rewrite_checkpoint, verify_checkpoint
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from tests.oracle import make_batch, oracle_saliency


def fake_saliency(model: MoEModel, scores: list[float]) -> dict:
    layer = {k: list(scores) for k in ("frequency", "weighted_frequency", "ean", "reap", "max_activation")}
    return {"model": fingerprint(model.ckpt), "layers": {str(i): layer for i in model.moe_layers}}


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_group_limited_routing_keeps_equal_counts_per_group(family, tiny_checkpoint):
    with Checkpoint(tiny_checkpoint(family)) as ckpt:
        model = MoEModel(ckpt)
        assert model.routing_facts()["n_group"] == 2  # 8 experts in 2 groups of 4
        # group 0 outscores group 1 everywhere: a global top-4 would empty group 1
        scores = [9.0, 8.0, 7.0, 6.0, 4.0, 3.0, 2.0, 1.0]
        plan = make_plan(fake_saliency(model, scores), model, "reap", 0.5)
        for entry in plan["layers"].values():
            assert entry["keep"] == [0, 1, 4, 5]
        validate_plan(plan, model)
        for entry in plan["layers"].values():
            entry["keep"], entry["drop"] = [0, 1, 2, 4], [3, 5, 6, 7]
        with pytest.raises(SurgeryError, match=r"routing groups"):
            validate_plan(plan, model)
        with pytest.raises(SurgeryError, match="ratio"):  # 8 -> 2 leaves 1 per group: top-2 group scores fail
            make_plan(fake_saliency(model, scores), model, "reap", 0.75)


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoints_of_other_families(family, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(family, fp8=True)
    ids, mask = make_batch(256, [13, 6, 9, 13], seed=9)
    opts = CalibrateOptions(batch_size=2, dtype="float32", device="cpu", progress=False)
    sal = Calibrator(src, tmp_path / "w", opts).run(
        CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"t": "0"}, {}))
    oracle, _ = oracle_saliency(src, ids, mask)
    for layer, ref in oracle.items():
        np.testing.assert_array_equal(sal["layers"][str(layer)]["frequency"], ref["frequency"])
        np.testing.assert_allclose(sal["layers"][str(layer)]["reap"], ref["reap"], rtol=1e-4)
    with Checkpoint(src) as ckpt:
        plan = make_plan(sal, MoEModel(ckpt), "reap", 0.5)
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    verify_checkpoint(out)
    import json

    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    with Checkpoint(src) as a, Checkpoint(out) as b:
        layer = MoEModel(a).moe_layers[0]
        kept = sorted(plan["layers"][str(layer)]["keep"])
        for new, old in enumerate(kept):  # FP8 weights and their scales follow their expert, bytes intact
            for suffix in ("weight", "weight_scale_inv"):
                name = MoEModel(a).expert_tensor_name(layer, old, "down", suffix)
                renamed = MoEModel(b).expert_tensor_name(layer, new, "down", suffix)
                assert b.info(renamed).dtype == a.info(name).dtype
                assert b.read_bytes(b.info(renamed)) == a.read_bytes(a.info(name))
        assert any(t.dtype == "F8_E4M3" for t in b.tensors.values())


def test_mxfp4_gpt_oss_is_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "mxfp4"
    shutil.copytree(tiny_checkpoint("gpt_oss"), src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(8, 4, 2, dtype=torch.uint8)
    save_file(tensors, shard, metadata={"format": "pt"})
    import json

    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.experts.gate_up_proj_blocks"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="MXFP4") as err:
        Calibrator(src, tmp_path / "w", CalibrateOptions(progress=False))
    assert "\n" not in str(err.value)


def with_mtp_layer(src, dst):
    """A copy of a tiny GLM checkpoint with an MTP module at layer N (= num_hidden_layers), laid out as
    GLM-4.x / DeepSeek-V3 store it: a full MoE decoder layer plus enorm, hnorm, eh_proj, shared_head."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    tensors = {}
    for shard in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(shard))
    prefix = f"model.layers.{n - 1}."
    mtp = {f"model.layers.{n}." + k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        mtp[f"model.layers.{n}.{name}"] = torch.ones(hidden)
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden) / hidden
    save_file(mtp, dst / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config))
    return dst, n


def test_mtp_layers_need_a_plan_entry_or_drop_mtp(tiny_checkpoint, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    src, n = with_mtp_layer(tiny_checkpoint("glm4_moe"), tmp_path / "glm-mtp")
    with Checkpoint(src) as ckpt:
        model = MoEModel(ckpt)
        assert model.mtp_expert_layers() == [n]
        plan = make_plan({}, model, "random", 0.5, seed=1)
        dropping = make_plan({}, model, "random", 0.5, seed=1, drop_mtp=True)
    assert str(n) in plan["layers"] and str(n) not in dropping["layers"]
    del plan["layers"][str(n)]  # e.g. a plan from a calibration that did not score the MTP layer
    with pytest.raises(SurgeryError, match="--drop-mtp"):
        rewrite_checkpoint(src, plan, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused" / "config.json").exists()
    out = tmp_path / "out"
    rewrite_checkpoint(src, dropping, out, progress=False)
    verify_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 4
    with Checkpoint(out) as ckpt:
        assert not any(name.startswith(f"model.layers.{n}.") for name in ckpt.tensors)
        assert any(name.startswith(f"model.layers.{n - 1}.") for name in ckpt.tensors)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_mtp_layers_calibrate_by_their_own_saliency_and_prune(tiny_checkpoint, tmp_path):
    """The MTP module (a copy of the last layer's weights plus enorm/hnorm/eh_proj) is scored on
    h' = eh_proj(cat(enorm(embed(t[i+1])), hnorm(h[i]))) through its decoder layer, exactly as the
    in-memory computation gives, and its experts are pruned by that saliency."""
    import json

    from tests.oracle import STATS, load_model, moe_blocks, route
    from tests.oracle import expert_output as oracle_expert

    src, n = with_mtp_layer(tiny_checkpoint("glm4_moe"), tmp_path / "glm-mtp")
    ids, mask = make_batch(256, [13, 6, 9, 13], seed=12)
    opts = CalibrateOptions(batch_size=3, dtype="float32", device="cpu", progress=False)
    sal = Calibrator(src, tmp_path / "w", opts).run(
        CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"t": "0"}, {}))
    assert str(n) in sal["layers"]

    # in memory: the whole model, the last layer's pre-norm output and kwargs, then the MTP step by hand
    model = load_model(src)
    captured = {}
    last = model.model.layers[n - 1]
    last.register_forward_pre_hook(lambda m, a, kw: captured.update(kw=kw), with_kwargs=True)
    last.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        from safetensors.torch import load_file

        tensors = load_file(src / "model-mtp.safetensors")
        eps = model.config.rms_norm_eps

        def rms(x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        emb = model.model.embed_tokens(nxt)
        x = torch.cat([rms(emb, tensors[f"model.layers.{n}.enorm.weight"]),
                       rms(captured["h"], tensors[f"model.layers.{n}.hnorm.weight"])], -1)
        x = x @ tensors[f"model.layers.{n}.eh_proj.weight"].T
        block = moe_blocks(model)[n - 1]  # the MTP layer's weights are a copy of this layer's
        inputs = {}
        handle = block.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0]))
        last(x, **{k: v for k, v in captured["kw"].items() if k not in ("hidden_states", "past_key_values")})
        handle.remove()
        flat = inputs["x"].reshape(-1, inputs["x"].shape[-1])
        scored = (mask.bool() & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool()).reshape(-1)
        index, weights = route(block, flat[scored])
        ref = {k: np.zeros(8) for k in STATS}
        for j in range(8):
            tok, pos = torch.where(index == j)
            out = oracle_expert(block.experts, j, flat[scored][tok]).double()
            g, norms = weights[tok, pos], out.norm(dim=-1)
            ref["frequency"][j] = tok.numel()
            ref["ean"][j] = float(norms.sum())
            ref["reap"][j] = float((g * norms).sum()) / tok.numel() if tok.numel() else 0.0
    got = sal["layers"][str(n)]
    np.testing.assert_array_equal(got["frequency"], ref["frequency"])
    np.testing.assert_allclose(got["ean"], ref["ean"], rtol=1e-4)
    np.testing.assert_allclose(got["reap"], ref["reap"], rtol=1e-4, atol=1e-9)
    assert got["frequency"] != sal["layers"][str(n - 1)]["frequency"]  # really its own saliency

    with Checkpoint(src) as ckpt:
        plan = make_plan(sal, MoEModel(ckpt), "reap", 0.5)
    assert str(n) in plan["layers"]
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    verify_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["n_routed_experts"] == 4
    kept = sorted(plan["layers"][str(n)]["keep"])
    with Checkpoint(src) as a, Checkpoint(out) as b:
        for new, old in enumerate(kept):
            name = f"model.layers.{n}.mlp.experts.{{}}.down_proj.weight"
            assert b.read_bytes(b.info(name.format(new))) == a.read_bytes(a.info(name.format(old)))
        assert b.info(f"model.layers.{n}.mlp.gate.weight").shape[0] == 4
