"""Labelled alignment: every target position's kind of teacher signal, on hand cases and real tokenizers."""
from __future__ import annotations

import numpy as np
import pytest

from fusion_core.alignment import (
    END, FALLBACK, LABEL_NAMES, MARGINAL, PairTables, align_document, align_document_dtw, coverage_metrics,
)
from fusion_core.tokenization import EncodedText, encode_document, whitespace_anchors

L = {name: k for k, name in enumerate(LABEL_NAMES)}


def labels(al) -> list[str]:
    return [LABEL_NAMES[x] for x in al.label]


def enc(text: str, parts: list[str], ids: list[int]) -> EncodedText:
    """Start token (id 0) + consecutive pieces of text with the given ids."""
    spans, pos = [(0, 0)], 0
    for p in parts:
        start = text.index(p, pos)
        spans.append((start, start + len(p)))
        pos = start + len(p)
    sp = np.asarray(spans, dtype=np.int64)
    ends = np.maximum.accumulate(sp[:, 1])
    return EncodedText(ids=np.asarray([0, *ids]), ends=ends, spans=sp, anchors=whitespace_anchors(text, ends))


# ----------------------------------------------------------------------------- hand-made encodings

SURF = ["<s>", "x", " =", " ", "1", "2", "3", "4", "5", " 12", "345", " 123", "45", "\n   ", " y", "\n", " ", "=", "ab"]
SID = {s: i for i, s in enumerate(SURF)}


def hand(text: str, parts: list[str]) -> EncodedText:
    return enc(text, parts, [SID[p] for p in parts])


def tables() -> PairTables:
    return PairTables.from_surfaces(SURF, SURF, np.arange(len(SURF)))


def test_numbers_many_to_one_one_to_many_and_marginal():
    text = "x = 12345"
    digits = hand(text, ["x", " =", " ", "1", "2", "3", "4", "5"])  # SmolLM2 style
    chunks = hand(text, ["x", " =", " 12", "345"])
    al = align_document(digits, chunks, tables())
    # After "x" the next tokens are the same. The target state after " =" (about to read " 12")
    # pairs with the digit state after the lone space (about to read "1"), whitespace being one
    # gap: the target's next token spans several source tokens, as "345" after " 12" does.
    assert list(zip(labels(al), al.src_pos.tolist())) == [
        ("one_to_one_exact", 0), ("one_to_one_exact", 1), ("many_to_one", 3), ("many_to_one", 5), ("end", -1)]
    al = align_document(chunks, digits, tables())
    # The other way round: the digit tokenizer's state after " =" is about to read a lone space,
    # which no chunk state is: MARGINAL with nothing read yet of the source's " 12" (c = "").
    # Its state after the space pairs with the chunk state before " 12" (one source token for
    # several target tokens); inside " 12" and "345" the positions are MARGINAL with the
    # characters of that token read so far (" 1"; "3", "34").
    assert list(zip(labels(al), al.src_pos.tolist(), al.consumed.tolist())) == [
        ("one_to_one_exact", 0, 0), ("one_to_one_exact", 1, 0), ("marginal", 2, 0), ("one_to_many", 2, 0),
        ("marginal", 2, 2), ("one_to_many", 3, 0), ("marginal", 3, 1), ("marginal", 3, 2), ("end", -1, 0)]


def test_map_decides_exact_or_mapped():
    text = "ab"
    a = enc(text, ["ab"], [18])
    mapped = PairTables.from_surfaces(SURF, SURF, np.where(np.arange(len(SURF)) == 18, 1, np.arange(len(SURF))))
    assert labels(align_document(a, a, tables())) == ["one_to_one_exact", "end"]
    assert labels(align_document(a, a, mapped)) == ["one_to_one_mapped", "end"]
    assert labels(align_document(a, a, None)) == ["one_to_one_mapped", "end"]  # no map: never claims exact


