"""`--mixed-precision auto`: bf16 autocast where the hardware multiplies bf16 natively and it measures faster,
fp32 elsewhere. On CPUs without AMX or AVX512-BF16 a bf16 matmul is emulated and far slower (37x on an AVX2-only
EPYC, docs/benchmarks.md), so those never get bf16; where the flags exist, a micro-benchmark at the model's own
shapes confirms the gain before it is used."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of native bf16 matrix instructions
MIN_SPEEDUP = 1.2  # bf16 must be at least this much faster than fp32 to be worth its rounding


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo does not exist). ATP_CPU_FLAGS, when
    set, replaces them (names separated by spaces or commas; empty: none), to force either path of `auto`."""
    forced = os.environ.get("ATP_CPU_FLAGS")
    if forced is not None:
        return set(forced.replace(",", " ").split())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_speedup(hidden: int, intermediate: int, tokens: int = 512, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a [tokens, hidden] x [hidden, intermediate] matmul (an MLP projection of the model),
    timed alternately (A B A B) so that drift cancels; the best of `repeats` each."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, intermediate)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    for x, y in pairs.values():
        x @ y  # warm-up
    for _ in range(repeats):
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def choose(requested: str, device: torch.device, hidden: int, intermediate: int, flags: set[str] | None = None,
           measure=None) -> dict:
    """The accelerate mixed_precision to use ("no", "bf16", "fp16") and why, for report.json. `hidden` and
    `intermediate` may be callables (read only if the micro-benchmark runs)."""
    if requested != "auto":
        return {"mixed_precision": requested, "requested": requested, "reason": "as given"}
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return {"mixed_precision": "bf16" if bf16 else "no", "requested": "auto",
                "device": torch.cuda.get_device_name(device),
                "reason": "the GPU supports bf16" if bf16 else "the GPU has no bf16"}
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in BF16_CPU_FLAGS if f in flags)
    choice = {"requested": "auto", "device": cpu_name(), "cpu_bf16_flags": native}
    if not native:
        return {**choice, "mixed_precision": "no",
                "reason": "the CPU has neither AMX nor AVX512-BF16: bf16 would be emulated and slower"}
    if callable(hidden):
        hidden, intermediate = hidden(), intermediate()
    speedup = (measure or bf16_speedup)(hidden, intermediate)
    fast = speedup >= MIN_SPEEDUP
    return {**choice, "mixed_precision": "bf16" if fast else "no", "bf16_matmul_speedup": round(speedup, 2),
            "reason": f"bf16 matmuls {speedup:.2f}x fp32 at the model's MLP shape "
                      f"({'at least' if fast else 'below'} {MIN_SPEEDUP}x)"}


def mlp_shape(config) -> tuple[int, int]:
    """(hidden_size, intermediate_size) of a transformers config for the micro-benchmark: the widest layer of a
    per-layer (pruned) config, 4 x hidden where a family has no intermediate_size."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    widths = [getattr(layer, "intermediate_size", None) for layer in getattr(text, "per_layer_config", None) or ()]
    if not widths:
        try:
            widths = [text.intermediate_size]
        except (AttributeError, ValueError):
            widths = []
    widths = [w for w in widths if isinstance(w, int) and w > 0]
    return hidden, max(widths) if widths else 4 * hidden
