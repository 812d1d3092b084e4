"""`atp bench`: dense and pruned models side by side in one process, reported as ratios.

Prefill throughput (tokens/s) at batch 1 and 8, decode throughput with the KV cache at batch 1, parameter
counts, weight memory, KV-cache bytes per token, and on CUDA the peak allocated memory. Each timing is the
median of repeated runs, with models measured in alternation so that drift affects both alike.
"""
from __future__ import annotations

import statistics
import time

import torch

from .arch import arch_for
from .errors import ATPError
from .evaluation import _cache_name as cache_name


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kv_bytes_per_token(model) -> int:
    """Bytes of K and V cached per token, summed over layers (reads pruned per-layer widths when present; a
    removed attention block has no k_proj and caches nothing)."""
    arch = arch_for(model.config)
    dtype_bytes = next(model.parameters()).element_size()
    k_widths = [getattr(getattr(layer, arch.attention), arch.k, None) for layer in arch.decoder_layers(model)]
    return 2 * sum(k.out_features for k in k_widths if k is not None) * dtype_bytes


@torch.inference_mode()
def prefill_seconds(model, batch: int, length: int, vocab: int, device) -> float:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_seconds(model, prompt_length: int, new_tokens: int, vocab: int, device) -> float:
    ids = torch.randint(3, vocab, (1, prompt_length), generator=torch.Generator().manual_seed(1)).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_name(model): cache})
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def benchmark(models: dict, *, repeats: int = 5, prefill_length: int = 512, batches=(1, 8), new_tokens: int = 128,
              decode_prompt: int = 32, warmup: int = 1) -> dict:
    """models: {label: model}, all on one device. Returns per-model medians and ratios to the first model."""
    if min(repeats, prefill_length, new_tokens, decode_prompt, *batches) < 1:
        raise ATPError("repeats, prefill length, new tokens, decode prompt and batch sizes must all be at least 1")
    labels = list(models)
    first = models[labels[0]]
    device = next(first.parameters()).device
    vocab = first.config.vocab_size
    for model in models.values():
        model.eval()
        context = getattr(model.config, "max_position_embeddings", None)
        if context and prefill_length > context:
            raise ATPError(f"prefill length {prefill_length} exceeds the model's context of {context}")
        if context and decode_prompt + new_tokens > context:
            raise ATPError(f"{decode_prompt} prompt tokens + {new_tokens} new tokens exceed the model's context "
                           f"of {context}; lower --new-tokens")
    timings = {label: {f"prefill_b{b}": [] for b in batches} | {"decode": []} for label in labels}
    peaks = {label: 0 for label in labels}
    for round_index in range(warmup + repeats):
        for label in labels:  # alternate models inside each round
            model = models[label]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for b in batches:
                seconds = prefill_seconds(model, b, prefill_length, vocab, device)
                if round_index >= warmup:
                    timings[label][f"prefill_b{b}"].append(seconds)
            seconds = decode_seconds(model, decode_prompt, new_tokens, vocab, device)
            if round_index >= warmup:
                timings[label]["decode"].append(seconds)
            if device.type == "cuda":
                peaks[label] = max(peaks[label], torch.cuda.max_memory_allocated(device))
    results = {}
    for label in labels:
        model = models[label]
        row = {
            "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_bytes_per_token": _kv_bytes_per_token(model),
        }
        for b in batches:
            row[f"prefill_b{b}_tokens_per_s"] = b * prefill_length / statistics.median(timings[label][f"prefill_b{b}"])
        row["decode_tokens_per_s"] = new_tokens / statistics.median(timings[label]["decode"])
        if device.type == "cuda":
            row["peak_allocated_bytes"] = peaks[label]
        results[label] = row
    base = results[labels[0]]
    for label in labels[1:]:
        results[label]["ratio_to_" + labels[0]] = {
            key: (value / base[key]) for key, value in results[label].items() if isinstance(value, (int, float))
        }
    return {
        "device": str(device),
        "dtype": str(next(first.parameters()).dtype).replace("torch.", ""),
        "repeats": repeats,
        "prefill_length": prefill_length,
        "new_tokens": new_tokens,
        "models": results,
    }


def format_bench(result: dict) -> str:
    labels = list(result["models"])
    keys = [k for k in result["models"][labels[0]] if not k.startswith("ratio")]
    lines = [f"device {result['device']}, {result['dtype']}, median of {result['repeats']} runs",
             f"{'':<28}" + "".join(f"{label[-24:]:>26}" for label in labels)]
    for key in keys:
        cells = []
        for label in labels:
            value = result["models"][label][key]
            ratio = result["models"][label].get("ratio_to_" + labels[0], {}).get(key)
            text = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
            cells.append(f"{text + (f' ({ratio:.2f}x)' if ratio is not None else ''):>26}")
        lines.append(f"{key:<28}" + "".join(cells))
    return "\n".join(lines)


def add_bench_arguments(parser):
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="repeat: the first is the reference (e.g. the dense model), then pruned ones")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out results file")
    parser.add_argument("--runtime", choices=["transformers", "llama.cpp"], default="transformers",
                        help="llama.cpp: .gguf files as given, model folders exported at --gguf-type (needs the gguf extra)")
    parser.add_argument("--gguf-type", default="q8_0", choices=["f32", "f16", "q8_0", "q4_0"],
                        help="with --runtime llama.cpp: the type model folders are exported at")
    parser.add_argument("--threads", type=int, help="with --runtime llama.cpp: CPU threads (default: all cores)")
    return parser


def run_bench_command(args) -> int:
    import json

    from .rundir import check_output_file

    if args.out is not None:  # before any model loads
        check_output_file(args.out, "--out", overwrite=getattr(args, "overwrite", False),
                          inputs={f"--model #{i + 1}": name for i, name in enumerate(args.model)})
    if getattr(args, "runtime", "transformers") == "llama.cpp":
        return run_llamacpp_bench(args)

    from . import validation
    from .fsutil import write_text_atomic
    from .models import load_model

    for name in ("repeats", "prefill_length", "new_tokens"):
        validation.at_least(getattr(args, name), 1, name)
    device = validation.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    models = {}
    for name in args.model:
        model, _ = load_model(name, dtype=dtype, attn_implementation="sdpa")
        models[name if name not in models else f"{name} #{len(models)}"] = model.to(device)
    result = benchmark(models, repeats=args.repeats, prefill_length=args.prefill_length, new_tokens=args.new_tokens)
    print(format_bench(result))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(result, indent=2))
    return 0


def run_llamacpp_bench(args) -> int:
    """`atp bench --runtime llama.cpp`: .gguf files as given; model folders exported at --gguf-type first."""
    import contextlib
    import json
    import tempfile
    from pathlib import Path

    from . import llamacpp
    from .fsutil import write_text_atomic
    from .gguf_export import export_gguf
    from .models import resolve_model

    llamacpp.require()
    if args.repeats < 1:
        raise ATPError("--repeats must be at least 1")
    with contextlib.ExitStack() as stack:
        paths = {}
        for name in args.model:
            if name.endswith(".gguf"):
                path = Path(name)
            else:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="atp-bench-"))
                path = Path(folder) / "model.gguf"
                export_gguf(resolve_model(name), path, args.gguf_type)
            paths[name if name not in paths else f"{name} #{len(paths)}"] = path
        result = llamacpp.bench_gguf(paths, repeats=args.repeats, prefill_length=args.prefill_length,
                                     new_tokens=args.new_tokens, n_threads=getattr(args, "threads", None))
        result["dtype"] = "; ".join(sorted({llamacpp.file_type(p) for p in paths.values()}))
    print(format_bench(result))
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2))
    return 0
