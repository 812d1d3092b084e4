"""Issue 33, item 6: the generator started from taylor importance scores (`--generator-init taylor`)."""
import pytest
import torch

from atp.baselines import order, taylor_scores
from atp.batching import batches
from atp.errors import ATPError
from atp.generator import DecisionGenerator
from atp.options import ATPConfig, fingerprint
from atp.space import PruningSpace
from atp.train import PruneRecipe, train
from helpers import cfg_for, tiny_config


def test_scores_set_the_first_logits_in_their_global_order_every_gate_kept():
    space = PruningSpace.from_config(tiny_config("llama", True), mlp_block=4)
    gen = DecisionGenerator(space, seed=0, offset=3.0)
    scores = {kind: torch.rand(shape, generator=torch.Generator().manual_seed(1))
              for kind, shape in space.gate_shapes.items()}
    gen.start_from_scores(scores)
    logits = gen.logits()
    for kind, value in logits.items():
        flat = value.detach().flatten()
        assert torch.equal(torch.argsort(flat, stable=True), order(scores[kind], "global"))
        assert float(flat.min()) == pytest.approx(1.5) and float(flat.max()) == pytest.approx(4.5)
        assert bool((gen.decisions()[kind] == 1).all())  # every gate starts kept


def test_a_taylor_initialised_run_starts_from_the_taylor_ranking(tiny_model_dir, train_file, tmp_path):
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", generator_init="taylor")
    recipe = PruneRecipe(cfg, progress=False)
    recipe.setup()
    try:
        source = batches(recipe.calib_rows, cfg.batch_size, recipe.tokenizer.pad_token_id, cfg.seed + 2)
        data = [next(source)[0] for _ in range(cfg.calib_batches)]
        scores = taylor_scores(recipe.peft_model, recipe.space, data, torch.device("cpu"))
        for kind, value in recipe.generator.logits().items():
            assert torch.equal(torch.argsort(value.detach().flatten(), stable=True), order(scores[kind], "global"))
    finally:
        recipe.outputs.undo()
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "full", generator_init="taylor"), progress=False)
    assert report["generator_init"]["generator_init"] == "taylor" and report["logits_check"]["passed"]
    plain = train(cfg_for(tiny_model_dir, train_file, tmp_path / "plain"), progress=False)
    assert "generator_init" not in plain


@pytest.mark.parametrize("kw, message", [
    (dict(method="taylor"), "--method taylor has none"),
    (dict(prune=False), "--no-prune has none"),
    (dict(generator_init="scores"), "--generator-init must be one of keep, taylor"),
])
def test_generator_init_refuses_runs_without_a_generator(kw, message, tmp_path):
    values = {"generator_init": "taylor", **kw}
    with pytest.raises(ATPError, match=message):
        ATPConfig(model="m", domain="healthcare", out=str(tmp_path), **values).validate()


def test_generator_init_keep_leaves_fingerprints_alone(tmp_path):
    base = dict(model="m", domain="healthcare", out=str(tmp_path))
    assert fingerprint(ATPConfig(**base)) == fingerprint(ATPConfig(**base, generator_init="keep"))
    assert fingerprint(ATPConfig(**base)) != fingerprint(ATPConfig(**base, generator_init="taylor"))
