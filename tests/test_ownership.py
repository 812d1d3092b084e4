"""Who owns an output (issue 31): a run folder is locked by its live process, no command writes over its own inputs
or over what it did not make, --overwrite keeps a finished run until the new one has exported, SIGTERM is handled
like Ctrl-C, and a real full disk is a clear error. docs/reliability.md, "Who owns an output"."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from atp.cli import main
from atp.rundir import LOCK_NAME
from helpers import prune_argv, snapshot

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def start_prune(argv):
    return subprocess.Popen([sys.executable, "-m", "atp.cli", *argv], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def hold_lock(folder):
    """A real process that locks `folder` as a run does, and sleeps."""
    code = f"import time, atp.rundir as r; r.acquire({str(folder)!r}); print('locked', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ----------------------------------------------------------------------------- eval and bench results


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_results_files_are_never_written_over_inputs_or_without_overwrite(command, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    argv = (["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data)] if command == "eval"
            else ["bench", "--model", str(tiny_model_dir), "--repeats", "1", "--prefill-length", "8",
                  "--new-tokens", "2"])
    weights = tiny_model_dir / "model.safetensors"
    before = weights.read_bytes()
    assert main(argv + ["--out", str(weights), "--overwrite"]) == 2  # was: 391 bytes of JSON where the weights were
    assert f"--out {weights} lies inside the --model" in capsys.readouterr().err
    assert weights.read_bytes() == before
    if command == "eval":
        assert main(argv + ["--out", str(data)]) == 2
        assert "atp never writes over its own inputs" in capsys.readouterr().err
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(argv + ["--out", str(other)]) == 2
    assert f"--out {other} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(argv + ["--out", str(other), "--overwrite"]) == 2
    assert "is not a JSON results file" in capsys.readouterr().err and other.read_text() == "mine"
    assert main(argv + ["--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    result = tmp_path / "result.json"
    assert main(argv + ["--out", str(result)]) == 0
    assert main(argv + ["--out", str(result)]) == 2  # a result of ours is replaced only with --overwrite
    assert main(argv + ["--out", str(result), "--overwrite"]) == 0
    assert json.loads(result.read_text())


# ----------------------------------------------------------------------------- prune's run folder


def test_a_run_folder_in_use_by_a_live_process_is_refused(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        for extra in ([], ["--overwrite"]):  # was: the live run's files moved aside as leftovers, both exit 0
            assert main(prune_argv(tiny_model_dir, train_file, run, *extra)) == 2
            err = capsys.readouterr().err
            assert f"{run} is in use by another atp process {holder.pid}; wait for it" in err
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    assert not (run / LOCK_NAME).exists() and (run / "model" / "config.json").exists()


def test_resume_while_the_run_is_alive_is_refused(earlier_run, tiny_model_dir, train_file, capsys):
    run, before = earlier_run
    holder = hold_lock(run)
    try:
        assert main(["prune", "--resume", str(run)]) == 2
        assert f"in use by another atp process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run) == {**before, LOCK_NAME: f"{holder.pid}\n".encode()}  # the dead holder's lock file only


@pytest.mark.parametrize("flag", ["--model", "--teacher"])
def test_a_run_never_writes_over_its_own_inputs(flag, earlier_run, tiny_model_dir, train_file, tmp_path, capsys):
    run, before = earlier_run
    if flag == "--model":  # was: the input model deleted, and report.json named the pruned output as its base
        argv = prune_argv(run / "model", train_file, run, "--overwrite")
    else:
        argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--teacher", str(run), "--distill", "0.5")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {run} holds the {flag}" in err or f"--out {run} is the {flag}" in err
    assert snapshot(run) == before


def test_train_files_and_data_are_inputs_too(tiny_model_dir, train_file, shared_data, capsys):
    assert main(prune_argv(tiny_model_dir, train_file, train_file)) == 2
    assert f"--out {train_file} is the --train-file #1" in capsys.readouterr().err
    out = shared_data / "run"
    argv = prune_argv(tiny_model_dir, train_file, out, "--domain", "healthcare", "--data-dir", str(shared_data))
    assert main(argv) == 2
    assert f"--out {out} lies inside the --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["", "/", "~"])
def test_empty_or_root_like_out_is_refused(out, tiny_model_dir, train_file, capsys):
    assert main(prune_argv(tiny_model_dir, train_file, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert ("--out is empty" in err) if out == "" else ("a root or home folder" in err)


def test_overwrite_replaces_only_what_atp_made(tiny_model_dir, train_file, tmp_path, capsys):
    folder = tmp_path / "project"  # e.g. `--out $UNSET` in a project folder with a model/ of the user's
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(b"mine")
    (folder / "checkpoints").mkdir()
    before = snapshot(folder)
    assert main(prune_argv(tiny_model_dir, train_file, folder, "--overwrite")) == 2
    assert "holds checkpoints, model, which no atp run made" in capsys.readouterr().err
    assert snapshot(folder) == before
    (folder / "config.yaml").write_text("name: my project\n")  # a config.yaml that is not atp's
    assert main(prune_argv(tiny_model_dir, train_file, folder, "--overwrite")) == 2
    assert "which no atp run made" in capsys.readouterr().err
    assert (folder / "model" / "weights.bin").read_bytes() == b"mine"


def test_overwrite_keeps_the_finished_run_until_the_new_one_exports(earlier_run, tiny_model_dir, train_file,
                                                                     monkeypatch, capsys):
    import atp.regularization as reg

    run, before = earlier_run
    calls = {"n": 0}
    real = reg.ratio_loss

    def nan_from_step_3(ratio, target):
        calls["n"] += 1
        return real(ratio, target) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(reg, "ratio_loss", nan_from_step_3)
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--generator-every", "1", "--max-steps", "8",
                      "--save-every", "1")
    assert main(argv) == 2  # NaN at step 3, after the new run's first checkpoints
    err = capsys.readouterr().err
    assert "ratio_loss became nan at step 3" in err and "is kept in" in err
    kept = list(run.glob(".replaced-run-*"))
    assert len(kept) == 1  # was: the finished model deleted at the new run's first checkpoint
    assert snapshot(kept[0]) == {k: v for k, v in before.items()}
    assert any((run / "checkpoints").glob("step-*"))  # the new run is resumable
    monkeypatch.undo()
    assert main(["prune", "--resume", str(run)]) == 0  # finishing it is what lets the earlier run go
    assert not list(run.glob(".replaced-run-*"))
    assert json.loads((run / "report.json").read_text())["config"]["max_steps"] == 8


def test_a_fresh_overwrite_after_a_failed_one_keeps_the_finished_run_too(earlier_run, tiny_model_dir, train_file,
                                                                        monkeypatch, capsys):
    import atp.regularization as reg

    run, before = earlier_run
    calls = {"n": 0}
    real = reg.ratio_loss
    monkeypatch.setattr(reg, "ratio_loss", lambda r, t: real(r, t) * (float("nan") if (calls.update(
        n=calls["n"] + 1) or calls["n"]) >= 3 else 1.0))
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--generator-every", "1", "--max-steps", "8",
                      "--save-every", "1")
    assert main(argv) == 2
    calls["n"] = 0
    assert main(argv) == 2  # fails again: the failed run is replaced, the finished one still kept
    kept = list(run.glob(".replaced-run-*"))
    assert len(kept) == 1 and snapshot(kept[0]) == before
    monkeypatch.undo()
    assert main(argv) == 0
    assert not list(run.glob(".replaced-run-*")) and (run / "model" / "config.json").exists()


# ----------------------------------------------------------------------------- signals and a full disk


def test_sigterm_is_handled_like_ctrl_c(earlier_run, tiny_model_dir, train_file):
    run, before = earlier_run
    proc = start_prune(prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--max-steps", "2000"))
    wait_for(lambda: list(run.glob(".replaced-run-*")) and (run / "config.yaml").exists()
             and "2000" in (run / "config.yaml").read_text(), proc, "it replaced the earlier run")
    proc.send_signal(signal.SIGTERM)  # a real signal to a real process (was: killed on the spot, nothing put back)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "atp: terminated" in err and "the earlier run in" in err
    assert snapshot(run) == before  # moved back, no temps, no lock file


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly full file system: a 96 KiB tmpfs (needs root, as in CI and on the development machines)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "96k"):
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_during_the_export_is_a_clear_error(small_disk, tiny_model_dir, train_file, capsys):
    run = small_disk / "run"  # config.yaml and the log fit; the model (hundreds of KiB) does not
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 2
    err = capsys.readouterr().err
    assert "atp: error: no space left on device while writing the model to" in err and "Traceback" not in err
    assert not list(small_disk.rglob(".model.tmp-*"))  # no half-written export


def test_a_real_full_disk_while_saving_a_checkpoint_is_a_clear_error(small_disk, tmp_path):
    """safetensors' own error on a full disk (was: a SafetensorError traceback)."""
    import torch
    from safetensors.torch import save_file

    from atp.errors import ATPError
    from atp.fsutil import atomic_dir

    with pytest.raises(ATPError, match="no space left on device while writing the checkpoint"):
        with atomic_dir(small_disk / "ckpt", "the checkpoint") as tmp:
            save_file({"w": torch.zeros(64, 1024)}, str(tmp / "lora.safetensors"))
    assert list(small_disk.iterdir()) == []


