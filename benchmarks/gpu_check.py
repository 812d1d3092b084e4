"""One-command GPU check (issues 6 and 35), nothing downloaded: a randomly initialised model with Llama-3-8B's
shapes, 20 ATP steps with the base in bf16 autocast (fp32 weights, as atp loads them) and with a QLoRA (NF4) base,
then the export and its logits check; peak memory, step time and the planner's prediction side by side.

    python benchmarks/gpu_check.py --out runs/gpu-check           # CUDA; the 8B model needs ~32 GB host RAM
    python benchmarks/gpu_check.py --tiny --out runs/gpu-check     # CPU, a tiny config (tests/test_gpu_check.py)

Each variant runs in a child process. Measured peak: torch.cuda.max_memory_allocated plus the CUDA context the
planner counts (CUDA), or the child's peak RSS (CPU, with glibc's mmap threshold fixed as in
benchmarks/plan_check.py). Exits non-zero if a logits check fails or the generator is not fp32.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
VARIANTS = {"bf16": "none", "qlora-nf4": "nf4"}


def write_model(folder: Path, shapes: dict, data: Path) -> None:
    """A random Llama with these shapes (saved in bf16, or fp32 when tiny) and a byte-level BPE tokenizer trained
    here on the generated domain rows."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return
    texts = [line for path in sorted(data.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(shapes["vocab_size"], 2048),
                                                        special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    small = shapes["hidden_size"] < 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if small else torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def run_variant(args) -> dict:
    """One variant in this process: train, export, check; the summary as a dict."""
    import torch
    from safetensors.torch import load_file

    from atp.options import ATPConfig
    from atp.plan import PlanOptions, load_config, plan_memory
    from atp.train import train

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = Path(args.out) / args.variant
    cfg = ATPConfig(model=str(args.model_dir), domain="healthcare", data_dir=str(args.data_dir), sparsity=0.4,
                    out=str(out), overwrite=True, max_steps=args.max_steps, save_every=args.max_steps,
                    batch_size=args.batch_size, max_length=args.max_length, generator_every=1, log_every=5,
                    mixed_precision="bf16" if cuda else "no", attn_implementation="sdpa",
                    gradient_checkpointing=True, quantize_base=VARIANTS[args.variant],
                    mlp_block=4 if args.tiny else 32)
    report = train(cfg, progress=False)
    plan = plan_memory(load_config(str(args.model_dir)), PlanOptions(
        quantize_base=cfg.quantize_base, batch_size=cfg.batch_size, max_length=cfg.max_length,
        gradient_checkpointing=True, distill=cfg.distill, mlp_block=cfg.mlp_block, mixed_precision=cfg.mixed_precision,
        device="cuda" if cuda else "cpu"))
    generator = load_file(str(out / "checkpoints" / f"step-{args.max_steps:06d}" / "generator.safetensors"))
    if cuda:
        measured = torch.cuda.max_memory_allocated() + plan.parts["runtime"]
        what = "torch.cuda.max_memory_allocated + CUDA context"
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        what = "peak RSS"
    shutil.rmtree(out / "model", ignore_errors=True)  # an 8B export is tens of GB; the report stays
    return {"variant": args.variant, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "logits_check": report["logits_check"], "prunable_sparsity": report["prunable_sparsity"],
            "generator_dtypes": sorted({str(t.dtype) for t in generator.values()}),
            "mean_step_seconds": report["mean_step_seconds"], "train_seconds": report["train_seconds"],
            "measured_peak_gib": measured / 2**30, "measured_as": what,
            "planned_train_peak_gib": plan.train_peak / 2**30, "planned_export_peak_gib": plan.export_peak / 2**30}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU instead of Llama-3-8B's on CUDA")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child's one variant
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (or --tiny, on CPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic_data import write_synthetic_data

    out = Path(args.out)
    data = write_synthetic_data(out / "data")
    model_dir = out / ("tiny-llama" if args.tiny else "llama-3-8b-shapes")
    started = time.time()
    write_model(model_dir, TINY if args.tiny else LLAMA3_8B, data)
    print(f"model at {model_dir} ({time.time() - started:.0f}s)", flush=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir), "--data-dir", str(data),
               "--out", str(out), "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), *(["--tiny"] if args.tiny else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{'variant':<12}{'device':<24}{'peak GiB':>10}{'planned':>10}{'step s':>9}{'logits check':>16}")
    for r in results:
        check = r["logits_check"]
        print(f"{r['variant']:<12}{r['device'][:23]:<24}{r['measured_peak_gib']:>10.2f}"
              f"{r['planned_train_peak_gib']:>10.2f}{r['mean_step_seconds']:>9.2f}"
              f"{check['max_abs_logit_diff']:>10.2e} {'ok' if check['passed'] else 'FAIL'}")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    ok = all(r["logits_check"]["passed"] and r["generator_dtypes"] == ["torch.float32"] for r in results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
