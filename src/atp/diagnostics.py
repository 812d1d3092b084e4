"""Decision diagnostics: how the generator's decisions move during the search, and how two runs' final decisions
differ.

Decisions are written compactly (`encode`: per kind the gate shape and the 0/1 gates packed into bits, as hex):
one line per generator step in OUT/decisions.jsonl, the final decisions in report.json. A gate's weight is the
number of decoder-block parameters it removes on its own from the dense model (`gate_params`), so that distances
and overlaps can be given as shares of parameters rather than of gates.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import ATPError
from .fsutil import write_text_atomic


def encode(gates: dict) -> dict:
    """{kind: {"shape": [rows, width], "bits": hex of the packed 0/1 gates, row-major}}."""
    out = {}
    for kind, value in gates.items():
        bits = (value.detach().cpu() > 0.5).numpy().astype(np.uint8)
        out[kind] = {"shape": list(bits.shape), "bits": np.packbits(bits.ravel()).tobytes().hex()}
    return out


def decode(encoded: dict) -> dict[str, torch.Tensor]:
    """The 0/1 gates (float) of `encode`'s output."""
    gates = {}
    for kind, entry in encoded.items():
        rows, width = entry["shape"]
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(entry["bits"]), dtype=np.uint8))[: rows * width]
        gates[kind] = torch.from_numpy(bits.reshape(rows, width).astype(np.float32))
    return gates


def gate_params(space) -> dict[str, torch.Tensor]:
    """Per gate, the decoder-block parameters it removes on its own from the dense model: the derivative of the
    kept count at all gates open (a KV head shared with other query heads is not counted with any one of them)."""
    gates = {kind: g.requires_grad_(True) for kind, g in space.full_gates().items()}
    kept = space.remaining_prunable(gates)
    grads = torch.autograd.grad(kept, list(gates.values()), allow_unused=True)
    return {kind: (torch.zeros_like(gates[kind]) if g is None else g.detach().clamp(min=0))
            for kind, g in zip(gates, grads)}


def compact_weights(weights: dict[str, torch.Tensor]) -> dict:
    """Gate weights for report.json: one row per kind where every layer has the same (homogeneous layers)."""
    out = {}
    for kind, value in weights.items():
        same = bool((value == value[:1]).all())
        out[kind] = {"rows": value.shape[0], "row": value[0].tolist()} if same else {"all": value.tolist()}
    return out


def expand_weights(compact: dict) -> dict[str, torch.Tensor]:
    return {kind: torch.tensor(entry["all"]) if "all" in entry else torch.tensor(entry["row"]).repeat(entry["rows"], 1)
            for kind, entry in compact.items()}


def distance(a: dict, b: dict, weights: dict | None = None, prunable: int | None = None) -> dict:
    """How far decisions a are from b: gates that differ, and (with weights) their parameters and the share of
    the prunable parameters those are."""
    out = {"gates": int(sum(int((a[k] != b[k]).sum()) for k in b))}
    if weights is not None:
        params = float(sum(float((weights[k] * (a[k] != b[k])).sum()) for k in b))
        out["params"] = round(params)
        if prunable:
            out["share"] = params / prunable
    return out


def read_lines(path: Path) -> list[dict]:
    """The lines of a decisions.jsonl (none if it is not there); a line cut short by a kill is left out."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def append_line(path: Path, record: dict) -> None:
    """One line, as log.jsonl gets them (append, flushed with the file's close)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_after(path: Path, step: int) -> None:
    """--resume from a checkpoint at `step`: keep the lines up to it (the resumed run writes the later ones)."""
    if path.exists():
        kept = [json.dumps(line) for line in read_lines(path) if line["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def search_diagnostics(lines: list[dict], final: dict, weights: dict, prunable: int, target_step: int | None) -> dict:
    """From a run's decisions.jsonl lines and its final decisions: the distance to the final decisions after each
    generator step (and after the freeze's calibration), the first step from which the decisions no longer move,
    and the comebacks: structures pruned at some generator step from `target_step` on (the step where the ratio
    target reached its final value) and kept at export, per kind with their [layer, index]."""
    if not lines:
        return {}
    steps = [(line["step"], line.get("event", "generator"), decode(line["decisions"])) for line in lines]
    final = {k: v.detach().cpu().float() for k, v in final.items()}
    path = [{"step": step, "event": event, **distance(gates, final, weights, prunable)} for step, event, gates in steps]
    stable = None
    for entry in reversed(path):
        if entry["gates"]:
            break
        stable = entry["step"]
    comebacks = {}
    late = [gates for step, event, gates in steps if event == "generator" and target_step is not None
            and step >= target_step]
    for kind in final:
        pruned = torch.zeros_like(final[kind], dtype=torch.bool)
        for gates in late:
            pruned |= gates[kind] < 0.5
        back = (pruned & (final[kind] > 0.5)).nonzero().tolist()
        comebacks[kind] = {"count": len(back), "which": back}
    moved = None  # gates the freeze's calibration changed, against the last generator step before it
    for i, (_, event, gates) in enumerate(steps):
        if event == "freeze" and i > 0:
            moved = distance(steps[i - 1][2], gates)["gates"]
    return {"distance_to_final": path, "stable_from_step": stable, "target_reached_step": target_step,
            "generator_steps_logged": sum(event == "generator" for _, event, _ in steps),
            "moved_at_freeze": moved, "comebacks": comebacks}


def overlap(a: dict, b: dict, weights: dict) -> dict:
    """Where final decisions a and b differ, per kind and per layer (row): the parameters pruned by exactly one of
    them as a share of those pruned by either (0: the same structures; 1: nothing in common; None: neither prunes
    anything there)."""
    def share(mask_a, mask_b, w):
        either = float((w * (mask_a | mask_b)).sum())
        return None if either == 0 else float((w * (mask_a ^ mask_b)).sum()) / either

    kinds, total = {}, [0.0, 0.0]
    for kind in b:
        if kind not in a:
            raise ATPError(f"the decisions cover different kinds ({sorted(a)} vs {sorted(b)})")
        if a[kind].shape != b[kind].shape:
            raise ATPError(f"the {kind} decisions have different shapes ({list(a[kind].shape)} vs "
                           f"{list(b[kind].shape)}): not the same model or pruning space")
        pa, pb, w = a[kind] < 0.5, b[kind] < 0.5, weights[kind]
        total[0] += float((w * (pa ^ pb)).sum())
        total[1] += float((w * (pa | pb)).sum())
        kinds[kind] = {"share": share(pa, pb, w), "per_layer": [share(pa[r], pb[r], w[r]) for r in range(len(w))]}
    return {"share": None if total[1] == 0 else total[0] / total[1], "kinds": kinds}
