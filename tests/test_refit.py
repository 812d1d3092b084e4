"""Issue 33, item 6: `--refit ls`, the least-squares refit of the kept input columns of o_proj / down_proj at
compaction (atp.refit): the refit reaches the least-squares optimum on the calibration data, runs train through it,
export it and resume across it bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from atp import refit
from atp.cli import main
from atp.compaction import compact
from atp.errors import ATPError
from atp.options import ATPConfig, fingerprint
from atp.space import PruningSpace
from helpers import interrupted_copy, prune_argv, random_gates, tiny_model, with_lora


def calibration(n=3, rows=4, length=24, seed=5):
    """Batches as the calibration helper gives them: input ids and an attention mask with some padding."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 500, (rows, length), generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, length - 7:] = 0
        mask[3, length - 3:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def inputs_of(peft_model, paths, batches):
    """X of each projection (its real tokens, in order), captured here with plain hooks."""
    from atp.masking import base_model

    dense, seen = base_model(peft_model), {path: [] for path in paths}
    state = {}
    handles = [dense.get_submodule(path).register_forward_pre_hook(
        lambda module, args, path=path: seen[path].append(args[0].reshape(-1, args[0].shape[-1])[state["real"]]))
        for path in paths]
    with torch.no_grad():
        for batch in batches:
            state["real"] = batch["attention_mask"].reshape(-1).bool()
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return {path: torch.cat(values) for path, values in seen.items()}


@pytest.mark.parametrize("family, kinds", [("llama", ["heads", "mlp"]), ("gemma3_text", ["heads", "mlp", "hidden"])])
def test_the_refit_reaches_the_least_squares_optimum_on_the_calibration_data(family, kinds, monkeypatch):
    from atp.masking import base_model

    peft_model = with_lora(tiny_model(family, True)).eval()  # LoRA B non-zero: the target includes LoRA
    space = PruningSpace.from_config(peft_model.config, mlp_block=4, kinds=kinds, hidden_block=8)
    kept = space.kept_structure(random_gates(space, seed=2))
    batches = calibration()
    found = refit.targets(peft_model, kept)
    assert {t.role for t in found} == {"o", "down"}
    assert all(0 < len(t.cols) < t.width for t in found)
    dense = base_model(peft_model)
    x = inputs_of(peft_model, [t.path for t in found], batches)
    with torch.no_grad():  # the unmasked model's outputs of each projection (bias-free here) and its base weights,
        # at the output rows the compact model keeps (all but with --space hidden)
        y = {t.path: dense.get_submodule(t.path)(x[t.path]).double() for t in found}
        base = {t.path: refit.base_layer(dense.get_submodule(t.path)).weight.detach().clone() for t in found}
        for t in (t for t in found if t.rows is not None):
            y[t.path], base[t.path] = y[t.path][:, t.rows], base[t.path][t.rows]
    assert ("hidden" in kinds) == any(t.rows is not None for t in found)
    weights, summary = refit.refit_weights(peft_model, kept, batches, torch.device("cpu"))
    chunked, _ = refit.refit_weights(peft_model, kept, batches, torch.device("cpu"), budget=1)  # one pass each
    assert weights.keys() == chunked.keys() == {f"{t.path}.weight" for t in found}
    assert all(torch.allclose(weights[k], chunked[k], atol=1e-6) for k in weights)
    with monkeypatch.context() as patch:  # (almost) undamped: the plain least-squares solution
        patch.setattr(refit, "DAMPING", 1e-10)
        undamped, _ = refit.refit_weights(peft_model, kept, batches, torch.device("cpu"))
    small, _, _ = compact(peft_model, kept, lambda m: None)
    compact_dense = base_model(small)

    def outputs():
        with torch.no_grad():
            return {t.path: compact_dense.get_submodule(t.path)(x[t.path][:, t.cols]).double() for t in found}

    plain = outputs()
    refit.apply(small, undamped)
    optimal = outputs()
    refit.apply(small, weights)
    refitted = outputs()
    ratios = []
    for t in found:
        x_k, target = x[t.path][:, t.cols].double(), y[t.path]
        best = float((x_k @ torch.linalg.lstsq(x_k, target).solution - target).norm())
        sliced, after = float((plain[t.path] - target).norm()), float((refitted[t.path] - target).norm())
        assert float((optimal[t.path] - target).norm()) == pytest.approx(best, rel=1e-4), t.path
        assert best * (1 - 1e-5) <= after <= sliced, (t.path, best, after, sliced)  # (fp32 outputs)
        ratios.append(after / sliced)
        # with the damping, the weight is W_K + D, D the ridge regression (H_KK damped) of what plain slicing
        # leaves, X_P W_Pᵀ, on X_K; solved here as an augmented lstsq
        damping = refit.DAMPING * float((x_k * x_k).sum(0).mean())
        residual = target - plain[t.path]
        augmented = torch.cat([x_k, damping ** 0.5 * torch.eye(len(t.cols), dtype=torch.float64)])
        padded = torch.cat([residual, torch.zeros(len(t.cols), residual.shape[1], dtype=torch.float64)])
        correction = torch.linalg.lstsq(augmented, padded).solution.t()
        expected = base[t.path][:, t.cols].double() + correction
        assert torch.allclose(weights[f"{t.path}.weight"].double(), expected, atol=1e-4, rtol=1e-3), t.path
    assert summary["refit_modules"] == len(found)
    assert summary["refit_calibration_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert summary["refit_output_error_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-3)
    assert 0 <= summary["refit_output_error_ratio"] < 1


def run_argv(model_dir, train_file, out, *extra):
    return prune_argv(model_dir, train_file, out, "--max-steps", "8", "--generator-every", "1", "--save-every", "1",
                      "--keep-checkpoints", "20", "--distill", "0.5", "--refit", "ls", *extra)


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("method, recovery", [("atp", "lora"), ("taylor", "full")])
def test_a_refit_run_exports_what_it_trained_and_resumes_across_the_compaction_bit_for_bit(
        method, recovery, tiny_model_dir, train_file, tmp_path):
    whole = tmp_path / "whole"
    assert main(run_argv(tiny_model_dir, train_file, whole, "--method", method, "--recovery", recovery)) == 0
    report = json.loads((whole / "report.json").read_text())
    compaction = report["compaction"]
    step = compaction["step"]
    assert step == (0 if method == "taylor" else 4)
    assert compaction["refit"] == "ls" and compaction["refit_modules"] > 0
    assert compaction["refit_calibration_tokens"] > 0 and 0 <= compaction["refit_output_error_ratio"] < 1
    assert compaction["max_abs_logit_diff"] <= compaction["allowed"]  # compaction itself still exact
    assert report["logits_check"]["passed"]  # the export (refit included) is the trained model
    for path in sorted((whole / "checkpoints").glob("step-*")):  # the refit weights from the compaction on
        assert (path / "refit.safetensors").exists() == (int(path.name[5:]) >= step), path.name
    saved = load_file(str(whole / "checkpoints" / f"step-{max(step, 1):06d}" / "refit.safetensors"))
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    assert saved and all(value.shape[1] < dense[name].shape[1] for name, value in saved.items())
    reference = weights(whole)
    full_from = 5  # generator_frac 0.6 of 8 steps: the decisions fixed at step 4 (full recovery from step 5)
    points = {max(step - 1, 1), step + 1} | ({full_from + 1} if recovery == "full" else set())
    for resume_after in sorted(points):
        run = interrupted_copy(whole, tmp_path / f"from-{resume_after}", resume_after)
        assert main(["prune", "--resume", str(run)]) == 0
        resumed = weights(run)
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), resume_after
        again = json.loads((run / "report.json").read_text())["compaction"]
        assert again["refit_output_error_ratio"] == compaction["refit_output_error_ratio"]


@pytest.mark.parametrize("kw, message", [
    (dict(compact=False), "--no-compact keeps the pruned structures in the model"),
    (dict(prune=False), "--no-prune removes nothing"),
    (dict(generator_frac=1.0), "no step follows and the run never compacts"),
    (dict(refit="lsq"), "--refit must be one of none, ls"),
])
def test_refit_refuses_runs_that_never_compact(kw, message, tmp_path):
    values = {"refit": "ls", **kw}
    with pytest.raises(ATPError, match=message):
        ATPConfig(model="m", domain="healthcare", out=str(tmp_path), **values).validate()


def test_the_cli_refuses_refit_without_compaction_before_anything_is_written(tiny_model_dir, train_file, tmp_path,
                                                                             capsys):
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run", "--refit", "ls", "--no-compact")) == 2
    assert "--refit ls refits the kept weights when compaction removes the pruned structures" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refit_none_leaves_fingerprints_alone(tmp_path):
    base = dict(model="m", domain="healthcare", out=str(tmp_path))
    assert fingerprint(ATPConfig(**base)) == fingerprint(ATPConfig(**base, refit="none"))
    assert fingerprint(ATPConfig(**base)) != fingerprint(ATPConfig(**base, refit="ls"))
