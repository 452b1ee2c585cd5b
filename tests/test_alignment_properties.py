"""Property tests of position alignment on generated text (hypothesis)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_core.alignment import END, FALLBACK, MARGINAL, ONE_TO_ONE_EXACT, align_document, align_positions
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


# ----------------------------------------------------------------------------- labelled alignment

PAIRS = (("smollm2", "metaspace"), ("metaspace", "smollm2"), ("smollm2", "bert"), ("bert", "smollm2"),
         ("byte_level", "wordpiece"), ("wordpiece", "metaspace"))
SELF = ("byte_level", "metaspace", "wordpiece", "smollm2", "bert")


@pytest.fixture(scope="module")
def tables(pair_tables):
    return {(a, b): pair_tables(a, b) for a, b in PAIRS + tuple((n, n) for n in SELF)}


@SETTINGS
@given(text=TEXT)
def test_self_alignment_is_the_identity_with_every_position_one_to_one_exact(toks, tables, text):
    for name in SELF:
        enc = encode_document(toks[name], text)
        al = align_document(enc, enc, tables[name, name])
        n = len(enc)
        assert np.array_equal(al.src_pos[:-1], np.arange(n - 1)), (name, text)
        assert (al.label[:-1] == ONE_TO_ONE_EXACT).all() and al.label[-1] == END, (name, text)


@SETTINGS
@given(text=TEXT)
def test_every_position_gets_exactly_one_label_and_alignments_are_monotonic(toks, tables, text):
    for a, b in PAIRS:
        src, tgt = encode_document(toks[a], text), encode_document(toks[b], text)
        al = align_document(src, tgt, tables[a, b], text=text)
        assert al.label.shape == al.src_pos.shape == al.consumed.shape == (len(tgt),)
        assert al.label[-1] == END and (al.label[:-1] < END).all()
        has = al.label < FALLBACK
        assert ((al.src_pos >= 0) == has).all() and (al.src_pos < len(src)).all()
        # Monotonic: the source state behind each target position never goes back; boundary
        # positions use each source state once.
        assert np.all(np.diff(al.src_pos[has]) >= 0), (a, b, text)
        boundary = al.src_pos[al.boundary]
        assert np.all(np.diff(boundary) > 0), (a, b, text)
        marg = al.label == MARGINAL
        assert (al.consumed[~marg] == 0).all()
        # A marginal position's source token starts at or before the target's boundary (or one
        # space after it, the space its surface carries) and ends after it.
        for t in np.flatnonzero(marg):
            j, e = al.src_pos[t] + 1, tgt.ends[t]
            assert src.spans[j, 0] <= e or (src.spans[j, 0] == e + 1 and text[e] == " "), (a, b, text, t)
            assert e < src.spans[j, 1], (a, b, text, t)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_corpus_alignment_does_not_depend_on_document_order(toks, tables, texts, seed):
    import random

    from fusion_core.corpus_alignment import align_corpus
    from fusion_core.data import Document

    docs = [Document(id=f"d{i}", domain=("code", "prose")[i % 2], text=t) for i, t in enumerate(texts)]
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    pair = tables["smollm2", "metaspace"]
    one = align_corpus(toks["smollm2"], toks["metaspace"], docs, pair.src_to_tgt, examples=3, tables=pair)
    two = align_corpus(toks["smollm2"], toks["metaspace"], shuffled, pair.src_to_tgt, examples=3, tables=pair)
    assert one.alignments.keys() == two.alignments.keys()
    for k in one.alignments:
        for field in ("src_pos", "label", "consumed"):
            assert np.array_equal(getattr(one.alignments[k], field), getattr(two.alignments[k], field))
    m1, m2 = one.report.metrics(), two.report.metrics()
    m1.pop("align_tokens_per_s"), m2.pop("align_tokens_per_s")
    assert m1 == m2 and one.report.worst == two.report.worst
