"""Gate kinds: the registry and --space, single-kind spaces, mask modes, the baseline method registry."""
import dataclasses

import pytest
import torch

from atp.baselines import ALLOCATION, METHODS, SCORED, check_method, fixed_decisions
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.kinds import KINDS, MASK_MODES, HeadKind, check_kinds
from atp.masking import GateController
from atp.options import ATPConfig, fingerprint
from atp.regularization import group_sq_norms, proximal_step
from atp.space import PruningSpace, ShapeRule
from atp.train import train
from helpers import (
    FAMILIES,
    frozen_removed,
    ids,
    lm_batches,
    logits_under,
    random_gates,
    short_cfg,
    tiny_model,
    with_lora,
)


def test_registry_and_space_option(tiny_model_dir):
    from atp.cli import build_parser, config_from_args

    assert list(KINDS) == ["blocks", "hidden", "heads", "qk-dims", "mlp"] and all(k.exact for k in KINDS.values())
    assert check_kinds(["mlp", "heads", "mlp"]) == ("heads", "mlp")  # registry order, each once
    with pytest.raises(ATPError, match="unknown kinds 'channels'; choose one or more of: blocks, hidden, heads, "
                                       "qk-dims, mlp"):
        check_kinds(["channels"])
    with pytest.raises(ATPError, match="no kind given"):
        ATPConfig(space=[]).validate()
    args = build_parser().parse_args(["prune", "--model", str(tiny_model_dir), "--space", "heads"])
    cfg = config_from_args(args, ATPConfig)
    assert cfg.space == ["heads"] and ATPConfig().space == ["heads", "mlp"]
    # another space is another run (test_train: the default leaves older runs' fingerprints alone)
    assert fingerprint(cfg) != fingerprint(dataclasses.replace(cfg, space=["heads", "mlp"]))


@pytest.mark.parametrize("kinds", [("heads",), ("mlp",)])
def test_single_kind_space_counts_masks_and_export_exactly(kinds, tmp_path, tokenizer):
    model = with_lora(tiny_model("qwen2", True))
    full = PruningSpace.from_config(model.config, mlp_block=4)
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=kinds)
    assert list(space.gate_shapes) == list(kinds)
    assert (space.prunable_params(), space.total_params()) == (full.prunable_params(), full.total_params())
    gates = {k: v for k, v in random_gates(full).items() if k in kinds}
    as_full = {**full.full_gates(), **gates}  # the other kind stays dense
    assert float(space.remaining_prunable(gates)) == float(full.remaining_prunable(as_full))
    kept, dense = space.kept_structure(gates), full.kept_structure(full.full_gates())
    for layer, layer_full in zip(kept, full.kept_structure(as_full)):
        assert layer == layer_full
    other = "channels" if kinds == ("heads",) else "heads"
    assert all(layer[other] == d[other] for layer, d in zip(kept, dense))
    assert set(group_sq_norms(model, space)) == ({"heads", "kv"} if kinds == ("heads",) else {"mlp"})
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    assert torch.equal(masked, logits_under(model, full, as_full, x, "both"))
    out = save_pruned(build_pruned(model.merge_and_unload(), kept), tokenizer, tmp_path / "m")
    expected = space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    assert count_safetensors_params(out) == expected
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(out)(x).logits, masked, rtol=0, atol=1e-5)


def test_round_to_needs_the_mlp_kind():
    space = PruningSpace.from_config(tiny_model("llama", True).config, mlp_block=4, kinds=["heads"])
    with pytest.raises(ATPError, match="does not prune MLP channels"):
        ShapeRule(round_to=8).check(space)
    ShapeRule(uniform=True).check(space)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_mode_equals_both_once_pruned_lora_is_zero(family):
    model = with_lora(tiny_model(family, True, **({"attention_bias": True} if family == "qwen3" else {})))
    space = PruningSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    x = ids()
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    assert not torch.allclose(both, frozen, atol=1e-4)  # the LoRA pieces of pruned groups still act
    with torch.no_grad():  # frozen mode masks exactly the frozen weights of the pruned structures
        torch.testing.assert_close(frozen, frozen_removed(model, space, gates)(x).logits, rtol=0, atol=1e-6)
    proximal_step(model, space, gates, threshold=1e9)  # exact zeros in every pruned group's LoRA pieces
    norms = group_sq_norms(model, space)
    kv = KINDS["heads"].kv_gates(space, gates["heads"])
    pruned = {"heads": gates["heads"] == 0, "kv": kv == 0, "mlp": gates["mlp"] == 0}
    assert all(bool((norms[g][pruned[g]] == 0).all()) and bool((norms[g][~pruned[g]] > 0).all()) for g in norms)
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    assert torch.equal(both, frozen)
    pruned_model = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    with torch.no_grad():
        torch.testing.assert_close(pruned_model(x).logits, frozen, rtol=0, atol=1e-5)


