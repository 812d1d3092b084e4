"""Where a training step's time goes (issue 33's throughput goal): torch.profiler around a short `atp prune` run of
today's default recipe (SmolLM2, healthcare 40%, 4 x 128 tokens, distillation 0.5, compaction, --mixed-precision
auto), operators ranked by their own CPU time and grouped (matmuls, vocabulary-wide softmax and losses, the rest).
The profiler's own overhead inflates the many small operators, so read the shares, not the totals.

    .venv/bin/python benchmarks/step_profile.py --max-steps 30 --out runs/step-profile > runs/step-profile.log 2>&1
"""
import argparse
import collections
import json
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from atp.options import ATPConfig
from atp.precision import cpu_flags, cpu_name
from atp.train import train

GROUPS = {  # operator name fragments -> group, first match wins
    "matmul": ("mm", "matmul", "linear", "bmm", "addmm", "baddbmm", "scaled_dot_product", "flash_attention"),
    "softmax and losses": ("softmax", "log_softmax", "nll", "cross_entropy", "kl_div", "logsumexp", "_softmax"),
    "copies and casts": ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "index", "gather", "scatter"),
    "optimizer": ("adam", "_foreach", "lerp", "addcmul", "addcdiv", "sqrt"),
    "elementwise": ("mul", "add", "sub", "div", "silu", "neg", "pow", "rsqrt", "mean", "sum", "exp", "where",
                    "masked_fill", "fill_", "zero_", "rms_norm", "sigmoid"),
}


def group_of(name: str) -> str:
    op = name.split("::")[-1]
    for group, fragments in GROUPS.items():
        if any(op == f or op.startswith(f + "_") or op.startswith(f) for f in fragments):
            return group
    return "other"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--out", default="runs/step-profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    out = Path(args.out)
    print("cpu:", cpu_name(), "| bf16 flags:", sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
          flush=True)
    cfg = ATPConfig(model=args.model, domain="healthcare", out=str(out / "run"), overwrite=True,
                    max_steps=args.max_steps, max_length=128, save_every=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        report = train(cfg, progress=False)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    groups = collections.Counter()
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    print(f"train_seconds {report['train_seconds']:.1f}, precision {report['precision']['mixed_precision']}, "
          f"aten self CPU {total / 1e6:.1f} s")
    for group, t in groups.most_common():
        print(f"{group:>20}: {100 * t / total:5.1f}%")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    for e in top:
        print(f"{e.key:>40} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")
    summary = {"cpu": cpu_name(), "train_seconds": report["train_seconds"], "precision": report["precision"],
               "groups": {g: t / total for g, t in groups.items()},
               "top": [(e.key, e.self_cpu_time_total / total, e.count) for e in top]}
    (out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
