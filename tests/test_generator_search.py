"""Issue 15, item 3: a less noisy generator search: a moving average of the gate logits, and Sheared-LLaMA's
Lagrangian in place of the ratio loss."""
import json

import pytest
import torch

from atp.errors import ATPError
from atp.generator import DecisionGenerator
from atp.options import ATPConfig, fingerprint
from atp.regularization import lagrangian_penalty
from atp.space import PruningSpace
from atp.train import train
from helpers import cfg_for, tiny_config


def space():
    return PruningSpace.from_config(tiny_config("llama", True), mlp_block=4)


def test_without_ema_the_generator_is_what_it_was():
    plain = DecisionGenerator(space(), seed=0)
    assert not any(name.startswith("ema_") for name in plain.state_dict())  # earlier checkpoints still load
    assert "lagrange" not in dict(plain.named_parameters())
    logits = plain.logits()
    assert all(torch.equal(plain.decisions()[k], plain.hard(logits)[k]) for k in logits)


def test_ema_follows_the_logits_at_its_decay_and_the_decisions_follow_the_ema():
    gen = DecisionGenerator(space(), seed=0, ema=0.75)
    start = {k: v.detach().clone() for k, v in gen.raw_logits().items()}
    with torch.no_grad():
        for head in gen.heads["mlp"]:
            head.bias.fill_(-20.0)  # the current logits now prune every MLP block (offset 3)
    now = {k: v.detach() for k, v in gen.raw_logits().items()}
    assert bool((gen.hard(gen.logits())["mlp"] == 0).all())
    gen.update_ema()
    for kind in start:
        assert torch.allclose(getattr(gen, f"ema_{kind}"), 0.75 * start[kind] + 0.25 * now[kind], atol=1e-6)
    # 0.75 * ~0 + 0.25 * (-20) + 3 = -2: pruned after one update; a decay of 0.9 would still keep them
    slow = DecisionGenerator(space(), seed=0, ema=0.9)
    with torch.no_grad():
        for head in slow.heads["mlp"]:
            head.bias.fill_(-20.0)
    slow.update_ema()
    assert bool((slow.decisions()["mlp"] == 1).all()) and bool((gen.decisions()["mlp"] == 0).all())
    assert bool((slow.eval()(None)["mlp"] == 1).all())  # eval mode gives the same decisions


def test_lagrangian_penalty_and_its_gradients():
    ratio = torch.tensor(0.7, requires_grad=True)
    multipliers = torch.tensor([2.0, 3.0], requires_grad=True)
    value = lagrangian_penalty(ratio, 0.6, multipliers)
    assert value.item() == pytest.approx(2.0 * 0.1 + 3.0 * 0.01)
    value.backward()
    assert ratio.grad.item() == pytest.approx(2.0 + 2 * 3.0 * 0.1)  # pushes r down while it is above t
    assert multipliers.grad.tolist() == pytest.approx([0.1, 0.01])


@pytest.mark.parametrize("options", [dict(generator_ema=0.8), dict(ratio_penalty="lagrangian", alpha=2.0)])
def test_runs_with_the_search_options_export_exactly_at_the_target(options, tiny_model_dir, train_file, tmp_path):
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=8, log_every=1, **options)
    report = train(cfg, progress=False)
    assert report["logits_check"]["passed"] and abs(report["prunable_sparsity"] - 0.4) < 0.02
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    if "ratio_penalty" in options:
        # the remaining ratio starts above its target, so the first multiplier rises from 0
        rising = [r["lagrange_1"] for r in log if "lagrange_1" in r]
        assert rising and rising[-1] > 0 and rising == sorted(rising)
    plain = cfg_for(tiny_model_dir, train_file, tmp_path / "plain", max_steps=8)
    assert fingerprint(cfg) != fingerprint(plain)


def test_search_options_leave_other_fingerprints_alone_and_reject_bad_values(tiny_model_dir, train_file, tmp_path):
    base = dict(model="m", domain="healthcare", out=str(tmp_path))
    assert fingerprint(ATPConfig(**base)) == fingerprint(ATPConfig(**base, generator_ema=0.0, ratio_penalty="log"))
    scored = dict(base, method="taylor")  # no generator: the options cannot change the run
    assert fingerprint(ATPConfig(**scored)) == fingerprint(ATPConfig(**scored, generator_ema=0.5))
    with pytest.raises(ATPError, match="--generator-ema must be in"):
        ATPConfig(**base, generator_ema=1.0).validate()
    with pytest.raises(ATPError, match="ratio_penalty|ratio-penalty"):
        ATPConfig(**base, ratio_penalty="quadratic").validate()
