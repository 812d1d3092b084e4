"""Issue 34: the authors' search as one preset (--recipe paper) and fixed decisions from another run
(--decisions-from)."""
import dataclasses
import json
import math

import pytest
import torch

from atp.errors import ATPError
from atp.options import ATPConfig, fingerprint
from atp.schedule import Schedule
from atp.train import PruneRecipe, train
from helpers import cfg_for


def test_paper_recipe_sets_defaults_and_explicit_options_win():
    paper = ATPConfig(recipe="paper", max_length=96)
    assert (paper.lora_mask, paper.lasso, paper.lam, paper.target_warmup, paper.generator_lr, paper.generator_clip,
            paper.temperature, paper.generator_gates, paper.lora_decisions, paper.distill_generator,
            paper.calib_max_length) == ("frozen-qkv", "exp-ramp", 50000.0, 0.0, 1e-3, 1.0, 0.4, "soft", "sampled",
                                        False, 96)
    mine = ATPConfig(recipe="paper", lora_mask="frozen", lasso="ramp", generator_lr=1e-2, distill_generator=True,
                     calib_max_length=32)
    assert (mine.lora_mask, mine.lasso, mine.lam, mine.generator_lr, mine.distill_generator,
            mine.calib_max_length, mine.temperature) == ("frozen", "ramp", 1.0, 1e-2, True, 32, 0.4)
    default = ATPConfig()
    assert (default.lora_mask, default.lasso, default.lam, default.generator_gates) == ("frozen", "ramp", 1.0, "hard")
    assert default.calib_max_length is None  # max_length // 2, as before
    # the new options leave today's fingerprints alone at their defaults
    assert fingerprint(ATPConfig(recipe="default", generator_gates="hard", distill_generator=True)) == \
        fingerprint(ATPConfig())
    assert fingerprint(paper) != fingerprint(ATPConfig(max_length=96))
    with pytest.raises(ATPError, match="--recipe must be one of default, paper"):
        ATPConfig(recipe="authors").validate()


def test_cli_takes_the_recipe_and_the_boolean_flag(tiny_model_dir, train_file, tmp_path):
    from atp.cli import build_parser, config_from_args

    args = build_parser().parse_args(["prune", "--recipe", "paper", "--distill-generator", "--lasso", "ramp"])
    cfg = config_from_args(args, ATPConfig)
    assert cfg.distill_generator is True and cfg.lasso == "ramp" and cfg.lora_mask == "frozen-qkv"
    args = build_parser().parse_args(["prune", "--no-distill-generator"])
    assert config_from_args(args, ATPConfig).distill_generator is False


def test_exp_ramp_is_back_loaded_and_cuts_at_the_freeze():
    cfg = ATPConfig(recipe="paper", max_steps=100, generator_frac=0.5)
    s = Schedule.from_config(cfg)
    growth = [s.exp_growth(t) for t in (1, 25, 50, 51)]
    assert growth[0] == pytest.approx(math.expm1(0.02) / math.expm1(1)) and growth[2] == pytest.approx(1.0)
    assert growth[1] < 0.38 and growth[3] == 0.0  # (e^0.5 - 1) / (e - 1): a third of the final threshold halfway
    assert [s.lasso_fraction(t) for t in (1, 50, 51, 100)] == [0.0, 0.0, 1.0, 1.0]  # zeros from the freeze on
    assert s.target_at(1) == pytest.approx(0.6)  # the full target from the first step
    assert s.lora_mask_at(1) == "frozen-qkv" and s.lora_mask_at(51) == "both"


