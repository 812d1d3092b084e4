"""Issue 34 item 1: where two runs' final pruning decisions differ, for runs that are not cells of one `atp compare`
(which reports this itself). Each argument is a run folder (its report.json), a report.json, or a compare cell's
result.json; the first of each pair is the reference. Prints, per pair, the share of pruned parameters on which
they disagree (atp.diagnostics.overlap: pruned by exactly one of them, over pruned by either), per kind, and the
layers where they differ most; --json writes it all.

    python benchmarks/decision_overlap.py A1 B1 [A2 B2 ...] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_report(path: str) -> dict:
    where = Path(path)
    if where.is_dir():
        where = where / "report.json"
    data = json.loads(where.read_text())
    report = data.get("report", data)  # a compare cell's result.json holds the run's report under "report"
    if "decisions" not in report or "decision_weights" not in report:
        sys.exit(f"{where}: no decisions in it (a run that prunes, from an atp new enough to record them)")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="pairs: reference, other")
    parser.add_argument("--json", help="write the overlaps here")
    args = parser.parse_args()
    if len(args.runs) % 2:
        parser.error("give the runs in pairs (reference, other)")
    from atp import diagnostics

    results, shares = [], []
    for a, b in zip(args.runs[::2], args.runs[1::2]):
        ra, rb = read_report(a), read_report(b)
        weights = diagnostics.expand_weights(ra["decision_weights"])
        found = diagnostics.overlap(diagnostics.decode(ra["decisions"]), diagnostics.decode(rb["decisions"]), weights)
        results.append({"reference": a, "other": b, **found})
        shares.append(found["share"])
        kinds = ", ".join(f"{kind} {entry['share']:.3f}" for kind, entry in found["kinds"].items()
                          if entry["share"] is not None)
        print(f"{a}  vs  {b}: disagree on {found['share']:.3f} of the pruned parameters ({kinds})")
        for kind, entry in found["kinds"].items():
            layers = [(share, layer) for layer, share in enumerate(entry["per_layer"]) if share is not None]
            worst = ", ".join(f"{layer}: {share:.2f}" for share, layer in sorted(layers, reverse=True)[:5])
            print(f"  {kind}: layers differing most {worst}")
    if len(shares) > 1:
        print(f"mean over {len(shares)} pairs: {statistics.mean(shares):.3f} (min {min(shares):.3f}, "
              f"max {max(shares):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
