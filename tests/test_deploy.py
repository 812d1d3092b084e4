"""Deployable exports: uniform (plain family checkpoints), heterogeneous (per_layer_config + modeling_atp.py),
rounded widths, loading without atp, peft on a pruned model."""
import json
import warnings

import pytest
import torch

from atp.arch import ARCHS
from atp.errors import ATPError
from atp.export import MODELING_FILE, build_pruned, layer_widths, load_pruned, save_pruned
from atp.generator import DecisionGenerator
from atp.kinds import KINDS
from atp.options import ATPConfig
from atp.space import HeadMLPSpace, ShapeRule
from atp.train import train
from helpers import FAMILIES, assert_loads_without_atp, ids, masked_logits, random_gates, tiny_model, with_lora

FAMILY_CLASS = {family: f"{arch.prefix}ForCausalLM" for family, arch in ARCHS.items()}


def scores_for(space, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in space.gate_shapes.items()}


def check_uniform(space, gates):
    heads = gates["heads"].reshape(space.num_layers, space.num_kv_heads, space.heads_per_kv)
    per_group = heads.sum(dim=2)
    kept_groups = per_group[per_group > 0]
    assert torch.all(kept_groups == kept_groups[0]), "query heads per KV head differ"
    assert len(set((per_group > 0).sum(dim=1).tolist())) == 1, "kept KV heads differ between layers"
    assert len(set(gates["mlp"].sum(dim=1).tolist())) == 1, "MLP widths differ between layers"


def test_uniform_projection_keeps_best_scored_structures():
    space = HeadMLPSpace.from_config(tiny_model("llama", True).config, mlp_block=4)
    hard, scores = random_gates(space, keep=0.5), scores_for(space)
    projected = ShapeRule(uniform=True).project(space, hard, scores)
    check_uniform(space, projected)
    # kept counts stay close to the free decisions' mean
    assert abs(projected["mlp"].sum(1)[0] - hard["mlp"].sum(1).float().mean()) <= 0.5
    # within a layer, every kept MLP block outscores every pruned one
    for layer in range(space.num_layers):
        kept = scores["mlp"][layer][projected["mlp"][layer] > 0]
        dropped = scores["mlp"][layer][projected["mlp"][layer] == 0]
        assert dropped.numel() == 0 or kept.min() > dropped.max()


def test_uniform_head_counts_divide_the_hidden_size_for_llama():
    # hidden 54 with 6 heads of dim 8 in 2 KV groups of 3: 4 heads (2 groups x 2) would not divide 54
    config = tiny_model("llama", True, hidden_size=54).config
    space = HeadMLPSpace.from_config(config, mlp_block=4)
    options = KINDS["heads"].head_options(space)
    assert (2, 2) not in options and (1, 3) in options and (2, 3) in options
    hard = space.full_gates()
    hard["heads"][:, [2, 5]] = 0  # 4 of 6 heads kept: the nearest allowed count is 3 (one whole KV group)
    projected = ShapeRule(uniform=True).project(space, hard, scores_for(space))
    assert projected["heads"].sum(1).tolist() == [3.0] * space.num_layers
    assert HeadMLPSpace.from_config(tiny_model("qwen2", True, hidden_size=54).config).heads_must_divide_hidden is False


def test_round_to_gives_multiples_or_full_width():
    space = HeadMLPSpace.from_config(tiny_model("llama", True, intermediate_size=70).config, mlp_block=4)
    hard, scores = random_gates(space, keep=0.5), scores_for(space)
    projected = ShapeRule(round_to=8).project(space, hard, scores)
    for layer in range(space.num_layers):
        width = int(KINDS["mlp"].channel_mask(space, projected["mlp"][layer]).sum())
        assert width % 8 == 0 or width == 70
    assert torch.equal(projected["heads"], hard["heads"])  # head counts are not rounded


def test_rule_errors_are_clear():
    space = HeadMLPSpace.from_config(tiny_model("llama", True).config, mlp_block=4)
    with pytest.raises(ATPError, match="multiple of --mlp-block 4"):
        ShapeRule(round_to=6).check(space)
    with pytest.raises(ATPError, match="positive"):
        ShapeRule(round_to=-8).check(space)


@pytest.mark.parametrize("rule", [ShapeRule(uniform=True), ShapeRule(round_to=8), ShapeRule(uniform=True, round_to=8)])
def test_generator_decisions_obey_the_rule_and_hit_the_target(rule):
    space = HeadMLPSpace.from_config(tiny_model("llama", True, intermediate_size=256).config, mlp_block=4)
    gen = DecisionGenerator(space, hidden=16, seed=1, rule=rule)
    with torch.no_grad():
        for p in gen.heads.parameters():
            p.normal_(0, 1.0)  # spread the logits as training would
    reached = gen.calibrate_offset(space.remaining_ratio, 0.6)
    decisions = gen.decisions()
    if rule.uniform:
        check_uniform(space, decisions)
    if rule.round_to:
        assert all(int(KINDS["mlp"].channel_mask(space, row).sum()) % 8 == 0 for row in decisions["mlp"])
    assert abs(reached - 0.6) < 0.03 and reached == pytest.approx(float(space.remaining_ratio(decisions)))
    gen.train()
    sampled = gen(step=5)
    if rule.uniform:  # training samples obey the rule too, and gradients still reach the generator
        hard = {k: v.detach().round() for k, v in sampled.items()}  # straight-through: 0/1 up to float rounding
        assert all(torch.allclose(sampled[k].detach(), hard[k], atol=1e-6) for k in hard)
        check_uniform(space, hard)
    sum(v.sum() for v in sampled.values()).backward()
    assert gen.inputs.grad is not None and gen.inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_is_the_family_checkpoint(family, tmp_path, tokenizer):
    model = with_lora(tiny_model(family, True))
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = ShapeRule(uniform=True).project(space, random_gates(space, keep=0.6), scores_for(space))
    x = ids()
    masked = masked_logits(model, space, gates, x)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    out = save_pruned(pruned, tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILY_CLASS[family]]
    assert "per_layer_config" not in config and "auto_map" not in config and not (out / MODELING_FILE).exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == FAMILY_CLASS[family]
    assert config["num_attention_heads"] == int(gates["heads"][0].sum())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)


