"""Is bf16 the faster path on this CPU? Matrix products and one SmolLM2 + LoRA training step, fp32 against
bf16 autocast, alternated (A B A B) in one process so that drift cancels in the ratio (issue 16).

    ATP_HOME=.atp_home .venv/bin/python benchmarks/bf16_cpu.py
"""
import json
import time

import torch
from peft import LoraConfig, get_peft_model

from atp.models import load_model


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    print("torch", torch.__version__, "threads", torch.get_num_threads(),
          "cpu capability", torch.backends.cpu.get_cpu_capability())
    results = {}
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for label, dtype in [("matmul_fp32", torch.float32), ("matmul_bf16", torch.bfloat16)] * 2:
        x, y = a.to(dtype), b.to(dtype)
        results.setdefault(label, []).append(timed(lambda: x @ y, 20))
    model, _ = load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (4, 256))

    def step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for label, bf16 in [("step_fp32", False), ("step_bf16", True)] * 2:
        results.setdefault(label, []).append(timed(lambda: step(bf16), 2))
    summary = {k: round(sum(v) / len(v), 4) for k, v in results.items()}
    summary["matmul_bf16_over_fp32"] = round(summary["matmul_bf16"] / summary["matmul_fp32"], 3)
    summary["step_bf16_over_fp32"] = round(summary["step_bf16"] / summary["step_fp32"], 3)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
