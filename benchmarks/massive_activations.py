"""Peak |residual stream| per hidden channel of a model, over the first 8 pubmed dev texts (256 tokens each) and every
layer: the massive activations that `--protect-outliers` keeps (docs/benchmarks.md, "Quality of each space at 40%").
  ATP_HOME=.atp_home .venv/bin/python benchmarks/massive_activations.py
"""
import torch

from atp import data
from atp.models import load_model

model, tokenizer = load_model("smollm2-135m")
model.eval()
task = data.get_task("pubmed_text")
records = data.split(task.load(data.resolve_data_dir(None) / "healthcare" / "pubmedqa_train.jsonl"), "dev")[:8]
peak = torch.zeros(model.config.hidden_size)
with torch.no_grad():
    for text in (task.text(r) for r in records):
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        states = model(**ids, output_hidden_states=True).hidden_states
        for state in states:
            peak = torch.maximum(peak, state[0].abs().amax(0))
order = peak.argsort(descending=True)
print("top channels by peak |residual|:", [(int(c), round(float(peak[c]), 1)) for c in order[:10]])
print("median channel peak:", round(float(peak.median()), 2))
print("largest peak per block of 32:", [round(float(peak[i:i + 32].max()), 1) for i in range(0, len(peak), 32)])
