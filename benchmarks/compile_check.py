"""Issue 33 item 5: is torch.compile worth it on this CPU? One LoRA training step of SmolLM2 (peft LoRA r 8 on the
default targets, AdamW, 4 x 128 tokens of healthcare text), eager against `torch.compile(model)`, in fp32 and under
bf16 autocast where the CPU has it. This is the compact model's recovery step, the recipe's bulk after the freeze,
without the masks and hooks of the search (which would only add graph breaks): an upper bound on the gain.

Both variants start from the same weights and take the same batches; the losses of every step are compared
(same results) and the timed steps alternate A B A B so that drift cancels in the ratio. Compile time is reported
apart. Adopt only if at least 1.2x faster with the same losses (issue 33).

    nohup .venv/bin/python benchmarks/compile_check.py > runs/compile_check.log 2>&1 &
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from atp.config import DEFAULT_TARGETS
from atp.data import domain_examples, load_domain
from atp.models import load_model
from atp.precision import cpu_flags, cpu_name


def batches(tokenizer, count: int, batch: int, length: int):
    texts = [e.prompt + e.response for e in domain_examples(load_domain("healthcare"), "train")]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    need = count * batch * length
    if len(ids) < need:
        raise SystemExit(f"{len(ids)} tokens of healthcare text, need {need}")
    return torch.tensor(ids[:need]).view(count, batch, length)


def make(base, compiled: bool):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS,
                                                           lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so that the LoRA path matters from the first step
            torch.nn.init.normal_(p, std=1e-3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-4)
    forward = torch.compile(model) if compiled else model
    return model, forward, optimizer


def step(forward, optimizer, ids, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="runs/compile_check.json")
    args = parser.parse_args()
    flags = cpu_flags()
    precisions = ["fp32"] + (["bf16"] if {"avx512_bf16", "amx_bf16"} & flags else [])
    print("cpu:", cpu_name(), "| torch", torch.__version__, "| precisions:", precisions, flush=True)
    base, tokenizer = load_model(args.model)
    data = batches(tokenizer, args.warmup + args.steps, 4, 128)
    results = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for precision in precisions:
        bf16 = precision == "bf16"
        runs = {name: make(base, name == "compiled") for name in ("eager", "compiled")}
        losses = {name: [] for name in runs}
        times = {name: [] for name in runs}
        warm = {}
        for name, (_, forward, optimizer) in runs.items():
            start = time.perf_counter()
            for i in range(args.warmup):
                losses[name].append(step(forward, optimizer, data[i], bf16))
            warm[name] = time.perf_counter() - start
        for i in range(args.warmup, args.warmup + args.steps):
            for name, (_, forward, optimizer) in runs.items():  # A B A B
                start = time.perf_counter()
                losses[name].append(step(forward, optimizer, data[i], bf16))
                times[name].append(time.perf_counter() - start)
        eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
        row = {"eager_step_s": eager, "compiled_step_s": compiled, "speedup": eager / compiled,
               "warmup_s": warm, "max_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"],
                                                                                    losses["compiled"])),
               "losses": losses}
        results[precision] = row
        print(f"{precision}: eager {eager:.3f} s/step, compiled {compiled:.3f} s/step, {eager / compiled:.2f}x; "
              f"warm-up (incl. compile) {warm['compiled']:.1f} s against {warm['eager']:.1f} s; "
              f"max loss difference {row['max_loss_diff']:.2e}", flush=True)
        del runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
