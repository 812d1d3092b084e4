"""Perplexity and logits of GGUF exports in llama.cpp against transformers, on domain text (docs/benchmarks.md).

    PYTHONPATH=src python benchmarks/gguf_check.py --model smollm2-135m --model runs/hc40/model \
        --types f32,f16,q8_0 --domain healthcare --windows 16 --window 256 --out runs/gguf_check.json

Every model is exported to each type; both runtimes score the same token windows (the model's HF tokenizer,
texts of the domain's perplexity task, dev split, joined with EOS, non-overlapping windows).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from atp import llamacpp
from atp.data import get_domain, get_task, load_domain, split
from atp.gguf_export import export_gguf
from atp.models import load_model, resolve_model


def windows_for(tokenizer, domain, n, length):
    tasks = {task.name: records for task, records in load_domain(domain)}
    name = next(t for t in get_domain(domain) if get_task(t).kind == "perplexity" and t in tasks)
    task = get_task(name)
    stream = []
    for record in split(tasks[name], "dev"):
        stream += tokenizer(task.text(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= n * length:
            break
    return name, [stream[i:i + length] for i in range(0, n * length, length)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--types", default="f32,f16,q8_0")
    parser.add_argument("--domain", default="healthcare")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = []
    for name in args.model:
        model, tokenizer = load_model(name)
        task, windows = windows_for(tokenizer, args.domain, args.windows, args.window)
        hf_rows = [llamacpp.hf_logits(model, w) for w in windows]
        hf_ppl = llamacpp.perplexity(windows, lambda ids, rows=iter(hf_rows): next(rows))
        with tempfile.TemporaryDirectory() as folder:
            for gguf_type in args.types.split(","):
                path = Path(folder) / f"{gguf_type}.gguf"
                started = time.time()
                summary = export_gguf(resolve_model(name), path, gguf_type)
                llm = llamacpp.load(path, n_ctx=args.window)
                rows = [llamacpp.logits(llm, w) for w in windows]
                texts = [tokenizer.decode(w) for w in windows[:4]]
                same_tokens = all(llm.tokenize(t.encode(), add_bos=False, special=True)
                                  == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
                ppl = llamacpp.perplexity(windows, lambda ids, it=iter(rows): next(it))
                agree = [llamacpp.agreement(h, r) for h, r in zip(hf_rows, rows)]
                row = {"model": name, "type": gguf_type, "architecture": summary["architecture"], "task": task,
                       "tokens": sum(len(w) - 1 for w in windows), "ppl_transformers": hf_ppl, "ppl_llama_cpp": ppl,
                       "ppl_rel_diff": ppl / hf_ppl - 1,
                       "top1_agreement": sum(a["top1_agreement"] for a in agree) / len(agree),
                       "max_abs_logit_diff": max(a["max_abs_logit_diff"] for a in agree),
                       "max_abs_logit": max(a["max_abs_logit"] for a in agree),
                       "kv_cache_added_fraction": summary["kv_cache_added_fraction"],
                       "file_mib": summary["bytes"] / 2**20, "same_tokenization": same_tokens, "seconds": time.time() - started}
                print(json.dumps(row), flush=True)
                results.append(row)
                llm.close()
    print("\n| model | type | arch | ppl transformers | ppl llama.cpp | diff | top-1 agreement | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['type']} | {r['architecture']} | {r['ppl_transformers']:.3f} | "
              f"{r['ppl_llama_cpp']:.3f} | {r['ppl_rel_diff']:+.2%} | {r['top1_agreement']:.4f} | "
              f"{r['max_abs_logit_diff']:.3g} (of {r['max_abs_logit']:.3g}) |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