def test_marginalisation_off_leaves_fallbacks():
    text = "x = 12345"
    src, tgt = hand(text, ["x", " =", " 12", "345"]), hand(text, ["x", " =", " ", "1", "2", "3", "4", "5"])
    on, off = align_document(src, tgt, tables()), align_document(src, tgt, tables(), marginalize=False)
    assert MARGINAL not in off.label and (off.label == FALLBACK).sum() == 4
    assert np.array_equal(off.label == FALLBACK, on.label == MARGINAL)
    al = off
    assert (al.src_pos[al.label == FALLBACK] == -1).all() and (al.consumed == 0).all()


def test_dtw_labels():
    text = "x = 12345"
    src, tgt = hand(text, ["x", " =", " ", "1", "2", "3", "4", "5"]), hand(text, ["x", " =", " 12", "345"])
    al = align_document_dtw(src, tgt, tables())
    assert al.label[-1] == END and MARGINAL not in al.label
    assert (al.src_pos[al.label < FALLBACK] >= 0).all()


def test_coverage_metrics():
    counts = {"code": np.bincount([0, 4, 4, 5, 6], minlength=7), "prose": np.bincount([0, 1, 6], minlength=7)}
    m = coverage_metrics(counts)
    assert m["positions.code"] == 4 and m["coverage.code"] == 0.75 and m["boundary_rate.code"] == 0.25
    assert m["marginal_rate.code"] == 0.5 and m["fallback_rate.code"] == 0.25
    assert m["positions"] == 6 and m["coverage"] == pytest.approx(5 / 6) and m["one_to_one_mapped_rate"] == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------- real tokenizers, hand-checked

@pytest.fixture(scope="module")
def real(smollm2, bert, pair_tables):
    return {("S", "B"): pair_tables("smollm2", "bert"), ("B", "S"): pair_tables("bert", "smollm2"),
            "S": smollm2, "B": bert}


def run(real, a: str, b: str, text: str):
    s, t = encode_document(real[a], text), encode_document(real[b], text)
    al = align_document(s, t, real[(a, b)], text=text)
    return (real[a].convert_ids_to_tokens(s.ids.tolist()), real[b].convert_ids_to_tokens(t.ids.tolist()), al)


def test_real_digits(real):
    src, tgt, al = run(real, "S", "B", "x = 12345")
    assert src == ["<|endoftext|>", "x", "Ġ=", "Ġ", "1", "2", "3", "4", "5"]
    assert tgt == ["[CLS]", "x", "=", "123", "##45"]
    # BERT after "=" is about to read "123"; SmolLM2's matching state is after its lone "Ġ", about
    # to read "1": one target token for three source tokens.
    assert al.src_pos.tolist() == [0, 1, 3, 6, -1]
    assert labels(al) == ["one_to_one_mapped", "one_to_one_mapped", "many_to_one", "many_to_one", "end"]
    _, _, al = run(real, "B", "S", "x = 12345")
    # SmolLM2 after "Ġ=" is about to read the lone space "Ġ", which BERT never reads as a token;
    # but BERT's next surface " 123" starts with that space: marginal with nothing read (c = "").
    # Inside "123" and "##45": marginal, with the characters of BERT's surface read so far
    # (" 1", " 12", then "4").
    assert labels(al) == ["one_to_one_mapped", "one_to_one_mapped", "marginal", "one_to_many", "marginal",
                          "marginal", "one_to_many", "marginal", "end"]
    assert al.src_pos.tolist() == [0, 1, 2, 2, 2, 2, 3, 3, -1]
    assert al.consumed.tolist() == [0, 0, 0, 0, 2, 3, 0, 1, 0]