def test_frozen_qkv_masks_only_the_frozen_qkv_and_gate_up_outputs(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from atp.masking import GateController
    from atp.space import PruningSpace
    from helpers import LORA_TARGETS, tiny_model

    model = get_peft_model(tiny_model("llama", True), LoraConfig(r=4, target_modules=LORA_TARGETS))
    space = PruningSpace.from_config(model.config, mlp_block=4)
    controller = GateController(model, space, mode="frozen-qkv")
    gates = space.full_gates()
    gates["mlp"][0, 0] = 0
    controller.set(gates)
    seen = {}
    layer = model.base_model.model.model.layers[0]
    for role in ("gate_proj", "up_proj", "down_proj"):
        base = getattr(layer.mlp, role).base_layer
        base.register_forward_hook(lambda m, a, out, role=role: seen.__setitem__(role, (a[0], out)))
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert seen["gate_proj"][1][..., :4].abs().max() == 0 and seen["up_proj"][1][..., :4].abs().max() == 0
    assert seen["gate_proj"][1][..., 4:].abs().max() > 0
    # with LoRA at zero, the pruned channels' input to the frozen down_proj is zero, but nothing masks it there
    with torch.no_grad():
        layer.mlp.gate_proj.lora_B["default"].weight.fill_(0.1)
        layer.mlp.up_proj.lora_B["default"].weight.fill_(0.1)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert seen["down_proj"][0][..., :4].abs().max() > 0


def query_lora_norms(recipe) -> torch.Tensor:
    """Per layer and query head, the norm of its rows of q_proj's LoRA B (zero before LoRA learns anything)."""
    from atp.masking import decoder_layers

    space = recipe.space
    rows = [space.arch.projection(layer, "q").lora_B["default"].weight.detach().float()
            for layer in decoder_layers(recipe.peft_model)]
    return torch.stack([w.view(space.num_heads, -1).norm(dim=1) for w in rows])


def test_paper_recipe_pruned_lora_grows_in_the_search_and_is_zero_at_the_freeze(tiny_model_dir, train_file, tmp_path):
    # a weak lasso (the preset's lam 50000 scales the threshold for models with hundreds of pruned groups; this
    # tiny one has a few, and would lose them at the first step)
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", recipe="paper", max_steps=10, generator_frac=0.8,
                  log_every=1, generator_lr=3e-2, lam=5.0)
    recipe = PruneRecipe(cfg, progress=False)
    trace, lora_step = [], recipe.lora_step

    def traced(step, new_decisions):
        before = None if recipe.compacted else query_lora_norms(recipe)
        lora_step(step, new_decisions)
        if before is not None:  # pruned by the decisions, and masked in the step's sampled mask
            masked = recipe.controller.masks["heads"][:, ::recipe.space.head_dim] < 0.5
            trace.append((step, (recipe.decisions["heads"] < 0.5) & masked, before, query_lora_norms(recipe)))

    recipe.lora_step = traced
    report = recipe.run()
    assert report["logits_check"]["passed"] and abs(report["prunable_sparsity"] - 0.4) < 0.05
    # a pruned head's query LoRA still reaches the residual stream through the frozen o_proj, so it learns
    grew = [(step, index) for step, pruned, before, after in trace if step < 8
            for index in torch.nonzero(pruned & (before > 0) & (after > before + 1e-6)).tolist()]
    assert grew, "no pruned head whose query LoRA grew in the search"
    # and at the freeze every pruned group is exactly zero (then compaction removes them)
    assert report["pruned_lora_norm_before_freeze_cut"] > 0 and report["pruned_lora_norm_at_freeze"] == 0.0
    # log.jsonl shows the exp-ramp threshold's growth (lam_t and lasso_fraction belong to the other lassos)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    growth = [r["lasso_growth"] for r in log]
    assert growth[0] > 0 and growth == sorted(growth[:8]) + [0.0] * (len(growth) - 8) and max(growth) == 1.0
    assert report["compaction"]["step"] == 8


@pytest.mark.parametrize("mode", ["frozen-qkv", "both"])
def test_a_pruned_heads_query_lora_learns_from_zero_only_under_frozen_qkv(mode, tiny_model_dir, train_file, tmp_path):
    # head 0 of layer 0 pruned from the first step (the generator barely moves), masks not sampled, no lasso
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=4, generator_frac=1.0, lam=0.0,
                  generator_lr=1e-9, lora_mask=mode)
    recipe = PruneRecipe(cfg, progress=False)
    recipe.setup()
    gates = recipe.space.full_gates()
    gates["heads"][0, 0] = 0
    recipe.generator.decisions = lambda: gates
    recipe.train_loop(1)
    norms = query_lora_norms(recipe)
    assert norms[0, 1:].min() > 0
    assert (norms[0, 0] > 0) == (mode == "frozen-qkv")