def test_heterogeneous_config_uses_per_layer_config(tmp_path, tokenizer):
    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "atp_llama" and (out / MODELING_FILE).exists()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_atp.AtpLlamaForCausalLM"
    assert "kv_map" in config  # every per-layer key has a global value, for generic config readers
    widths = layer_widths(space.kept_structure(gates))
    for layer, expected in enumerate(widths):
        given = {**{k: config[k] for k in expected if k in config}, **config["per_layer_config"].get(str(layer), {})}
        assert given.get("kv_map") == expected["kv_map"]
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            assert given[key] == expected[key]


@pytest.mark.parametrize("family", FAMILIES)
def test_heterogeneous_export_loads_with_remote_code_alone(family, tmp_path, tokenizer):
    """A subprocess that never imports atp loads the export with trust_remote_code, generates with the KV cache,
    runs sdpa, and takes LoRA from peft."""
    model = tiny_model(family, True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    gates["heads"][2] = 0  # a layer with no attention at all
    x = ids()
    masked = masked_logits(model, space, gates, x)
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    assert_loads_without_atp(out, x, masked, tmp_path)


def test_atp_import_registers_the_pruned_types(tmp_path, tokenizer):
    model = tiny_model("qwen2", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    gates["heads"][2] = 0  # 0-size projections: built without torch's "zero-element tensors" warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    (out / MODELING_FILE).unlink()  # no remote code available: the registered classes must do
    from transformers import AutoModelForCausalLM

    x = ids()
    with warnings.catch_warnings(record=True) as loading:
        warnings.simplefilter("always")
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not [w for w in caught + loading if "zero-element" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked_logits(model, space, gates, x), rtol=0, atol=1e-5)
    assert type(load_pruned(out)).__name__ == "AtpQwen2ForCausalLM"


def _run(tiny_model_dir, train_file, out, **overrides):
    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                    max_steps=24, batch_size=2, max_length=48, mlp_block=4, sparsity=0.4, generator_lr=0.05,
                    save_every=0, **overrides)
    return train(cfg, progress=False)


def test_train_uniform_exports_a_plain_checkpoint(tiny_model_dir, train_file, tmp_path):
    report = _run(tiny_model_dir, train_file, tmp_path / "u", uniform=True)
    assert report["export_format"] == "uniform" and report["logits_check"]["passed"]
    config = json.loads((tmp_path / "u" / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and "per_layer_config" not in config
    assert abs(report["prunable_sparsity"] - 0.4) < 0.06  # uniform widths move in whole-layer steps


def test_train_round_to(tiny_model_dir, train_file, tmp_path):
    report = _run(tiny_model_dir, train_file, tmp_path / "r", round_to=8)
    assert report["logits_check"]["passed"] and abs(report["prunable_sparsity"] - 0.4) < 0.02
    assert all(layer["intermediate_size"] % 8 == 0 or layer["intermediate_size"] == 64 for layer in report["layers"])


def test_exports_of_atp_0_1_load(tmp_path, tokenizer):
    """atp 0.1.0 wrote widths under atp_pruning.layers in the dense family config; those folders still load."""
    from atp.models import load_model

    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    legacy = model.config.to_dict()
    legacy["atp_pruning"] = {"layers": [
        {"num_heads": len(k["heads"]), "num_kv_heads": len(k["kv_heads"]), "kv_map": k["kv_map"],
         "intermediate_size": len(k["channels"]), "kept_heads": k["heads"]} for k in space.kept_structure(gates)]}
    (out / "config.json").write_text(json.dumps(legacy))
    (out / MODELING_FILE).unlink()
    loaded, _ = load_model(str(out))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked_logits(model, space, gates, x), rtol=0, atol=1e-5)


def test_float64_recheck_is_exact_and_catches_wrong_slices():
    from atp.verify import float64_diff

    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates, other = random_gates(space, seed=0), random_gates(space, seed=5)
    pruned = build_pruned(model, space.kept_structure(gates))
    probe = {"input_ids": ids(), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    assert float64_diff(model, space, gates, pruned, probe) < 1e-10
    assert float64_diff(model, space, other, pruned, probe) > 1e-3  # masks that do not match the export


def test_export_check_falls_back_to_float64(tiny_model_dir, train_file, tmp_path):
    # fp32 alone cannot pass; the masked model is what the float64 recheck compares with, so no compaction
    report = _run(tiny_model_dir, train_file, tmp_path / "z", check_tolerance=0.0, compact=False)
    check = report["logits_check"]
    assert check["passed"]
    if check["max_abs_logit_diff"] > 0:
        assert check["float64_diff"] < 1e-6 * check["max_abs_logit"]
