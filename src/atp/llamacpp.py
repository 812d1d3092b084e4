"""Running GGUF exports in llama.cpp through llama-cpp-python (the optional `gguf` extra): logits next to
transformers', perplexity, greedy generation, and the timings of `atp bench --runtime llama.cpp`."""
from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

from .errors import ATPError

INSTALL_HINT = ("llama.cpp runs need llama-cpp-python, built from source: pip install -e '.[gguf]' "
                "(see the README; `make test` installs it)")


def require():
    try:
        import llama_cpp
    except ImportError:
        raise ATPError(INSTALL_HINT) from None
    return llama_cpp


def amx_features(info: str | None = None) -> list[str]:
    """The AMX features that llama.cpp's system info reports on (e.g. `AMX_INT8 = 1`): ggml's AMX backend crashes
    q8_0 / q4_0 models on Intel CPUs with AMX (llama.cpp issue 20824), so atp's build (`make gguf`) turns it off."""
    if info is None:
        info = require().llama_print_system_info().decode()
    return re.findall(r"\b(AMX\w*) = 1\b", info)


def load(path, *, n_ctx: int = 512, logits_all: bool = True, n_threads: int | None = None, n_batch: int | None = None,
         f32_cache: bool = False, flash_attn: bool = False):
    """A llama_cpp.Llama for a .gguf file, with llama.cpp's logging off. f32_cache: keep K and V in f32 rather
    than llama.cpp's default f16, for comparisons that should show float rounding only. flash_attn: as llama.cpp's own
    programs resolve their default (`-fa auto`) on CPU; without it llama.cpp pads the V cache of layers with
    fewer KV heads to the widest layer."""
    llama_cpp = require()
    path = Path(path)
    if not path.is_file():
        raise ATPError(f"no GGUF file at {path}")
    threads = n_threads or os.cpu_count() or 1
    batch = n_batch or n_ctx
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, logits_all=logits_all,
                               n_threads=threads, n_threads_batch=threads, verbose=False, flash_attn=flash_attn, **cache)
    except (ValueError, RuntimeError) as err:
        raise ATPError(f"llama.cpp could not load {path}: {err}") from None


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits for one sequence from position 0 (needs logits_all=True)."""
    if len(ids) > llm.n_ctx():
        raise ATPError(f"{len(ids)} tokens exceed the llama.cpp context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement and max |logit diff| of two [tokens, vocab] logit arrays (the first is the reference)."""
    n = min(reference.shape[1], other.shape[1])
    reference, other = reference[:, :n], other[:, :n]
    return {"top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(reference - other).max()),
            "max_abs_logit": float(np.abs(reference).max())}


def nll_sum(logit_rows: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits of ids[:-1], in float64."""
    x = logit_rows[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def perplexity(windows: list[list[int]], score) -> float:
    """exp(mean NLL) over non-overlapping windows; score(ids) gives [len(ids), vocab] logits."""
    total, count = 0.0, 0
    for ids in windows:
        total += nll_sum(score(ids), ids)
        count += len(ids) - 1
    return float(np.exp(total / count))


def greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation with llama.cpp's own sampler (temperature 0)."""
    out = []
    for token in llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


# ---- atp bench --runtime llama.cpp ----

def kv_bytes_per_token(path) -> int:
    """K and V bytes cached per token (f16 cache, llama.cpp's default), from the GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    n_layers = reader.fields[f"{arch}.block_count"].contents()
    kv = reader.fields[f"{arch}.attention.head_count_kv"].contents()
    kv = kv if isinstance(kv, list) else [kv] * n_layers
    key = f"{arch}.attention.key_length"
    if key in reader.fields:
        head_dim = reader.fields[key].contents()
    else:
        head_dim = reader.fields[f"{arch}.embedding_length"].contents() // reader.fields[f"{arch}.attention.head_count"].contents()
    return 2 * sum(kv) * head_dim * 2


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_gguf(paths: dict, *, repeats: int = 5, prefill_length: int = 512, new_tokens: int = 128,
               decode_prompt: int = 32, warmup: int = 1, n_threads: int | None = None, flash_attn: bool = True) -> dict:
    """paths: {label: .gguf}. Prefill (batch 1, one llama_decode of prefill_length tokens) and decode (one token
    per llama_decode after a decode_prompt-token prompt) throughput, medians, models measured in alternation."""
    labels = list(paths)
    n_ctx = max(prefill_length, decode_prompt + new_tokens) + 8
    models = {label: load(paths[label], n_ctx=n_ctx, logits_all=False, n_threads=n_threads, n_batch=prefill_length,
                          flash_attn=flash_attn) for label in labels}
    vocab = min(m.n_vocab() for m in models.values())
    rng = np.random.default_rng(0)
    prefill_ids = rng.integers(3, vocab, prefill_length).tolist()
    prompt_ids = rng.integers(3, vocab, decode_prompt).tolist()
    step_ids = rng.integers(3, vocab, new_tokens).tolist()
    timings = {label: {"prefill": [], "decode": []} for label in labels}
    for round_index in range(warmup + repeats):
        for label in labels:
            llm = models[label]
            llm.reset()
            prefill = _timed(lambda: llm.eval(prefill_ids))
            llm.reset()
            llm.eval(prompt_ids)

            def decode():
                for token in step_ids:
                    llm.eval([token])

            seconds = _timed(decode)
            if round_index >= warmup:
                timings[label]["prefill"].append(prefill)
                timings[label]["decode"].append(seconds)
    results = {}
    for label in labels:
        llm = models[label]
        results[label] = {
            "params": int(llm._model.n_params()),
            "file_bytes": Path(paths[label]).stat().st_size,
            "kv_bytes_per_token": kv_bytes_per_token(paths[label]),
            "prefill_b1_tokens_per_s": prefill_length / statistics.median(timings[label]["prefill"]),
            "decode_tokens_per_s": new_tokens / statistics.median(timings[label]["decode"]),
        }
    for llm in models.values():
        llm.close()
    base = results[labels[0]]
    for label in labels[1:]:
        results[label]["ratio_to_" + labels[0]] = {k: v / base[k] for k, v in results[label].items()
                                                   if isinstance(v, (int, float))}
    threads = n_threads or os.cpu_count()
    return {"device": f"cpu, llama.cpp ({threads} threads, flash attention {'on' if flash_attn else 'off'})", "dtype": "gguf", "repeats": repeats,
            "prefill_length": prefill_length, "new_tokens": new_tokens, "models": results}


def file_type(path) -> str:
    """The tensor type a GGUF file records (e.g. `gguf q8_0`)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "gguf"
    return f"gguf {gguf.LlamaFileType(field.contents()).name.removeprefix('MOSTLY_').removeprefix('ALL_').lower()}"
