"""Issue 15: the faithful LoRA-aware forward and a group lasso that reaches exact zeros by the freeze."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from atp.regularization import group_sq_norms, pruned_norms, ramp_proximal_step
from atp.space import PruningSpace
from atp.train import train
from helpers import LORA_TARGETS, cfg_for, tiny_model


def lora_model(seed=0):
    model = get_peft_model(tiny_model("llama", True, seed=seed), LoraConfig(r=4, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


def test_ramp_proximal_step_shrinks_only_pruned_groups_and_zeroes_them_at_fraction_one():
    model = lora_model()
    space = PruningSpace.from_config(model.config, mlp_block=4)
    gates = space.full_gates()
    gates["heads"][0, :3] = 0  # KV head 0 of layer 0 goes with its three query heads
    gates["mlp"][1, 2:5] = 0
    before = {k: v.clone() for k, v in group_sq_norms(model, space).items()}
    largest = pruned_norms(model, space, gates)
    ramp_proximal_step(model, space, gates, 0.5)
    after = group_sq_norms(model, space)
    for name, pruned in ((("heads", (0, slice(0, 3))), ("kv", (0, 0)), ("mlp", (1, slice(2, 5))))):
        old, new = before[name][pruned].sqrt(), after[name][pruned].sqrt()
        threshold = 0.5 * largest[name]["max"]
        assert torch.allclose(new, (old - threshold).clamp(min=0), atol=1e-6), name
    kept = torch.ones_like(before["mlp"], dtype=torch.bool)
    kept[1, 2:5] = False
    assert torch.equal(after["mlp"][kept], before["mlp"][kept])  # kept groups untouched
    assert torch.equal(after["heads"][1:], before["heads"][1:])
    ramp_proximal_step(model, space, gates, 1.0)
    assert all(v["sum"] == 0.0 for v in pruned_norms(model, space, gates).values())
    assert after["heads"][0, 3:].min() > 0  # still untouched


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_pruned_lora_learns_in_the_generator_phase_and_is_zero_from_the_freeze(lam, tiny_model_dir, train_file,
                                                                               tmp_path):
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=10, generator_frac=0.6, log_every=1, lam=lam)
    assert cfg.lora_mask == "frozen" and cfg.lasso == "ramp"  # the defaults
    report = train(cfg, progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert report["logits_check"]["passed"] and abs(report["prunable_sparsity"] - 0.4) < 0.02
    assert report["pruned_lora_norm_before_freeze_cut"] > 0  # calibration at the freeze pruned groups with LoRA
    if lam:
        # the frozen-path-only mask leaves pruned structures' LoRA learning, the ramp shrinks it, and from the
        # freeze on every pruned group is exactly zero: the export removes nothing LoRA had learned
        assert any(r["group_lasso"] > 0 for r in log if r["step"] < 6)
        assert report["pruned_lora_norm_at_freeze"] == 0.0 and report["pruned_lora_group_norm_sum"] == 0.0
        assert all(r["group_lasso"] == 0.0 for r in log if r["step"] >= 6)
        assert [r["lasso_fraction"] for r in log if r["step"] in (3, 6, 7)] == [0.5, 1.0, 1.0]
    else:  # no lasso: the pruned groups' LoRA is cut abruptly at the freeze (compaction removes it with them)
        assert report["pruned_lora_norm_at_freeze"] > 0 and report["pruned_lora_group_norm_sum"] == 0.0
        assert report["compaction"]["step"] == 6


def _v_rows_after_training(tiny_model_dir, train_file, out, **kw):
    """LoRA-B rows of v_proj for KV head 0 of layer 0 after 6 steps with that KV head's query heads pruned
    from the start (the generator barely moves at this learning rate)."""
    from atp.train import PruneRecipe

    cfg = cfg_for(tiny_model_dir, train_file, out, max_steps=6, generator_frac=1.0, lam=0.0, generator_lr=1e-9, **kw)
    recipe = PruneRecipe(cfg, progress=False)
    recipe.setup()
    gates = recipe.space.full_gates()
    per_kv = recipe.space.heads_per_kv
    gates["heads"][0, :per_kv] = 0
    recipe.generator.decisions = lambda: gates
    recipe.train_loop(1)
    v = recipe.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight
    head_dim = recipe.space.head_dim
    return v[:head_dim], v[head_dim:]


def test_pruned_structures_lora_learns_only_under_the_frozen_path_mask(tiny_model_dir, train_file, tmp_path):
    # both paths masked (the ablation): the pruned KV head's LoRA gets no gradient and stays at zero
    pruned, kept = _v_rows_after_training(tiny_model_dir, train_file, tmp_path / "both", lora_mask="both")
    assert pruned.abs().max() == 0 and kept.abs().max() > 0
    # the faithful forward masks only its frozen weights: its LoRA keeps learning
    pruned, kept = _v_rows_after_training(tiny_model_dir, train_file, tmp_path / "frozen")
    assert pruned.abs().max() > 0 and kept.abs().max() > 0
