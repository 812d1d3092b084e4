"""Crash-safe resume, corrupted checkpoints, numerical guards."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from atp import checkpoint
from atp.cli import main
from atp.errors import ATPError
from atp.options import ATPConfig
from atp.train import train
from helpers import save_checkpoint, small_checkpoint_parts, tiny_model

STEPS = 120


def prune_args(model_dir, train_file, out):
    return ["prune", "--model", str(model_dir), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "2", "--max-length", "48",
            "--mlp-block", "4", "--save-every", "10", "--keep-checkpoints", "3", "--generator-lr", "0.03",
            "--sparsity", "0.4"]


def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, train_file, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(prune_args(tiny_model_dir, train_file, ref)) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "atp.cli"] + prune_args(tiny_model_dir, train_file, run),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000030").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists()
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) <= 3  # keep-checkpoints
    # A crash corrupted the newest checkpoint: resume must skip it, with a warning, and use the previous one.
    newest = ckpts[-1]
    blob = bytearray((newest / "lora.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newest / "lora.safetensors").write_bytes(bytes(blob))

    assert main(["prune", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest.name}" in err and "corrupted" in err

    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, run))
    assert ra["layers"] == rb["layers"] and ra["exported_params"] == rb["exported_params"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_resume_refuses_a_different_config(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    args = prune_args(tiny_model_dir, train_file, run)
    args[args.index("--max-steps") + 1] = "20"
    assert main(args) == 0
    assert main(["prune", "--resume", str(run), "--sparsity", "0.5"]) == 2
    assert "different config (sparsity: 0.4 -> 0.5)" in capsys.readouterr().err
    assert main(["prune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def _small_run_args(model_dir, train_file, out):
    args = prune_args(model_dir, train_file, out)
    args[args.index("--max-steps") + 1], args[args.index("--save-every") + 1] = "2", "1"
    return args


def test_resume_refuses_a_changed_base_model(tiny_model_dir, train_file, tmp_path, capsys):
    import hashlib

    from conftest import tiny_model

    run, weights = tmp_path / "run", tiny_model_dir / "model.safetensors"
    assert main(_small_run_args(tiny_model_dir, train_file, run)) == 0
    manifest_path = run / "checkpoints" / "step-000002" / "manifest.json"
    recorded = json.loads(manifest_path.read_text())["model_sha256"]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded["model"]["model.safetensors"]["sha256"] == digest
    assert {"config.json", "tokenizer.json"} <= set(recorded["model"]) and "teacher" not in recorded
    assert json.loads((run / "report.json").read_text())["model_sha256"] == recorded
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched (or copied): compared by content
    assert main(["prune", "--resume", str(run)]) == 0
    tiny_model("llama", seed=1).save_pretrained(tiny_model_dir)  # other weights, same shapes, same path
    assert main(["prune", "--resume", str(run)]) == 2  # was: resumed on the other model
    err = capsys.readouterr().err
    assert (f"atp: error: --resume {run}: the base model's model.safetensors changed (SHA-256 {digest[:12]}... "
            "then, ") in err and "resume with the base model the run used, or start a new run" in err
    manifest = json.loads(manifest_path.read_text())
    del manifest["model_sha256"]  # a checkpoint of an older atp records none: it resumes as before
    manifest_path.write_text(json.dumps(manifest))
    assert main(["prune", "--resume", str(run)]) == 0


def test_resume_refuses_a_changed_teacher(tiny_model_dir, tmp_path):
    import shutil

    from atp.options import check_same_model, model_sha256

    teacher = tmp_path / "teacher-run"
    shutil.copytree(tiny_model_dir, teacher / "model")
    cfg = ATPConfig(model=str(tiny_model_dir), distill=0.5, teacher=str(teacher))
    recorded = model_sha256(cfg)
    assert set(recorded) == {"model", "teacher"}
    assert recorded["teacher"]["model.safetensors"] == recorded["model"]["model.safetensors"] | {
        "mtime_ns": (teacher / "model" / "model.safetensors").stat().st_mtime_ns}
    assert check_same_model(recorded, cfg, "--resume r") == recorded
    config = json.loads((teacher / "model" / "config.json").read_text())
    (teacher / "model" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ATPError, match=r"--resume r: the teacher's config\.json changed \(SHA-256 "):
        check_same_model(recorded, cfg, "--resume r")
    assert "teacher" not in model_sha256(ATPConfig(model=str(tiny_model_dir), distill=0.5))  # self: the model


def test_checkpoint_verify_detects_missing_and_corrupt(tiny_model_dir, train_file, tmp_path):
    run = tmp_path / "run"
    args = prune_args(tiny_model_dir, train_file, run)
    args[args.index("--max-steps") + 1] = "20"
    assert main(args) == 0
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000010", "step-000020"]
    checkpoint.verify(ckpts[-1])
    (ckpts[-1] / "generator.safetensors").unlink()
    with pytest.raises(ATPError, match="missing"):
        checkpoint.verify(ckpts[-1])
    (ckpts[0] / "manifest.json").write_text("{trunc")
    assert checkpoint.latest_valid(run) is None


def test_nan_stops_with_term_and_step_and_keeps_checkpoints(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import atp.regularization as reg

    real, calls = reg.ratio_loss, {"n": 0}

    def poisoned(ratio, target):
        calls["n"] += 1
        value = real(ratio, target)
        return value * float("nan") if calls["n"] >= 6 else value

    monkeypatch.setattr(reg, "ratio_loss", poisoned)
    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), max_steps=40, batch_size=2, max_length=48, mlp_block=4,
                    generator_every=1, save_every=2)
    with pytest.raises(ATPError, match="ratio_loss became nan at step 6"):
        train(cfg, progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts[-1].name == "step-000004"
    checkpoint.verify(ckpts[-1])
    assert not (tmp_path / "run" / "model").exists()


def small_cfg(model_dir, train_file, out, **kw):
    values = dict(model=str(model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                  max_steps=2, batch_size=2, max_length=48, mlp_block=4, save_every=0)
    values.update(kw)
    return ATPConfig(**values)


def test_dataset_too_small(tiny_model_dir, tmp_path, shared_data):
    rows = open(shared_data / "healthcare" / "pubmedqa_train.jsonl").readlines()[:4]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(rows))
    with pytest.raises(ATPError, match="too little training data: .* for batch size 8"):
        train(small_cfg(tiny_model_dir, path, tmp_path / "run", batch_size=8), progress=False)


def test_unreachable_sparsity(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ATPError, match="cannot be reached: this pruning space can remove at most 0.99"):
        train(small_cfg(tiny_model_dir, train_file, tmp_path / "run", sparsity=0.999), progress=False)


def test_longer_than_context_is_reported(tiny_model_dir, train_file, tmp_path, capsys):
    report = train(small_cfg(tiny_model_dir, train_file, tmp_path / "run", max_length=5000), progress=False)
    out = capsys.readouterr().out
    assert "exceeds the model's context of 256 tokens" in out
    assert report["config"]["max_length"] == 256


def test_tokenizer_without_pad_token(tmp_path, tokenizer):
    from atp.models import load_tokenizer

    no_pad = tmp_path / "nopad"
    tokenizer.save_pretrained(no_pad)
    cfg = json.loads((no_pad / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (no_pad / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_tokenizer(str(no_pad))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    cfg.pop("eos_token", None)
    (no_pad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ATPError, match="neither a pad nor an eos token"):
        load_tokenizer(str(no_pad))


def test_disk_full_during_export_leaves_nothing_half_written(tmp_path, tokenizer, monkeypatch):
    from atp.export import save_pruned

    model = tiny_model("llama", True)
    out = tmp_path / "exports" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text("previous export")

    def full_disk(path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(ATPError, match="no space left on device while writing the model to"):
        save_pruned(model, tokenizer, out, overwrite=True)
    assert (out / "config.json").read_text() == "previous export"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["model"]


def test_two_processes_match_one_process(tiny_model_dir, train_file, tmp_path):
    """accelerate launch --num_processes 2 --cpu (gloo): same decisions on every rank, same exported model
    as one process with the same global batch."""
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    common = prune_args(tiny_model_dir, train_file, "X")
    common[common.index("--max-steps") + 1] = "30"
    common[common.index("--save-every") + 1] = "0"
    out_at = common.index("--out") + 1
    batch_at = common.index("--batch-size") + 1

    def run(cmd, out, batch):
        args = list(common)
        args[out_at], args[batch_at] = str(out), str(batch)
        done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "report.json").read_text())

    one = run([sys.executable, "-m", "atp.cli"], tmp_path / "one", 4)
    launcher = str(Path(sys.executable).parent / "accelerate")
    # accelerate's --cpu launcher starts a single process; torchrun (--multi_gpu) with ACCELERATE_USE_CPU runs gloo
    env["ACCELERATE_USE_CPU"] = "true"
    two = run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "atp.cli"], tmp_path / "two", 2)
    assert two["processes"] == 2 and two["decisions_identical_across_processes"]
    assert one["layers"] == two["layers"]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_permission_error_during_export(tmp_path, tokenizer, monkeypatch):
    import tempfile

    from atp.export import save_pruned

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(ATPError, match="cannot write the model to .*permission denied"):
        save_pruned(tiny_model("llama", True), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_run_keeps_generator_in_fp32(tiny_model_dir, train_file, tmp_path):
    report = train(small_cfg(tiny_model_dir, train_file, tmp_path / "run", mixed_precision="bf16", max_steps=6,
                             save_every=6, generator_every=1), progress=False)
    assert report["logits_check"]["passed"]
    generator = load_file(str(tmp_path / "run" / "checkpoints" / "step-000006" / "generator.safetensors"))
    assert {t.dtype for t in generator.values()} == {torch.float32}


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("manifest", [{"step": 2, "fingerprint": "fp"}, [], "null", {"step": 2, "fingerprint": "fp",
                                      "files": {}}, {"files": []}])
def test_manifest_without_a_file_list_is_corrupt(manifest, tmp_path, capsys):
    parts = small_checkpoint_parts()
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, parts)
    second = save_checkpoint(run, 2, parts)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (second / "manifest.json").write_text(text)
    found = checkpoint.latest_valid(run)
    assert found is not None and found[0] == first
    assert "atp: warning: skipping checkpoint step-000002" in capsys.readouterr().err


def test_checkpoint_save_refuses_nan_weights(tmp_path):
    parts = small_checkpoint_parts()
    lora = next(p for n, p in parts[0].named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora[0, 0] = float("nan")
    with pytest.raises(ATPError, match=r"refusing to save the checkpoint of step 4: LoRA weight .*lora_B.* NaN"):
        save_checkpoint(tmp_path / "run", 4, parts)
    assert not (tmp_path / "run" / "checkpoints" / "step-000004").exists()
    with torch.no_grad():
        lora[0, 0] = 0.0
        parts[1].inputs[0, 0] = float("inf")
    with pytest.raises(ATPError, match="generator weight inputs holds NaN or Inf"):
        save_checkpoint(tmp_path / "run", 4, parts)
