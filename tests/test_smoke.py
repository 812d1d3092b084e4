
from helpers import FAMILIES, tiny_model


def test_tiny_models_build(tokenizer):
    for family in FAMILIES:
        for gqa in (True, False):
            model = tiny_model(family, gqa)
            ids = tokenizer("The patient", return_tensors="pt").input_ids
            assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert len(tokenizer) <= 512