def test_real_code_indentation_whitespace_runs_and_newlines(real):
    text = "def f(a):\n    return a  \n\n\nend"
    src, tgt, al = run(real, "S", "B", text)
    assert src[5:] == ["):", "ĊĠĠĠ", "Ġreturn", "Ġa", "ĠĠ", "ĊĊ", "Ċ", "end"]
    assert tgt[4:] == ["a", ")", ":", "return", "a", "end"]
    # BERT after ")" is inside SmolLM2's "):"; after ":" both are about to read "return" (BERT
    # skips the newline and indentation that SmolLM2 reads as "ĊĠĠĠ"); after the second "a" the
    # whitespace run "  \n\n\n" is read by SmolLM2 only, and its last state pairs with BERT's.
    assert al.src_pos.tolist() == [0, 1, 2, 3, 4, 4, 6, 7, 11, -1]
    assert labels(al) == ["one_to_one_mapped", "one_to_one_exact", "one_to_one_exact", "one_to_one_mapped",
                          "one_to_many", "marginal", "one_to_one_exact", "one_to_one_exact", "one_to_one_mapped", "end"]
    assert al.consumed[5] == 1
    _, _, al = run(real, "B", "S", text)
    # SmolLM2 states about to read whitespace that BERT never predicts fall back.
    assert labels(al) == ["one_to_one_mapped", "one_to_one_exact", "one_to_one_exact", "one_to_one_mapped",
                          "many_to_one", "fallback", "one_to_one_exact", "one_to_one_exact", "fallback", "fallback",
                          "fallback", "one_to_one_mapped", "end"]


def test_real_non_ascii_and_emoji(real):
    text = "café 😀 ok"
    src, tgt, al = run(real, "S", "B", text)
    assert src == ["<|endoftext|>", "c", "af", "Ã©", "ĠðŁĺ", "Ģ", "Ġok"]  # é and the emoji in byte pieces
    assert tgt == ["[CLS]", "cafe", "[UNK]", "ok"]  # BERT strips the accent and cannot encode the emoji
    assert al.src_pos.tolist() == [0, 3, 5, -1]
    assert labels(al) == ["many_to_one", "one_to_one_exact", "one_to_one_exact", "end"]
    _, _, al = run(real, "B", "S", text)
    # Inside BERT's "cafe" (surface " cafe"): " c", " caf". After "café" BERT's next token is
    # its [UNK]: it cannot say what comes, so fallback. After SmolLM2's first byte piece of the
    # emoji (the middle of a character) there is no state of BERT's: fallback.
    assert labels(al) == ["one_to_many", "marginal", "marginal", "fallback", "fallback",
                          "one_to_one_exact", "end"]
    assert al.consumed.tolist() == [0, 2, 4, 0, 0, 0, 0]


def test_real_marginal_prefixes_are_the_text_read(real, smollm2, bert):
    """For every MARGINAL position, the prefix c is exactly what the text shows since the source token began."""
    from fusion_core.vocab import token_surfaces

    surf = token_surfaces(smollm2)
    texts = ["    for i in range(100):\n        total += i ** 2\n", "naïve  café\t日本 😀 1234567 + 89",
             "The tokenizer cuts 'unbelievably' differently."]
    for text in texts:
        for tgt_tok in (bert,):
            s, t = encode_document(smollm2, text), encode_document(tgt_tok, text)
            al = align_document(s, t, real[("S", "B")])
            for pos in np.flatnonzero(al.label == MARGINAL):
                j = al.src_pos[pos] + 1
                c = surf[s.ids[j]][:al.consumed[pos]]
                assert c and text[s.spans[j, 0]:t.ends[pos]] == c, (text, pos, c)


def test_unaligned_target_positions_are_never_silently_labelled(real):
    """Every position has one label; src_pos is set exactly for positions with a teacher signal."""
    for a, b in (("S", "B"), ("B", "S")):
        for text in ["", "a", "x = 12345", "café 😀 ok", "\n\n\t  \n", "日本語のテキスト"]:
            _, _, al = run(real, a, b, text)
            assert al.label[-1] == END and (al.label[:-1] != END).all()
            assert ((al.src_pos >= 0) == (al.label < FALLBACK)).all()
