"""--recovery full: after the decisions are fixed, LoRA is merged and every decoder weight trains (pruned
structures stay masked and do not move); export, checkpoints and resume; options and fingerprints."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from atp.cli import main
from atp.errors import ATPError
from atp.export import count_safetensors_params, load_pruned
from atp.options import ATPConfig, config_from_record, fingerprint
from atp.schedule import Schedule
from atp.strategies import FullRecovery
from atp.train import PruneRecipe, train
from helpers import interrupted_copy

STEPS, FREEZE = 16, 8


def full_cfg(model_dir, train_file, out, **kw):
    values = dict(model=str(model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                  sparsity=0.4, mlp_block=4, max_steps=STEPS, batch_size=4, max_length=64, generator_every=1,
                  generator_frac=FREEZE / STEPS, generator_lr=3e-2, alpha=8.0, log_every=1, save_every=4,
                  keep_checkpoints=3, lr=1e-3, recovery="full", recovery_lr=1e-3,
                  compact=False)  # these tests read pruned rows in the full-size model (tests/test_compaction.py: on)
    values.update(kw)
    return ATPConfig(**values)


class WatchedRecovery(FullRecovery):
    """Keeps (on the recipe) a copy of the decoder weights as the full recovery phase begins, and how far merging
    LoRA moved the (masked) model's logits."""

    def start(self):
        recipe = self.recipe
        model = recipe.accelerator.unwrap_model(recipe.peft_model)
        probe = torch.tensor([[1, 17, 40, 99, 7, 250, 3, 8]])
        with torch.no_grad():
            before = model(input_ids=probe).logits
        super().start()
        with torch.no_grad():
            recipe.merge_diff = float((model(input_ids=probe).logits - before).abs().max())
        recipe.lora_left = [p for n, p in model.named_parameters() if "lora_" in n and (p.requires_grad or p.any())]
        recipe.at_start = {name: p.detach().clone() for name, p in self.params.items()}


class Watched(PruneRecipe):
    def setup(self):
        super().setup()
        self.recovery = WatchedRecovery(self)


def weight(params: dict, layer: int, module: str) -> str:
    names = [n for n in params if f"layers.{layer}." in n and f".{module}." in n and n.endswith("weight")]
    assert len(names) == 1, names
    return names[0]


def removed_and_kept(recipe, layer):
    """(removed, kept) row/column slices per projection of a layer under the run's final decisions."""
    space, hd = recipe.space, recipe.space.head_dim
    kept = space.kept_structure(recipe.final_decisions())[layer]
    heads = [h for h in range(space.num_heads) if h not in kept["heads"]]
    kv = [h for h in range(space.num_kv_heads) if h not in kept["kv_heads"]]
    channels = [c for c in range(space.intermediate_size) if c not in kept["channels"]]

    def rows(units, size):
        return [i for u in units for i in range(u * size, (u + 1) * size)]

    removed = {"q_proj": (rows(heads, hd), None), "o_proj": (None, rows(heads, hd)), "k_proj": (rows(kv, hd), None),
               "v_proj": (rows(kv, hd), None), "gate_proj": (channels, None), "up_proj": (channels, None),
               "down_proj": (None, channels)}
    return removed, kept


def part(tensor, rows, cols):
    if rows is not None:
        return tensor[rows]
    return tensor[:, cols]


