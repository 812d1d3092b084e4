"""Helpers shared by the test files (fixtures live in conftest.py)."""
import subprocess
import sys


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def prune_argv(model_dir, train_file, out, *extra):
    """`atp prune` on a tiny model folder and a PubMedQA file: two short steps, no checkpoints."""
    return ["prune", "--model", str(model_dir), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--mlp-block", "4",
            "--save-every", "0", *extra]


def snapshot(folder) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
