"""Peak |residual stream| per hidden channel of a model, over the first 8 pubmed dev texts (256 tokens each), every
layer: the massive activations that `--protect-outliers` keeps (docs/benchmarks.md, "Quality of each space at 40%").
  ATP_HOME=.atp_home .venv/bin/python benchmarks/massive_activations.py
"""
import torch, json
from atp.models import load_model
from atp import data
model, tok = load_model("smollm2-135m")
model.eval()
recs = data.split(data.get_task("pubmed_text").load(data.resolve_data_dir(None) / "healthcare" / "pubmedqa_train.jsonl"), "dev")[:8]
texts = [data.get_task("pubmed_text").text(r) for r in recs]
H = model.config.hidden_size
mx = torch.zeros(model.config.num_hidden_layers + 1, H)
with torch.no_grad():
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=256)
        hs = model(**ids, output_hidden_states=True).hidden_states
        for i, h in enumerate(hs):
            mx[i] = torch.maximum(mx[i], h[0].abs().amax(0))
peak = mx.amax(0)
order = peak.argsort(descending=True)
print("top channels by max |residual|:", [(int(c), round(float(peak[c]), 1)) for c in order[:10]])
print("median channel peak:", float(peak.median()))
for lo in range(0, H, 32):
    print(lo, round(float(peak[lo:lo+32].max()), 1), end="; ")
print()
