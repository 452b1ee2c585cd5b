import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_core.model_zoo import train_tokenizer
from fusion_core.tokenization import encode_document


@pytest.mark.parametrize("family", ["byte_level", "metaspace", "wordpiece"])
def test_tiny_model_folders_load_and_encode(tiny_models, family):
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    enc = encode_document(tok, "def add(a, b):\n    return a + b\n")
    assert enc.ids[0] == tok.bos_token_id
    assert np.all(np.diff(enc.ends) >= 0)
    out = model(input_ids=__import__("torch").as_tensor(enc.ids)[None])
    assert out.logits.shape == (1, len(enc), len(tok))


def test_unknown_family_is_rejected(tiny_corpus):
    with pytest.raises(ValueError, match="unknown tokenizer family"):
        train_tokenizer("morse", tiny_corpus, 100)
