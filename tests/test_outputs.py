"""Where results go, and replacing an earlier run: unwritable or full output folders, temps left by killed
writes, --overwrite checking every input before it touches the earlier run. docs/reliability.md,
"Where results go" and "Replacing an earlier run"."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from atp.cli import main
from atp.errors import ATPError
from atp.fsutil import atomic_dir, clean_stale_temps
from helpers import dead_pid, prune_argv, save_checkpoint, small_checkpoint_parts, snapshot

# ----------------------------------------------------------------------------- where results are written

@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"),
                                          (errno.EPERM, "immutable"),
                                          (errno.EACCES, "permission denied")])
def test_unwritable_run_dir_is_a_clear_error(code, reason, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    # root ignores file modes (and chattr +i needs a file system that has it), so the OS's refusal is simulated
    from pathlib import Path

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == tmp_path / "run":
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"atp: error: cannot write {tmp_path / 'run'}: " in err and reason in err


def test_run_dir_under_a_file(tiny_model_dir, train_file, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "afile" / "run")) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_full_disk_while_saving_a_checkpoint(failure, tmp_path, monkeypatch):
    parts = small_checkpoint_parts()

    def full_disk(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ATPError, match=r"no space left on device while writing the checkpoint of step 3 to "
                                       r".*step-000003; .* MiB free there"):
        save_checkpoint(tmp_path / "run", 3, parts)
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # no half-written folder, no temp


def test_cli_translates_os_and_input_errors(monkeypatch, capsys):
    import atp.models

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/model.safetensors"),
         "no space left on device while writing /data/runs/x/model.safetensors"),
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), "no space left on device"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "cannot write /ro/out: read-only file system"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text (invalid start byte at byte 0)"),
    ]
    for error, message in cases:
        def fail(name, error=error):
            raise error

        monkeypatch.setattr(atp.models, "resolve_model", fail)
        assert main(["prepare", "--model", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("atp: error: ") and message in err and "Traceback" not in err
    monkeypatch.setattr(atp.models, "resolve_model", lambda name: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        main(["prepare", "--model", "x"])


def test_eval_out_is_checked_before_evaluating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import atp.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(atp.models, "load_model", never)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    (tmp_path / "afile").write_text("x")
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data), "--out"]
    assert main(argv + [str(tmp_path / "afile" / "eval.json")]) == 2
    assert f"cannot write --out file to {tmp_path / 'afile' / 'eval.json'}: {tmp_path / 'afile'} is a file" in \
        capsys.readouterr().err
    (tmp_path / "afolder").mkdir()
    assert main(argv + [str(tmp_path / "afolder")]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- interrupted writes

def test_stale_temps_of_dead_processes_are_cleaned(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / f".model.tmp-{dead}-abcd1234", run / ".model.tmp-x1y2z3w4",  # older atp: no pid
             run / "checkpoints" / f".step-000030.tmp-{dead}-0a1b2c3d", run / f".report.json.tmp-{dead}-qwertyui"]
    for path in stale[:3]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    stale[3].write_text("{")
    kept = [run / f".model.tmp-{alive}-live0000", run / ".hidden", run / "notes.tmp", run / "checkpoints" / "step-000020"]
    for path in kept:
        path.mkdir()
    (run / f".export.old-{dead}").mkdir()  # died between moving `export` aside and moving the new one in
    removed = clean_stale_temps(run)
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (run / "export").is_dir() and not (run / f".export.old-{dead}").exists()


def test_a_write_killed_with_sigkill_is_cleaned_on_the_next_write(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from atp.fsutil import atomic_dir
        with atomic_dir({str(tmp_path / 'model')!r}, "the model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"0" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_new_run_cleans_what_a_killed_export_left(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    leftover = run / f".model.tmp-{dead_pid()}-abcdefgh"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(prune_argv(tiny_model_dir, train_file, run, "--overwrite")) == 0
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- replacing an earlier run

def test_overwrite_checks_every_input_before_touching_the_earlier_run(earlier_run, tiny_model_dir, train_file,
                                                                      tmp_path, capsys):
    run, before = earlier_run
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text('{"model_type": "llama", "hidden_size": 4')
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"QUESTION": "q?"\n')
    cases = [(prune_argv(tiny_model_dir, tmp_path / "typo.jsonl", run, "--overwrite"), "typo.jsonl not found"),
             (prune_argv(tiny_model_dir, bad_json, run, "--overwrite"), "bad.jsonl:1: malformed JSON"),
             (prune_argv(broken_model, train_file, run, "--overwrite"), "config.json is not a readable JSON config"),
             (prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--lora-targets", "qkv"),
              "--lora-targets qkv: no such linear layer")]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert snapshot(run) == before, message


def test_overwrite_restores_the_earlier_run_when_the_new_one_fails_before_its_first_checkpoint(
        earlier_run, tiny_model_dir, train_file, monkeypatch, capsys):
    import atp.regularization as reg

    run, before = earlier_run
    real = reg.ratio_loss
    monkeypatch.setattr(reg, "ratio_loss", lambda ratio, target: real(ratio, target) * float("nan"))
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--generator-every", "1", "--max-steps", "3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ratio_loss became nan at step 1" in err and "the earlier run in" in err
    assert snapshot(run) == before
    monkeypatch.undo()
    assert main(argv) == 0  # the same run, healthy: it replaces the earlier one
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert json.loads((run / "report.json").read_text())["config"]["max_steps"] == 3
    assert not list(run.glob(".replaced-run-*"))


def test_a_run_killed_while_replacing_is_rolled_back_by_the_next_run(earlier_run, tiny_model_dir, train_file,
                                                                      capsys):
    run, before = earlier_run
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--max-steps", "2000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "atp.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 300
    while not (list(run.glob(".replaced-run-*")) and (run / "config.yaml").exists()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it replaced the earlier one"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert "max_steps: 2000" in (run / "config.yaml").read_text() and not (run / "model").exists()
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 2  # no --overwrite: the restored run is kept
    err = capsys.readouterr().err
    assert f"restored the run in {run} that an interrupted run (process {proc.pid}) was replacing" in err
    assert "already exists and is not empty" in err
    assert snapshot(run) == before


def test_demo_follows_the_overwrite_rule(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["demo", "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2", "--max-length", "32",
            "--limit", "1"]
    assert main(argv) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "demo_results.json").exists()
    assert main(argv) == 2  # a finished demo is not replaced without --overwrite either


# ----------------------------------------------------------------------------- a failed run and its rerun

def test_a_failed_run_does_not_block_its_rerun(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    import atp.regularization as reg

    run = tmp_path / "run"
    real = reg.ratio_loss
    monkeypatch.setattr(reg, "ratio_loss", lambda ratio, target: real(ratio, target) * float("nan"))
    argv = prune_argv(tiny_model_dir, train_file, run, "--generator-every", "1")
    assert main(argv) == 2
    assert "ratio_loss became nan at step 1" in capsys.readouterr().err
    assert not run.exists()  # the failed run leaves the folder as it found it: absent
    monkeypatch.undo()
    assert main(argv) == 0  # the corrected rerun, without --overwrite


def test_what_a_run_without_checkpoints_left_is_replaceable(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 2\n")  # e.g. an older atp, or a run killed before its checkpoint
    (run / "log.jsonl").write_text('{"step": 1}\n')
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    assert f"replacing config.yaml, log.jsonl in {run}, left by a run that stopped before its first checkpoint" in \
        capsys.readouterr().err
    (run / "checkpoints").mkdir()  # a run with checkpoints (or a report, or a model) needs --overwrite
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
