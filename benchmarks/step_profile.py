"""Where a training step's time goes (issue 33's throughput goal): torch.profiler over two windows of a short `atp
prune` run of today's default recipe (SmolLM2, healthcare 40%, 4 x 128 tokens, distillation 0.5, compaction,
--mixed-precision auto): one in the search (full-size masked model, generator steps) and one after the compaction.
The profiler steps on every optimizer step (LoRA and generator), so a window holds both kinds in the search. Per
window: wall seconds, the aten operators' own CPU time grouped (matmuls, vocabulary-wide softmax and losses, ...) as
a share of the wall time; what no aten operator accounts for is Python and framework overhead. The profiler's own
overhead inflates the many small operators: read the shares, not the totals.

    .venv/bin/python benchmarks/step_profile.py --max-steps 40 --out runs/step-profile > runs/step-profile.log 2>&1
"""
import argparse
import collections
import json
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from atp.options import ATPConfig
from atp.precision import cpu_flags, cpu_name
from atp.train import train

GROUPS = {  # operator name prefixes -> group, first match wins
    "matmul": ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "_scaled_dot_product", "scaled_dot_product"),
    "softmax and losses": ("_softmax", "softmax", "_log_softmax", "log_softmax", "nll", "cross_entropy", "kl_div",
                           "logsumexp"),
    "copies and casts": ("copy_", "_to_copy", "to", "clone", "contiguous", "cat", "index", "gather", "scatter",
                         "embedding"),
    "elementwise": ("mul", "add", "sub", "div", "silu", "neg", "pow", "rsqrt", "mean", "sum", "exp", "where",
                    "masked_fill", "fill_", "zero_", "rms_norm", "sigmoid", "lerp", "addcmul", "addcdiv", "sqrt",
                    "_foreach", "norm", "clamp", "abs", "max", "min", "sort", "topk"),
}


def group_of(name: str) -> str:
    op = name.split("::")[-1]
    return next((g for g, prefixes in GROUPS.items() if op.startswith(prefixes)), "other aten")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=8, help="optimizer steps recorded per window")
    parser.add_argument("--out", default="runs/step-profile")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    out = Path(args.out)
    print("cpu:", cpu_name(), "| bf16 flags:", sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
          flush=True)
    # optimizer steps: the search's LoRA steps and about half as many generator steps, then the compact LoRA steps
    search = int(0.6 * args.max_steps)
    first = search // 2
    second = search + search // 2 + (args.max_steps - search) // 2 - args.window // 2
    stamps, windows = [], []

    def ready(prof):
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        groups = collections.Counter()
        for e in events:
            groups[group_of(e.key)] += e.self_cpu_time_total / 1e6
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
        windows.append({"groups_s": dict(groups), "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top],
                        "steps": len(stamps)})

    sched = schedule(skip_first=first - 2, wait=max(second - first - args.window - 2, 0), warmup=2,
                     active=args.window, repeat=2, skip_first_wait=1)
    cfg = ATPConfig(model=args.model, domain="healthcare", out=str(out / "run"), overwrite=True,
                    max_steps=args.max_steps, max_length=128, save_every=0)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched, on_trace_ready=ready) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: (stamps.append(time.perf_counter()), prof.step()))
        try:
            report = train(cfg, progress=False)
        finally:
            hook.remove()
    summary = {"cpu": cpu_name(), "train_seconds": report["train_seconds"], "precision": report["precision"],
               "optimizer_steps": len(stamps), "windows": []}
    for name, w in zip(("search", "compact"), windows):
        end = w["steps"]
        wall = stamps[end - 1] - stamps[end - 1 - args.window]
        recorded = sum(w["groups_s"].values())
        print(f"\n{name} window: optimizer steps {end - args.window + 1}-{end}, wall {wall:.1f} s, "
              f"aten {recorded:.1f} s")
        for group, t in sorted(w["groups_s"].items(), key=lambda kv: -kv[1]):
            print(f"{group:>20}: {100 * t / wall:5.1f}% of the wall time")
        print(f"{'(no aten operator)':>20}: {100 * (1 - recorded / wall):5.1f}%")
        for key, t, count in w["top"]:
            print(f"{key:>40} {100 * t / wall:5.1f}%  calls {count}")
        summary["windows"].append({"name": name, "wall_s": wall, **w})
    (out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
