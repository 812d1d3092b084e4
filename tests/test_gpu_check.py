"""benchmarks/gpu_check.py --tiny: the GPU check's whole path (random model, bf16 and QLoRA variants, export,
logits check, planner side by side) on CPU with a tiny config."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--max-steps", "4",
                           "--max-length", "64", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["variant"] for r in results] == ["bf16", "qlora-nf4"]
    for r in results:
        assert r["logits_check"]["passed"] and r["generator_dtypes"] == ["torch.float32"]
        assert r["measured_peak_gib"] > 0 and r["planned_train_peak_gib"] > 0 and r["mean_step_seconds"] > 0
    assert results[1]["logits_check"]["quantize_base"] == "nf4"
    assert "peak GiB" in done.stdout and "planned" in done.stdout
    assert not (tmp_path / "bf16" / "model").exists()  # exports removed, reports kept