def test_decisions_from_reuses_a_runs_final_decisions(tiny_model_dir, train_file, tmp_path, tokenizer):
    first = train(cfg_for(tiny_model_dir, train_file, tmp_path / "atp", max_steps=4), progress=False)
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "reused", max_steps=2, seed=1,
                  decisions_from=str(tmp_path / "atp"))
    assert not Schedule.from_config(cfg).learns_decisions
    second = train(cfg, progress=False)
    assert second["decisions"] == first["decisions"] and second["layers"] == first["layers"]
    assert second["exported_params"] == first["exported_params"] and second["logits_check"]["passed"]
    assert second["compaction"]["step"] == 0 and second["generator_steps"] == 0
    assert second["decisions_info"]["decisions_from"] == str(tmp_path / "atp")
    from helpers import tiny_model

    other = tmp_path / "mha"
    tiny_model("llama", gqa=False).save_pretrained(other)
    tokenizer.save_pretrained(other)
    # another pruning space, another sparsity, another model shape, a folder without a run: refused
    for kw, message in ((dict(mlp_block=2), "another space"), (dict(sparsity=0.2), "not --sparsity 0.2"),
                        (dict(decisions_from=str(tmp_path / "mha")), "no report.json")):
        values = {"decisions_from": str(tmp_path / "atp"), **kw}
        with pytest.raises(ATPError, match=message):
            train(cfg_for(tiny_model_dir, train_file, tmp_path / "bad", max_steps=2, overwrite=True, **values),
                  progress=False)
    with pytest.raises(ATPError, match="another shape"):
        train(cfg_for(other, train_file, tmp_path / "bad", max_steps=2, overwrite=True,
                      decisions_from=str(tmp_path / "atp")), progress=False)
    with pytest.raises(ATPError, match="cannot be combined with --method taylor"):
        dataclasses.replace(cfg, method="taylor").validate()


def test_decide_only_writes_the_two_stage_decisions_that_a_full_run_makes(tiny_model_dir, train_file, tmp_path):
    full = train(cfg_for(tiny_model_dir, train_file, tmp_path / "full", max_steps=4, method="frozen-generator"),
                 progress=False)
    only = train(cfg_for(tiny_model_dir, train_file, tmp_path / "only", max_steps=4, method="frozen-generator",
                         decide_only=True), progress=False)
    assert only["decide_only"] and only["decisions"] == full["decisions"]
    assert only["decisions_sparsity"] == pytest.approx(full["decisions_sparsity"])
    assert only["dense_shape"] == full["dense_shape"] and only["decision_weights"] == full["decision_weights"]
    assert not (tmp_path / "only" / "model").exists() and (tmp_path / "only" / "report.json").exists()
    reused = train(cfg_for(tiny_model_dir, train_file, tmp_path / "reused", max_steps=2,
                           decisions_from=str(tmp_path / "only")), progress=False)
    assert reused["decisions"] == full["decisions"] and reused["logits_check"]["passed"]


@pytest.mark.parametrize("kw, message", [
    (dict(), "give --method frozen-generator"),                       # ATP decides while it tunes
    (dict(method="taylor", prune=False), "drop --no-prune"),
    (dict(method="taylor", gguf="x.gguf"), "drop --gguf"),
])
def test_decide_only_refuses_what_it_cannot_do(kw, message, tmp_path):
    with pytest.raises(ATPError, match=message):
        ATPConfig(model="m", domain="healthcare", out=str(tmp_path / "o"), decide_only=True, **kw).validate()


@pytest.mark.parametrize("generator_lr", [1e-9, 3e-2])
def test_the_freeze_warns_when_the_search_never_pruned(generator_lr, tiny_model_dir, train_file, tmp_path, capsys):
    # a generator that cannot move from "keep" leaves every decision to the freeze's calibration: say so
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", recipe="paper", max_steps=10, generator_frac=0.8,
                  generator_lr=generator_lr, lam=5.0)
    report = PruneRecipe(cfg, progress=False).run()
    searched, warned = report["search_sparsity_at_freeze"], "warning: the search pruned" in capsys.readouterr().out
    assert abs(report["prunable_sparsity"] - 0.4) < 0.05
    assert warned == (searched < 0.5 * cfg.sparsity)
    if generator_lr == 1e-9:
        assert searched == 0.0 and warned