def test_full_recovery_trains_every_weight_keeps_pruned_ones_and_resumes(tiny_model_dir, train_file, tmp_path):
    recipe = Watched(full_cfg(tiny_model_dir, train_file, tmp_path / "full"), progress=False)
    report = recipe.run()
    assert report["logits_check"]["passed"] and report["full_recovery_steps"] == STEPS - FREEZE
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.05
    assert recipe.merge_diff <= 1e-5 and recipe.lora_left == []  # merged exactly; LoRA zero and frozen
    model_dir = tmp_path / "full" / "model"
    assert sum(p.numel() for p in load_pruned(model_dir).parameters()) == count_safetensors_params(model_dir)

    # every decoder weight trained, except the rows and columns of pruned structures: exactly unchanged
    params, start = recipe.recovery.params, recipe.at_start
    assert any(".input_layernorm." in n for n in params) and not any("lora_" in n or "embed" in n for n in params)
    removed_some = 0
    for layer in range(recipe.space.num_layers):
        removed, _ = removed_and_kept(recipe, layer)
        for module, (rows, cols) in removed.items():
            name = weight(params, layer, module)
            assert torch.equal(part(params[name].detach(), rows, cols), part(start[name], rows, cols)), name
            gone, axis = (rows, 0) if rows is not None else (cols, 1)
            removed_some += len(gone)
            if len(gone) < start[name].shape[axis]:  # something of it is kept
                assert not torch.equal(params[name].detach(), start[name]), f"{name} did not train"
    assert removed_some > 0

    # the same seed with LoRA recovery: the same decisions (fixed before the phase), other weights
    lora = train(full_cfg(tiny_model_dir, train_file, tmp_path / "lora", recovery="lora"), progress=False)
    assert lora["layers"] == report["layers"] and lora["full_recovery_steps"] == 0
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("full", "lora"))
    assert a.keys() == b.keys()
    changed = [k for k in a if "layers." in k and not torch.allclose(a[k], b[k], atol=1e-4)]
    assert len(changed) > len([k for k in a if "layers." in k]) // 2
    assert all(torch.equal(a[k], b[k]) for k in a if "embed" in k or "lm_head" in k)  # outside the decoder layers

    # its own learning rate: restarted at the freeze, peak --recovery-lr
    log = {r["step"]: r for r in map(json.loads, open(tmp_path / "full" / "log.jsonl"))}
    schedule = Schedule.from_config(recipe.cfg)
    assert schedule.full_from == FREEZE + 1 and schedule.lr_restart_step == FREEZE
    assert log[FREEZE]["lr"] == pytest.approx(1e-3 * schedule.lora_lr_factor(FREEZE))
    for step in (FREEZE + 1, FREEZE + 4):
        assert log[step]["lr"] == pytest.approx(recipe.cfg.recovery_lr * schedule.lora_lr_factor(step))
    assert all(log[step]["group_lasso"] == 0.0 for step in range(FREEZE + 1, STEPS + 1))

    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000008", "step-000012", "step-000016"]
    assert not (ckpts[0] / "full.safetensors").exists()
    assert {"full.safetensors", "full_optimizer.safetensors"} <= {f.name for f in ckpts[1].iterdir()}
    assert set(load_file(str(ckpts[1] / "full.safetensors"))) == set(params)

    # resume from the middle of the full phase (step 12) and from the freeze (step 8): the same model, bit for bit
    for at in (12, 8):
        run = interrupted_copy(tmp_path / "full", tmp_path / f"resumed-{at}", at)
        assert main(["prune", "--resume", str(run)]) == 0
        c = load_file(str(run / "model" / "model.safetensors"))
        assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a), f"resumed from step {at}"
        assert json.loads((run / "report.json").read_text())["full_recovery_steps"] == STEPS - max(at, FREEZE)