def test_compare_out_folder_ownership(tiny_model_dir, tmp_path, shared_data, capsys):
    import yaml

    def compare(out, dry_run=False):
        config = {"model": str(tiny_model_dir), "out": str(out), "data_dir": str(shared_data), "methods": ["atp"],
                  "references": False, "train": {"max_steps": 1}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        return main(["compare", "--config", str(path)] + (["--dry-run"] if dry_run else []))

    assert compare("", dry_run=True) == 2
    assert "out in" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert compare(mine) == 2
    assert f"out {mine} holds files that atp compare did not write (thesis.tex)" in capsys.readouterr().err
    assert compare(tiny_model_dir / "cmp") == 2
    assert "lies inside the model" in capsys.readouterr().err
    busy = tmp_path / "busy"
    holder = hold_lock(busy)
    try:
        assert compare(busy) == 2
        assert f"in use by another atp process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_gguf_targets_are_never_inputs(tiny_model_dir, train_file, tmp_path, capsys):
    target = tiny_model_dir / "model.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--gguf", str(target), "--gguf-type", "f32"]) == 2
    assert f"--gguf {target} lies inside the --model" in capsys.readouterr().err
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run", "--gguf", str(target))) == 2
    assert f"--gguf {target} lies inside the --model" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "run").exists()


def test_a_real_read_only_file_system_is_a_clear_error(tiny_model_dir, train_file, tmp_path, capsys):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main(prune_argv(tiny_model_dir, train_file, disk / "run")) == 2
        err = capsys.readouterr().err
        assert f"atp: error: cannot write {disk / 'run'}: read-only file system" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
