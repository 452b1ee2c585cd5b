"""Position alignment between tokenizations: hand cases with known answers, real tokenizers, DTW."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import stdlib_texts
from transformers import PreTrainedTokenizerFast

from fusion_core.alignment import (AlignmentStats, align_positions, align_positions_dtw, alignment_rate,
                                   alignment_stats, dtw_align)
from fusion_core.model_zoo import train_tokenizer
from fusion_core.tokenization import EncodedText, encode_document, whitespace_anchors
from fusion_core.vocab import token_surfaces

FAMILIES = ("byte_level", "metaspace", "wordpiece")


# ----------------------------------------------------------------------------- helpers / fixtures

def enc(text: str, spans: list[tuple[int, int]], *, anchors: bool = True) -> EncodedText:
    """A hand-made encoding: start token + tokens with the given (start, end) offsets."""
    sp = np.asarray([(0, 0), *spans], dtype=np.int64).reshape(-1, 2)
    ends = np.maximum.accumulate(sp[:, 1])
    return EncodedText(ids=np.arange(len(sp)), ends=ends, spans=sp,
                       anchors=whitespace_anchors(text, ends) if anchors else None)


def pieces(text: str, parts: list[str]) -> list[tuple[int, int]]:
    """Offsets of consecutive pieces; a piece may skip leading whitespace (WordPiece drops it)."""
    out, pos = [], 0
    for p in parts:
        start = text.index(p, pos)
        assert text[pos:start].strip() == "", (text, p)
        out.append((start, start + len(p)))
        pos = start + len(p)
    return out


def check_boundaries(text: str, src: EncodedText, tgt: EncodedText, mapping: np.ndarray) -> None:
    """Every aligned pair reads the same text modulo whitespace; sources used once, in order."""
    hit = np.flatnonzero(mapping >= 0)
    for t in hit:
        assert text[:tgt.ends[t]].rstrip() == text[:src.ends[mapping[t]]].rstrip(), (text, t, mapping[t])
    assert np.all(np.diff(mapping[hit]) > 0)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizers):
    return {f: tiny_tokenizers[f] for f in FAMILIES}


@pytest.fixture(scope="module")
def corpora():
    prose, code = stdlib_texts()
    return {"train": prose[::2] + [c[:20000] for c in code[::2]],
            "prose": prose[1::2][:80], "code": [c[:4000] for c in code[1::2][:30]]}


@pytest.fixture(scope="module")
def metaspace_8k(corpora):
    return train_tokenizer("metaspace", corpora["train"], vocab_size=8000)


# ----------------------------------------------------------------------------- hand cases

def test_identical_offsets_without_anchors():
    text = "hello world"
    a = enc(text, [(0, 5), (5, 11)], anchors=False)
    b = enc(text, [(0, 5), (6, 11)], anchors=False)  # WordPiece drops the space
    assert align_positions(a, b).tolist() == [0, 1, 2]


def test_word_attached_space_and_wordpiece():
    text = "hello world"
    byte_level = enc(text, pieces(text, ["hello", " world"]))
    wordpiece = enc(text, pieces(text, ["hello", "world"]))
    split = enc(text, pieces(text, ["hel", "lo", " wor", "ld"]))
    assert align_positions(byte_level, wordpiece).tolist() == [0, 1, 2]
    assert align_positions(wordpiece, byte_level).tolist() == [0, 1, 2]
    assert align_positions(byte_level, split).tolist() == [0, -1, 1, -1, 2]
    assert align_positions(split, byte_level).tolist() == [0, 2, 4]


def test_indentation_whitespace_tokens():
    text = "x\n    y"
    byte_level = enc(text, pieces(text, ["x", "\n   ", " y"]))          # `ĊĠĠĠ`, `Ġy`
    metaspace = enc(text, pieces(text, ["x", "\n", " ", " ", " ", " y"]))  # `<0x0A>`, `▁` x3, `▁y`
    wordpiece = enc(text, pieces(text, ["x", "y"]))
    # After "x" both are about to read whitespace: aligned. After "\n", "\n ", "\n  ": the
    # byte-level side has no such state. After "\n   " both are about to read " y".
    assert align_positions(byte_level, metaspace).tolist() == [0, 1, -1, -1, -1, 2, 3]
    assert align_positions(metaspace, byte_level).tolist() == [0, 1, 5, 6]
    # WordPiece reads no whitespace: its state after "x" is about to read "y", like the last
    # whitespace state of the other side; the byte-level state before "\n   " has no partner.
    assert align_positions(byte_level, wordpiece).tolist() == [0, 2, 3]
    assert align_positions(wordpiece, byte_level).tolist() == [0, -1, 1, 2]


def test_blank_lines_and_trailing_whitespace():
    text = "a\n\n\nb \n"
    one = enc(text, pieces(text, ["a", "\n\n", "\n", "b", " \n"]))
    other = enc(text, pieces(text, ["a", "\n", "\n", "\n", "b", " ", "\n"]))
    assert align_positions(one, other).tolist() == [0, 1, -1, 2, 3, 4, -1, 5]
    assert align_positions(other, one).tolist() == [0, 1, 3, 4, 5, 7]


def test_numbers():
    text = "x = 12345"
    digits = enc(text, pieces(text, ["x", " =", " ", "1", "2", "3", "4", "5"]))  # SmolLM2 style
    chunks = enc(text, pieces(text, ["x", " =", " 12", "345"]))
    assert align_positions(digits, chunks).tolist() == [0, 1, 3, 5, 8]
    assert align_positions(chunks, digits).tolist() == [0, 1, -1, 2, -1, 3, -1, -1, 4]


def test_unicode_split_characters():
    text = "café 日"
    whole = enc(text, [(0, 3), (3, 4), (4, 6)])
    # `ca`, `f`, é as two byte tokens (both report the character), " " + first byte of 日, then two
    # more byte tokens of 日 (byte-level `Ġæ`, `Ĺ`, `¥`).
    bytes_ = enc(text, [(0, 2), (2, 3), (3, 4), (3, 4), (4, 6), (5, 6), (5, 6)])
    assert align_positions(whole, bytes_).tolist() == [0, -1, 1, -1, 2, -1, -1, 3]
    assert align_positions(bytes_, whole).tolist() == [0, 2, 4, 7]


def test_prepended_metaspace_marker():
    text = "hi"
    prepended = enc(text, [(0, 1), (0, 1), (1, 2)])  # `▁` (nothing of the text), `h`, `i`
    plain = enc(text, [(0, 1), (1, 2)])
    assert align_positions(plain, prepended).tolist() == [0, -1, 1, 2]
    assert align_positions(prepended, plain).tolist() == [0, 2, 3]


def test_empty_text(tiny):
    empty = enc("", [])
    assert align_positions(empty, empty).tolist() == [0]
    a, b = encode_document(tiny["byte_level"], ""), encode_document(tiny["wordpiece"], "")
    assert align_positions(a, b).tolist() == [0]
    assert alignment_rate(np.asarray([0])) == 1.0


def test_alignment_rate_and_stats():
    m = np.asarray([0, -1, 2, 3])
    assert alignment_rate(m) == pytest.approx(2 / 3)  # the last position predicts nothing
    total = alignment_stats(m) + alignment_stats(np.asarray([0, 1]))
    assert total == AlignmentStats(aligned=3, positions=4) and total.rate == 0.75


# ----------------------------------------------------------------------------- real tokenizers

def test_encode_document_untrims_offsets(smollm2):
    """A GPT-2-style trimming post-processor must not change ends (true text consumed)."""
    from tokenizers import Tokenizer

    spec = json.loads(smollm2.backend_tokenizer.to_str())
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    trimming = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                       bos_token=smollm2.bos_token, eos_token=smollm2.eos_token)
    text = "a\n    return x\n\n\nb  lead  two  spaces "
    raw = trimming(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert (1, 2) in raw  # `ĊĠĠĠ` reported as (1, 2): trimmed
    a, b = encode_document(smollm2, text), encode_document(trimming, text)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.ends, b.ends) and np.array_equal(a.anchors, b.anchors)
    assert a.ends.tolist()[:3] == [0, 1, 5]


TEXTS = [
    "hello world", "a\n    return x\n\n\nb", "  lead  two  spaces ", "café naïve 日本 — ok",
    "x = 12345 + 6.78\n\tq", "end \n", "\n\nfoo", "a  b", "def f(x):\n    if x:\n        return x  # done\n",
]


def test_never_a_wrong_place(tiny, smollm2, bert, tiny_corpus):
    toks = {**tiny, "smollm2": smollm2, "bert": bert}
    for text in TEXTS + tiny_corpus[:8]:
        encs = {k: encode_document(t, text) for k, t in toks.items()}
        for a in encs:
            for b in encs:
                m = align_positions(encs[a], encs[b])
                assert m.shape == (len(encs[b]),) and m.dtype == np.int64
                check_boundaries(text, encs[a], encs[b], m)
                if a == b:
                    assert (m == np.arange(len(m)))[m >= 0].all()


def test_real_pairs_known_answers(smollm2, bert, tiny):
    text = "a\n    return x"
    s, w = encode_document(smollm2, text), encode_document(bert, text)
    assert smollm2.convert_ids_to_tokens(s.ids[1:].tolist()) == ["a", "ĊĠĠĠ", "Ġreturn", "Ġx"]
    assert align_positions(s, w).tolist() == [0, 2, 3, 4]  # BERT after "a" <-> SmolLM2 after "ĊĠĠĠ"
    assert align_positions(w, s).tolist() == [0, -1, 1, 2, 3]
    text = "café 日本"
    s, w = encode_document(smollm2, text), encode_document(bert, text)
    m = align_positions(s, w)
    assert (m[1:] >= 0).all()  # cafe, 日, 本 all have a clean SmolLM2 boundary
    m = align_positions(w, s)
    assert (m >= 0).sum() == 4  # start, é, 日 (after its last byte piece), 本


def test_smollm2_vs_metaspace_rates(smollm2, metaspace_8k, corpora):
    rates = {}
    for domain in ("prose", "code"):
        for name, src, tgt in (("smollm2->metaspace", smollm2, metaspace_8k),
                               ("metaspace->smollm2", metaspace_8k, smollm2)):
            total, seconds, tokens = AlignmentStats(0, 0), 0.0, 0
            for text in corpora[domain]:
                s, t = encode_document(src, text), encode_document(tgt, text)
                t0 = time.perf_counter()
                m = align_positions(s, t)
                seconds += time.perf_counter() - t0
                tokens += len(t)
                total = total + alignment_stats(m)
                check_boundaries(text, s, t, m)
            rates[f"{domain} {name}"] = total.rate
            print(f"\n[align] {domain:5s} {name}: rate {total.rate:.3f} over {total.positions} positions, "
                  f"{seconds / tokens * 1e6:.3f} ms per 1k target tokens")
    assert rates["prose smollm2->metaspace"] > 0.7 and rates["prose metaspace->smollm2"] > 0.7
    assert rates["code smollm2->metaspace"] > 0.45 and rates["code metaspace->smollm2"] > 0.6


# ----------------------------------------------------------------------------- DTW

def test_dtw_hand_cases():
    assert dtw_align(["a", "b", "c"], ["a", "b", "c"]).tolist() == [0, 1, 2]
    assert dtw_align(["hel", "lo", " world"], ["hello", " world"]).tolist() == [-1, 2]
    assert dtw_align(["hello", " world"], ["hel", "lo", " world"]).tolist() == [-1, -1, 1]
    assert dtw_align([], ["a"]).tolist() == [-1]
    # Ties: "ab" vs "a","b" costs the same either way; deterministic all the same.
    assert dtw_align(["ab"], ["a", "b"]).tolist() == [-1, -1]


def test_dtw_positions():
    assert align_positions_dtw(["hel", "lo", " world"], ["hello", " world"]).tolist() == [0, 2, 3]
    assert align_positions_dtw(["hello", " world"], ["hel", "lo", " world"]).tolist() == [0, -1, 1, 2]
    assert align_positions_dtw(["ab"], ["a", "b"]).tolist() == [0, -1, 1]
    # A diagonal step between differently cut pieces is no shared boundary.
    assert align_positions_dtw(["ab", "c"], ["a", "bc"]).tolist() == [0, -1, 2]
    # Whitespace read by one side only: the states before the next word are aligned.
    assert align_positions_dtw(["x", "\n   ", " y"], [" x", " y"]).tolist() == [0, 2, 3]
    assert align_positions_dtw([], []).tolist() == [0]


def test_dtw_agrees_with_offsets_on_real_text(smollm2, tiny):
    surf = {"smollm2": token_surfaces(smollm2), **{f: token_surfaces(t) for f, t in tiny.items()}}
    toks = {"smollm2": smollm2, **tiny}
    text = "The quick brown fox jumps over the lazy dog.\ndef add(a, b):\n    return a + b\n"
    for a, b in (("smollm2", "metaspace"), ("byte_level", "smollm2"), ("smollm2", "wordpiece")):
        s, t = encode_document(toks[a], text), encode_document(toks[b], text)
        d = align_positions_dtw([surf[a][i] for i in s.ids[1:]], [surf[b][i] for i in t.ids[1:]])
        check_boundaries(text, s, t, d)  # never a wrong place, even where DTW wanders
        if b != "metaspace":  # plain DTW wanders between very different granularities (24 vs 50 tokens)
            assert (d >= 0).mean() >= 0.75 * (align_positions(s, t) >= 0).mean()


def test_smollm2_against_a_sentencepiece_style_tokenizer_hand_checked(smollm2, metaspace_8k):
    """SmolLM2's byte-level BPE against a trained Metaspace BPE with byte fallback, labelled."""
    from fusion_core.alignment import LABEL_NAMES, PairTables, align_document
    from fusion_core.vocab import build_vocabulary_map

    tables = PairTables.build(smollm2, metaspace_8k, build_vocabulary_map(smollm2, metaspace_8k).src_to_tgt)

    def run(text):
        s, t = encode_document(smollm2, text), encode_document(metaspace_8k, text)
        al = align_document(s, t, tables, text=text)
        return (smollm2.convert_ids_to_tokens(s.ids[1:].tolist()), metaspace_8k.convert_ids_to_tokens(t.ids[1:].tolist()),
                al.src_pos.tolist(), [LABEL_NAMES[x] for x in al.label], al.consumed.tolist())

    src, tgt, pos, lab, consumed = run("x\n    y = 12345")
    assert src == ["x", "ĊĠĠĠ", "Ġy", "Ġ=", "Ġ", "1", "2", "3", "4", "5"]
    assert tgt == ["▁x", "\n", "▁", "▁", "▁", "▁y", "▁=", "▁12", "34", "5"]
    # Indentation: the target reads "\n" and three single spaces inside SmolLM2's "ĊĠĠĠ"
    # (marginal, c = "\n", "\n ", "\n  "); after them both are about to read " y". Digits: the
    # target's "▁12" and "34" each span several of SmolLM2's single digits.
    assert pos == [0, 1, 1, 1, 1, 2, 3, 5, 7, 9, -1]
    assert lab == ["one_to_one_mapped", "one_to_many", "marginal", "marginal", "marginal", "one_to_one_exact",
                   "one_to_one_exact", "many_to_one", "many_to_one", "one_to_one_exact", "end"]
    assert consumed == [0, 0, 1, 2, 3, 0, 0, 0, 0, 0, 0]

    src, tgt, pos, lab, consumed = run("naïve 😀\n\n\tend")
    assert src == ["na", "Ã¯ve", "ĠðŁĺ", "Ģ", "ĊĊ", "ĉ", "end"]
    assert tgt == ["▁na", "<0xC3>", "<0xAF>", "ve", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "\n\n", "<0x09>", "end"]
    # ï and the emoji in byte-fallback pieces: states in the middle of a character fall back;
    # after "ï" the target is inside SmolLM2's "Ã¯ve" (c = "ï"); the byte tokens of a tab and
    # the newline pair exactly.
    assert pos == [0, 1, -1, 1, -1, 2, -1, -1, -1, 4, 5, 6, -1]
    assert lab == ["one_to_one_mapped", "one_to_many", "fallback", "marginal", "fallback", "one_to_one_mapped",
                   "fallback", "fallback", "fallback", "one_to_one_exact", "one_to_one_exact", "one_to_one_exact", "end"]
    assert consumed[3] == 1