def test_full_recovery_of_a_two_stage_baseline(tiny_model_dir, train_file, tmp_path):
    # LoRA tunes the fixed decisions up to the same step as ATP's freeze, then all decoder weights train
    recipe = Watched(full_cfg(tiny_model_dir, train_file, tmp_path / "run", method="magnitude", save_every=0),
                     progress=False)
    report = recipe.run()
    assert report["logits_check"]["passed"] and report["full_recovery_steps"] == STEPS - FREEZE
    assert report["method"] == "magnitude" and abs(report["prunable_sparsity"] - 0.4) <= 0.05
    log = {r["step"]: r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl"))}
    assert log[FREEZE + 1]["lr"] == pytest.approx(1e-3 * Schedule.from_config(recipe.cfg).lora_lr_factor(FREEZE + 1))
    for layer in range(recipe.space.num_layers):
        for module, (rows, cols) in removed_and_kept(recipe, layer)[0].items():
            name = weight(recipe.recovery.params, layer, module)
            assert torch.equal(part(recipe.recovery.params[name].detach(), rows, cols),
                               part(recipe.at_start[name], rows, cols)), name


@pytest.mark.parametrize("compact", [False, True])
def test_self_teacher_stays_the_pretrained_model(compact, tiny_model_dir, train_file, tmp_path):
    from atp.models import load_model

    cfg = full_cfg(tiny_model_dir, train_file, tmp_path / "run", max_steps=6, save_every=0, distill=0.5,
                   compact=compact)
    recipe = Watched(cfg, progress=False)
    report = recipe.run()
    assert report["logits_check"]["passed"] and report["full_recovery_steps"] == 3
    ids = torch.tensor([[1, 17, 40, 99, 7, 250]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        torch.testing.assert_close(recipe.teacher.logits(batch), dense(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("values, message", [
    (dict(prune=False), "--recovery full trains all weights once the pruning decisions are fixed; --no-prune"),
    (dict(generator_frac=1.0), "--recovery full needs steps after the decisions are fixed.*lower --generator-frac"),
    (dict(method="taylor", generator_frac=1.0), "--recovery full needs steps after the decisions are fixed"),
    (dict(recovery_lr=0.0), "--recovery-lr must be greater than 0"),
    (dict(recovery="partial"), "--recovery must be one of lora, full, got 'partial'"),
])
def test_recovery_options_that_make_no_sense(values, message):
    ATPConfig(recovery="full").validate()
    with pytest.raises(ATPError, match=message):
        ATPConfig(**{"recovery": "full", **values}).validate()


def test_cli_refuses_full_recovery_without_pruning(tiny_model_dir, train_file, tmp_path, capsys):
    argv = ["prune", "--model", str(tiny_model_dir), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(tmp_path / "run"), "--recovery", "full", "--no-prune"]
    assert main(argv) == 2
    assert "--no-prune has no pruning decisions" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_new_options_leave_old_fingerprints_alone():
    base = ATPConfig()
    assert fingerprint(dataclasses.replace(base, recovery_lr=1e-3)) == fingerprint(base)  # unused with LoRA recovery
    full = dataclasses.replace(base, recovery="full")
    assert len({fingerprint(base), fingerprint(full), fingerprint(dataclasses.replace(full, recovery_lr=1e-3)),
                fingerprint(dataclasses.replace(base, packing=True))}) == 4
    # restart_lr matters for a baseline once its full phase restarts the schedule
    taylor = ATPConfig(method="taylor")
    assert fingerprint(dataclasses.replace(taylor, restart_lr=False)) == fingerprint(taylor)
    taylor_full = dataclasses.replace(taylor, recovery="full")
    assert fingerprint(dataclasses.replace(taylor_full, restart_lr=False)) != fingerprint(taylor_full)
    # records made before the options existed read back with LoRA recovery and no packing
    record = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("recovery", "recovery_lr", "packing")}
    old = config_from_record(record)
    assert (old.recovery, old.packing) == ("lora", False) and fingerprint(old) == fingerprint(base)


def test_schedule_of_the_full_phase():
    atp = Schedule.from_config(ATPConfig(max_steps=10, generator_frac=0.6, recovery="full"))
    assert atp.full_from == 7 and [s for s in range(1, 11) if atp.is_full_step(s)] == [7, 8, 9, 10]
    assert atp.lr_restart_step == 6 == atp.fixed_phase_start
    taylor = Schedule.from_config(ATPConfig(max_steps=10, generator_frac=0.6, recovery="full", method="taylor"))
    assert taylor.full_from == 7 and taylor.fixed_phase_start == 0 and taylor.lr_restart_step == 6
    assert taylor.lora_lr_factor(6) == pytest.approx(1.0)  # warm-up of one step, at the phase's start
    assert Schedule.from_config(ATPConfig(max_steps=10, generator_frac=0.0, recovery="full")).full_from == 1
    for lora in (ATPConfig(max_steps=10), ATPConfig(max_steps=10, recovery="full", prune=False)):
        assert Schedule.from_config(lora).full_from == 0 and not Schedule.from_config(lora).is_full_step(10)


def test_two_processes_match_one_process_with_full_recovery_and_packing(tiny_model_dir, train_file, tmp_path):
    """accelerate launch --num_processes 2 (gloo): the full phase re-wraps the model for DDP over the weights that
    train then; packed batches are split by rows. Same export as one process with the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "ACCELERATE_USE_CPU": "true"}
    short = tmp_path / "hqs.jsonl"  # short records, several to a packed row
    rows = [json.loads(line) for line in open(train_file)]
    short.write_text("".join(json.dumps({"CHQ": r["QUESTION"], "Summary": r["final_decision"]}) + "\n" for r in rows))

    def run(cmd, out, batch):
        args = ["prune", "--model", str(tiny_model_dir), "--domain", "", "--train-file", f"hqs={short}",
                "--out", str(out), "--max-steps", "12", "--batch-size", str(batch), "--max-length", "96",
                "--mlp-block", "4", "--save-every", "0", "--generator-lr", "0.03", "--sparsity", "0.4",
                "--generator-frac", "0.5", "--recovery", "full", "--recovery-lr", "1e-3", "--packing",
                "--distill", "0.5"]  # shards hold unequal real tokens: the KL is normalised globally
        done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "report.json").read_text())

    one = run([sys.executable, "-m", "atp.cli"], tmp_path / "one", 4)
    launcher = str(Path(sys.executable).parent / "accelerate")
    two = run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "-m", "atp.cli"], tmp_path / "two", 2)
    assert two["processes"] == 2 and one["full_recovery_steps"] == two["full_recovery_steps"] == 6
    assert one["layers"] == two["layers"] and one["train_tokens"] == two["train_tokens"]
    assert one["pad_fraction"] == two["pad_fraction"] < 0.3
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