def test_no_mask_lora_masks_only_the_frozen_output_path():
    model = with_lora(tiny_model("llama", True))
    space = PruningSpace.from_config(model.config, mlp_block=4)
    gates, x = random_gates(space), ids()
    ctl = GateController(model, space, mask_lora=False)
    assert ctl.mode == "frozen-output" and set(MASK_MODES) == {"both", "frozen", "frozen-output", "frozen-qkv"}
    ctl.remove()
    ablation = logits_under(model, space, gates, x, "frozen-output")
    with torch.no_grad():
        torch.testing.assert_close(ablation, frozen_removed(model, space, gates, output_only=True)(x).logits,
                                   rtol=0, atol=1e-6)
    assert not torch.allclose(ablation, logits_under(model, space, gates, x, "both"), atol=1e-4)
    with pytest.raises(ATPError, match="unknown mask mode 'lora'"):
        GateController(model, space, mode="lora")


def test_method_registry_and_single_kind_baselines(tokenizer):
    assert list(METHODS) == ["atp", "taylor", "magnitude", "activation", "random", "frozen-generator"]
    assert SCORED == ("taylor", "magnitude", "activation", "random")
    assert ALLOCATION["activation"] == "global" and ALLOCATION["frozen-generator"] == "learned"
    assert check_method("taylor").calibration and not check_method("magnitude").calibration
    model = tiny_model("llama", True)
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=["heads"])
    for method in SCORED:
        gates, info = fixed_decisions(method, model, space, 0.2, lm_batches(tokenizer), seed=0, device="cpu")
        assert set(gates) == {"heads"} and info["allocation"] == ALLOCATION[method]
        assert abs(float(space.remaining_ratio(gates)) - 0.8) <= 0.03  # whole heads of 8 x 48: coarse steps
    with pytest.raises(ATPError, match="has no importance score"):
        fixed_decisions("frozen-generator", model, space, 0.2, [], seed=0, device="cpu")


@pytest.mark.parametrize("kinds, sparsity", [(["heads"], 0.2), (["mlp"], 0.4)])
def test_train_with_one_kind(kinds, sparsity, tiny_model_dir, train_file, tmp_path):
    report = train(short_cfg(tiny_model_dir, train_file, tmp_path / "run", space=kinds, sparsity=sparsity),
                   progress=False)
    assert report["logits_check"]["passed"]
    assert count_safetensors_params(tmp_path / "run" / "model") == report["exported_params"]
    assert abs(report["prunable_sparsity"] - sparsity) <= 0.04
    if kinds == ["heads"]:
        assert all(layer["intermediate_size"] == 64 for layer in report["layers"])
    else:
        assert all((layer["num_attention_heads"], layer["num_key_value_heads"]) == (6, 2) for layer in report["layers"])
    with pytest.raises(ATPError, match="cannot be reached"):
        train(short_cfg(tiny_model_dir, train_file, tmp_path / "far", space=["heads"], sparsity=0.5), progress=False)


class NotExactHeads(HeadKind):
    exact = False


def test_export_check_makes_no_float64_claim_for_a_non_exact_kind(monkeypatch, tiny_model_dir, train_file, tmp_path):
    import atp.verify

    monkeypatch.setitem(KINDS, "heads", NotExactHeads())
    assert not PruningSpace.from_config(tiny_model("llama", True).config).exact
    monkeypatch.setattr(atp.verify, "float64_diff", lambda *a: pytest.fail("float64 recheck of a non-exact space"))
    try:
        report = train(short_cfg(tiny_model_dir, train_file, tmp_path / "run", sparsity=0.4, check_tolerance=0.0),
                       progress=False)
    except ATPError as err:  # fp32 alone cannot pass a zero tolerance, and no float64 claim may rescue it
        assert "not exact" in str(err)
    else:
        assert report["logits_check"]["max_abs_logit_diff"] == 0
