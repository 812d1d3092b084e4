"""Is bf16 the faster path on this CPU? fp32 against bf16, alternated (A B A B) in one process so that drift
cancels in the ratio (issue 16): a matrix product of SmolLM2's MLP shape (1024 tokens x 576 -> 1536), and with
--step one SmolLM2 + LoRA training step (batch 4 x 256) under bf16 autocast. Prints each timing as it comes.

    ATP_HOME=.atp_home .venv/bin/python benchmarks/bf16_cpu.py [--step]
"""
import argparse
import json
import time

import torch


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def training_step():
    from peft import LoraConfig, get_peft_model

    from atp.models import load_model

    model, _ = load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (4, 256))

    def step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", action="store_true", help="also time a training step (bf16 can take minutes)")
    args = parser.parse_args()
    print("torch", torch.__version__, "threads", torch.get_num_threads(),
          "cpu capability", torch.backends.cpu.get_cpu_capability(), flush=True)
    results = {}
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for label, dtype in [("matmul_fp32", torch.float32), ("matmul_bf16", torch.bfloat16)] * 2:
        x, y = a.to(dtype), b.to(dtype)
        results.setdefault(label, []).append(timed(lambda x=x, y=y: x @ y, 3))
        print(label, round(results[label][-1], 4), "s", flush=True)
    if args.step:
        step = training_step()
        for label, bf16 in [("step_fp32", False), ("step_bf16", True)] * 2:
            results.setdefault(label, []).append(timed(lambda bf16=bf16: step(bf16), 1))
            print(label, round(results[label][-1], 2), "s", flush=True)
    summary = {k: round(sum(v) / len(v), 4) for k, v in results.items()}
    for what in ("matmul", "step"):
        if f"{what}_fp32" in summary:
            summary[f"{what}_bf16_over_fp32"] = round(summary[f"{what}_bf16"] / summary[f"{what}_fp32"], 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
