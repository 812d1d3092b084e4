"""Short prepared GPU check (issue 6): bf16 + sdpa on SmolLM2, a few ATP steps, export, logits check.

    ATP_HOME=.atp_home python benchmarks/gpu_check.py --out runs/gpu-check   # on a machine with CUDA

Exits non-zero if CUDA is missing, the exported model fails the logits check, or the generator is not fp32.
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file

from atp.train import ATPConfig, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")
    cfg = ATPConfig(model=args.model, domain="healthcare", sparsity=0.4, out=args.out, overwrite=True,
                    max_steps=args.max_steps, save_every=args.max_steps, mixed_precision="bf16",
                    attn_implementation="sdpa", generator_every=1, log_every=5)
    report = train(cfg, progress=False)
    generator = load_file(f"{args.out}/checkpoints/step-{args.max_steps:06d}/generator.safetensors")
    summary = {
        "device": torch.cuda.get_device_name(0),
        "logits_check": report["logits_check"],
        "prunable_sparsity": report["prunable_sparsity"],
        "generator_dtypes": sorted({str(t.dtype) for t in generator.values()}),
        "mean_step_seconds": report["mean_step_seconds"],
        "train_seconds": report["train_seconds"],
    }
    print(json.dumps(summary, indent=2))
    ok = report["logits_check"]["passed"] and summary["generator_dtypes"] == ["torch.float32"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
