"""FSDP2 through accelerate on 2 CPU processes (gloo): the frozen base is sharded, LoRA and the generator stay
whole on every process; the export (gathered on the main process) equals a 1-process run with the same global
batch, and an interrupted sharded run resumes to the same model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_reliability import prune_args

REPO = Path(__file__).resolve().parents[1]
FSDP2 = REPO / "configs" / "accelerate" / "fsdp2.yaml"


def launch(args, env, processes=2):
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--config_file", str(FSDP2), "--num_processes", str(processes),
           "--mixed_precision", "no", "-m", "atp.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_fsdp2_two_processes_match_one_process_and_resume(tiny_model_dir, train_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "ACCELERATE_USE_CPU": "true"}
    common = prune_args(tiny_model_dir, train_file, "X")
    common[common.index("--max-steps") + 1] = "20"
    common[common.index("--save-every") + 1] = "10"
    out_at, batch_at = common.index("--out") + 1, common.index("--batch-size") + 1

    def args(out, batch):
        values = list(common)
        values[out_at], values[batch_at] = str(out), str(batch)
        return values

    one = subprocess.run([sys.executable, "-m", "atp.cli", *args(tmp_path / "one", 4)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    done = launch(args(tmp_path / "two", 2), env)
    assert done.returncode == 0, done.stderr[-3000:]
    a_report, b_report = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert b_report["processes"] == 2 and b_report["decisions_identical_across_processes"]
    assert b_report["distributed_type"] == "FSDP" and a_report["distributed_type"] == "NO"
    # the base weights (3 layers x 7 projections, 2 norms each, embeddings, final norm, head) sharded, LoRA whole
    assert b_report["fsdp_sharded_params"] == 3 * 9 + 3 and b_report["fsdp_replicated_lora_params"] == 3 * 7 * 2
    assert a_report["layers"] == b_report["layers"] and b_report["logits_check"]["passed"]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)

    # resume under FSDP from the step-10 checkpoint: the same export as the uninterrupted run
    resumed = tmp_path / "resumed"
    (resumed).mkdir()
    import shutil

    shutil.copytree(tmp_path / "two" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step-000020")
    for name in ("config.yaml", "log.jsonl"):
        shutil.copy(tmp_path / "two" / name, resumed / name)
    done = launch(["prune", "--resume", str(resumed)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    c = load_file(str(resumed / "model" / "model.safetensors"))
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_refuses_full_recovery_and_a_quantized_base(tiny_model_dir, train_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "ACCELERATE_USE_CPU": "true"}
    for extra, message in ((["--recovery", "full"], "--recovery full runs in one process or with DDP"),
                           (["--quantize-base", "nf4"], "--quantize-base does not shard under FSDP")):
        done = launch(prune_args(tiny_model_dir, train_file, tmp_path / "x") + extra, env)
        assert done.returncode != 0 and f"atp: error: {message}" in done.stderr, done.stderr[-2000:]
