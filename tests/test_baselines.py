"""Two-stage baselines and ATP ablations: target sparsity, importance ranking, exact export, resume."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from atp.baselines import fixed_decisions, select
from atp.cli import main
from atp.errors import ATPError
from atp.space import HeadMLPSpace
from atp.train import train
from helpers import cfg_for, lm_batches, tiny_model


def decoder_params(model_dir) -> int:
    """Parameters of the decoder blocks stored in a folder's safetensors, read from tensor names only."""
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys() if ".layers." in name)
    return total


@pytest.mark.parametrize("method", ["taylor", "magnitude", "activation", "random", "frozen-generator"])
def test_baseline_hits_target_and_exports_exactly(method, tiny_model_dir, train_file, tmp_path):
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", method=method), progress=False)
    measured = 1 - decoder_params(tmp_path / "run" / "model") / decoder_params(tiny_model_dir)
    assert abs(measured - 0.4) <= 0.005, measured
    assert report["method"] == method and report["decisions_info"]["allocation"]
    assert report["decisions_sparsity"] == pytest.approx(measured, abs=1e-6)
    assert report["logits_check"]["passed"] and report["logits_check"]["max_abs_logit_diff"] <= 1e-3
    assert report["generator_steps"] == (3 if method == "frozen-generator" else 0)  # the generator phase only
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert all(r["lam"] == 0 and r["group_lasso"] == 0 and r["flips"] == 0 for r in log)


@pytest.mark.parametrize("method", ["taylor", "magnitude", "activation"])
def test_scores_keep_an_important_group_and_prune_a_dead_one(method, tokenizer):
    model = tiny_model("llama", gqa=True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    d, b = space.head_dim, space.mlp_block
    layers = model.model.layers
    with torch.no_grad():
        # a strong group dominates the residual stream, so the loss moves most with its scale (taylor)
        strong, dead = layers[1], layers[0]  # head 2 of layer 1 strong, head 4 of layer 0 dead
        strong.self_attn.o_proj.weight[:, 2 * d:3 * d] *= 10
        dead.self_attn.q_proj.weight[4 * d:5 * d] = 0
        dead.self_attn.o_proj.weight[:, 4 * d:5 * d] = 0
        strong, dead = layers[2].mlp, layers[1].mlp  # MLP block 3 of layer 2 strong, block 5 of layer 1 dead
        strong.down_proj.weight[:, 3 * b:4 * b] *= 10
        for proj in (dead.gate_proj, dead.up_proj):
            proj.weight[5 * b:6 * b] = 0
        dead.down_proj.weight[:, 5 * b:6 * b] = 0
    gates, info = fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
    assert gates["heads"][1, 2] == 1 and gates["heads"][0, 4] == 0
    assert gates["mlp"][2, 3] == 1 and gates["mlp"][1, 5] == 0
    assert abs(float(space.remaining_ratio(gates)) - 0.6) <= 0.02  # blocks of 4 channels: coarse steps
    assert info["allocation"] == ("global" if method == "activation" else "uniform")


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_select_hits_target_and_splits_kinds_evenly(allocation):
    space = HeadMLPSpace.from_config(tiny_model("llama", gqa=True).config, mlp_block=1)
    noise = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(shape, generator=noise) for k, shape in space.gate_shapes.items()}
    for sparsity in (0.2, 0.4, 0.5, 0.7):
        gates = select(space, scores, sparsity, allocation)
        assert abs(float(space.remaining_ratio(gates)) - (1 - sparsity)) <= 0.005
        if allocation == "uniform":  # per-layer counts differ by at most one group
            for kind in gates:
                kept = gates[kind].sum(1)
                assert kept.max() - kept.min() <= 1, (kind, kept)
        # each kind gives up about the same fraction of its own parameters
        no_heads = {**space.full_gates(), "heads": gates["heads"]}
        no_mlp = {**space.full_gates(), "mlp": gates["mlp"]}
        empty = {k: torch.zeros(v) for k, v in space.gate_shapes.items()}
        frac_heads = (1 - float(space.remaining_ratio(no_heads))) / (1 - float(space.remaining_ratio({**empty, "mlp": torch.ones(space.gate_shapes["mlp"])})))
        frac_mlp = (1 - float(space.remaining_ratio(no_mlp))) / (1 - float(space.remaining_ratio({**empty, "heads": torch.ones(space.gate_shapes["heads"])})))
        assert abs(frac_heads - frac_mlp) <= 0.1, (frac_heads, frac_mlp)


def test_invalid_method_is_a_clear_error(tiny_model_dir, train_file, tmp_path, capsys):
    with pytest.raises(ATPError, match="choices: atp, taylor, magnitude, activation, random, frozen-generator"):
        train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", method="wanda"), progress=False)
    with pytest.raises(ATPError, match="not to --method taylor"):
        train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", method="taylor", round_to=4), progress=False)
    argv = ["prune", "--model", str(tiny_model_dir), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(tmp_path / "cli"), "--method", "bogus"]
    assert main(argv) == 2
    assert "unknown --method 'bogus'" in capsys.readouterr().err


def test_fixed_decisions_resume_from_checkpoint(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import shutil

    import atp.baselines

    cfg = lambda: cfg_for(tiny_model_dir, train_file, tmp_path / "run", method="taylor", max_steps=8, save_every=4,
                          mlp_block=4)
    first = train(cfg(), progress=False)
    reference = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000008")
    shutil.rmtree(tmp_path / "run" / "model")

    def no_rescoring(*args, **kwargs):
        raise AssertionError("a resumed run must read its decisions from the checkpoint")

    monkeypatch.setattr(atp.baselines, "taylor_scores", no_rescoring)
    resumed = train(cfg(), progress=False, resume=True)
    again = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert resumed["layers"] == first["layers"] and resumed["decisions_info"] == first["decisions_info"]
    assert all(torch.equal(reference[k], again[k]) for k in reference)


@pytest.mark.parametrize("ablation", [{"lam": 0.0}, {"lora_mask": "frozen-output"}, {"lora_mask": "both"},
                                      {"lora_decisions": "sampled"}, {"generator_frac": 1.0}])
def test_atp_ablations_run_and_hit_the_target(ablation, tiny_model_dir, train_file, tmp_path):
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=8, **ablation), progress=False)
    measured = 1 - decoder_params(tmp_path / "run" / "model") / decoder_params(tiny_model_dir)
    assert abs(measured - 0.4) <= 0.01, measured
    assert report["logits_check"]["passed"]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    if "lam" in ablation:
        assert all(r["lam"] == 0 and r["group_lasso"] == 0 for r in log)
    if "generator_frac" in ablation:  # generator steps to the last step, then calibrated for export
        assert report["generator_steps"] == 8
