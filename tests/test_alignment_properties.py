"""Property tests of position alignment on generated text (hypothesis)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_core.alignment import align_positions
from fusion_core.tokenization import encode_document

TEXT = st.text(
    alphabet=st.sampled_from(list("abcdefghij ABC 0123456789 \n\t    ,.;:()+-=_#éü漢😀")), min_size=0, max_size=120)
ASCII_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghij ABC 0123456789 \n\t    ,.;:()+-=_#")), max_size=120)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def toks(tiny_tokenizers, smollm2, bert):
    return {**tiny_tokenizers, "smollm2": smollm2, "bert": bert}


@SETTINGS
@given(text=TEXT)
def test_a_tokenizer_aligned_with_itself_is_the_identity(toks, text):
    for name in ("byte_level", "metaspace", "smollm2"):
        enc = encode_document(toks[name], text)
        mapping = align_positions(enc, enc)
        clean = mapping >= 0
        # Every clean boundary maps to itself, and none maps elsewhere.
        assert np.array_equal(mapping[clean], np.arange(len(enc))[clean]), (name, text)


@SETTINGS
@given(text=TEXT)
def test_alignments_are_monotonic_and_in_range(toks, text):
    for a, b in (("smollm2", "metaspace"), ("metaspace", "bert"), ("bert", "smollm2"), ("byte_level", "smollm2")):
        src, tgt = encode_document(toks[a], text), encode_document(toks[b], text)
        mapping = align_positions(src, tgt)
        assert mapping.shape == (len(tgt),)
        hit = mapping[mapping >= 0]
        assert np.all(hit < len(src)), (a, b, text)
        assert np.all(np.diff(hit) > 0), (a, b, text)


@SETTINGS
@given(text=ASCII_TEXT)
def test_ascii_text_aligned_with_itself_is_fully_aligned(toks, text):
    # Unaligned positions are only those inside a multi-byte character (ASCII has none) and the
    # state after SentencePiece's prepended word marker, which no text boundary corresponds to.
    for name in ("byte_level", "metaspace", "wordpiece", "smollm2", "bert"):
        enc = encode_document(toks[name], text)
        mapping = align_positions(enc, enc)
        idx = np.arange(len(enc))
        hit = mapping >= 0
        assert np.array_equal(mapping[hit], idx[hit]), (name, text)
        tokens = toks[name].convert_ids_to_tokens(enc.ids.tolist())
        for i in idx[~hit]:
            assert tokens[i] == "\u2581", (name, text, i, tokens[i])
