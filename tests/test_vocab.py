"""Vocabulary maps: family detection, canonical surfaces, exact twins, specials, determinism, speed."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import stdlib_texts
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusion_core import vocab as V
from fusion_core.model_zoo import train_tokenizer
from fusion_core.vocab import (EXACT, FUZZY, NORMALIZED, SPECIAL, SPECIAL_FALLBACK, SPECIAL_MARK, UNK_FALLBACK,
                               VocabularyMap,
                               build_vocabulary_map, detect_family, token_surfaces, tokenizer_fingerprint)

FAMILIES = ("byte_level", "metaspace", "wordpiece")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tiny_tokenizers):
    return {f: tiny_tokenizers[f] for f in FAMILIES}


@pytest.fixture(scope="module")
def metaspace_8k():
    """A SentencePiece-style (Metaspace, byte fallback) BPE of 8000 tokens trained on stdlib text (~1 s)."""
    prose, code = stdlib_texts()
    return train_tokenizer("metaspace", prose[::2] + [c[:20000] for c in code[::2]], vocab_size=8000)


@pytest.fixture(scope="module")
def smol_to_ms8k(smollm2, metaspace_8k):
    t0 = time.perf_counter()
    vmap = build_vocabulary_map(smollm2, metaspace_8k)
    print(f"\n[vocab] SmolLM2 (49152) -> metaspace 8k map built in {time.perf_counter() - t0:.2f} s; "
          f"stats {json.dumps({k: round(v, 4) for k, v in vmap.stats().items()})}")
    return vmap


def _id(tok, token: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    assert i is not None and i != tok.unk_token_id or token == tok.unk_token, token
    return int(i)


# ----------------------------------------------------------------------------- families

@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family_tiny(tiny, family):
    assert detect_family(tiny[family]) == family


def test_detect_family_real(smollm2, bert):
    assert detect_family(smollm2) == "byte_level"
    assert detect_family(bert) == "wordpiece"


def _variant(tok, edit) -> PreTrainedTokenizerFast:
    """A copy of `tok` whose backend spec was changed by `edit(spec)`."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    edit(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token=tok.bos_token, eos_token=tok.eos_token, unk_token=tok.unk_token)


def test_detect_family_from_structure_not_names(tiny):
    # Llama-2 legacy layout: no pre-tokenizer, the normalizer prepends and replaces with `▁`.
    def legacy(spec):
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    assert detect_family(_variant(tiny["metaspace"], legacy)) == "metaspace"

    # GPT-2 layout: a ByteLevel post-processor that trims offsets.
    def gpt2(spec):
        spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True}
    assert detect_family(_variant(tiny["byte_level"], gpt2)) == "byte_level"

    # A word-level tokenizer of none of the three families.
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    assert detect_family(PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")) == "other"


# ----------------------------------------------------------------------------- surfaces

def test_surfaces_byte_level(smollm2):
    s = token_surfaces(smollm2)
    assert len(s) == len(smollm2)
    assert s[_id(smollm2, "Ġhello")] == " hello"
    assert s[_id(smollm2, "hello")] == "hello"
    assert s[_id(smollm2, "Ċ")] == "\n"
    assert s[_id(smollm2, "ĊĠĠĠ")] == "\n   "
    assert s[_id(smollm2, "Ã©")] == "é"
    assert s[_id(smollm2, "Ã")] == "\udcc3"  # a lone lead byte: surrogate-escaped
    for i in (0, 1, 2):  # <|endoftext|>, <|im_start|>, <|im_end|>
        assert s[i].startswith(SPECIAL_MARK)


def test_surfaces_metaspace(tiny):
    tok = tiny["metaspace"]
    s = token_surfaces(tok)
    assert s[_id(tok, "<0x0A>")] == "\n"
    assert s[_id(tok, "<0x41>")] == "A"
    assert s[_id(tok, "<0xC3>")] == "\udcc3"  # twin of byte-level `Ã`
    assert s[_id(tok, "▁")] == " "
    assert s[_id(tok, "▁a")] == " a"
    assert s[tok.bos_token_id] == SPECIAL_MARK + "<s>"


def test_surfaces_wordpiece(bert):
    s = token_surfaces(bert)
    assert s[_id(bert, "hello")] == " hello"
    assert s[_id(bert, "##lo")] == "lo"
    assert s[_id(bert, ".")] == "."  # split-off punctuation carries no space
    assert s[_id(bert, "日")] == "日"
    assert s[bert.cls_token_id] == SPECIAL_MARK + "[CLS]"


def test_special_surfaces_never_collide_with_text(smollm2, bert, tiny):
    for tok in (smollm2, bert, *tiny.values()):
        s = token_surfaces(tok)
        special = {i for i, x in enumerate(s) if x.startswith(SPECIAL_MARK)}
        assert set(tok.all_special_ids) <= special
        assert all(SPECIAL_MARK not in x for i, x in enumerate(s) if i not in special)


# ----------------------------------------------------------------------------- exact twins

def test_byte_level_twins_metaspace(smollm2, metaspace_8k, smol_to_ms8k):
    m, ms = smol_to_ms8k, metaspace_8k
    for word in ("the", "return", "function", "value"):
        src, tgt = _id(smollm2, "Ġ" + word), _id(ms, "▁" + word)
        assert m.src_to_tgt[src] == tgt and m.exact[src] and m.kind[src] == EXACT, word
    # Byte tokens: byte-level `Ã` (0xC3) <-> `<0xC3>`; a newline <-> the regular "\n" piece if the
    # SentencePiece vocabulary has one (the representative), else `<0x0A>`.
    assert m.src_to_tgt[_id(smollm2, "Ã")] == _id(ms, "<0xC3>")
    nl = ms.convert_tokens_to_ids("\n")
    assert m.src_to_tgt[_id(smollm2, "Ċ")] == (nl if nl != ms.unk_token_id else _id(ms, "<0x0A>"))


@pytest.fixture(scope="module")
def ms8k_to_smol(smollm2, metaspace_8k):
    return build_vocabulary_map(metaspace_8k, smollm2)


def test_metaspace_twins_byte_level_both_ways(smollm2, metaspace_8k, ms8k_to_smol):
    m = ms8k_to_smol
    for word in ("the", "return", "function"):
        assert m.src_to_tgt[_id(metaspace_8k, "▁" + word)] == _id(smollm2, "Ġ" + word)
    assert m.src_to_tgt[_id(metaspace_8k, "<0x0A>")] == _id(smollm2, "Ċ")
    assert m.src_to_tgt[_id(metaspace_8k, "<0xC3>")] == _id(smollm2, "Ã")
    assert m.stats()["exact_rate"] > 0.4


def test_tiny_families_find_twins(tiny):
    bl, ms, wp = tiny["byte_level"], tiny["metaspace"], tiny["wordpiece"]
    m = build_vocabulary_map(bl, ms)
    assert m.src_to_tgt[_id(bl, "Ġ")] == _id(ms, "▁")
    # "\n" exists twice in the SentencePiece vocab (a learnt piece and <0x0A>): the learnt piece wins.
    assert m.src_to_tgt[_id(bl, "Ċ")] == _id(ms, "\n")
    m = build_vocabulary_map(wp, bl)
    for piece in ("the", "fox"):
        if bl.convert_tokens_to_ids("Ġ" + piece) is not None and wp.convert_tokens_to_ids(piece) != wp.unk_token_id:
            assert m.src_to_tgt[_id(wp, piece)] == _id(bl, "Ġ" + piece)


def test_normalised_match_to_uncased_bert(bert):
    small = train_tokenizer("byte_level", ["Hello World. The fox and the Dog."] * 3, vocab_size=300)
    m = build_vocabulary_map(small, bert)
    src = _id(small, "ĠWorld")  # " World" -> BERT's lower-cased word-initial "world"
    assert m.src_to_tgt[src] == _id(bert, "world") and m.kind[src] == NORMALIZED and m.exact[src]
    assert m.src_to_tgt[_id(small, "H")] == _id(bert, "##h")  # "H" (no space) -> "h" inside a word
    assert m.src_to_tgt[_id(small, "Ġthe")] == _id(bert, "the") and m.kind[_id(small, "Ġthe")] == EXACT


# ----------------------------------------------------------------------------- specials

def test_specials_map_by_role(smollm2, metaspace_8k, smol_to_ms8k, ms8k_to_smol, bert):
    ms = metaspace_8k
    m = smol_to_ms8k
    assert m.src_to_tgt[smollm2.bos_token_id] == ms.bos_token_id  # <|endoftext|> (bos) -> <s>
    assert m.src_to_tgt[smollm2.eos_token_id] == ms.eos_token_id  # <|im_end|> (eos) -> </s>
    im_start = _id(smollm2, "<|im_start|>")  # no role, no twin: the target's unk
    assert m.src_to_tgt[im_start] == ms.unk_token_id and m.kind[im_start] == SPECIAL_FALLBACK
    assert not m.exact[im_start]

    back = ms8k_to_smol
    assert back.src_to_tgt[ms.bos_token_id] == smollm2.bos_token_id
    assert back.src_to_tgt[ms.eos_token_id] == smollm2.eos_token_id
    assert back.src_to_tgt[ms.pad_token_id] == smollm2.pad_token_id
    assert back.src_to_tgt[ms.unk_token_id] == smollm2.unk_token_id
    assert all(back.kind[i] == SPECIAL for i in (ms.bos_token_id, ms.eos_token_id, ms.pad_token_id))

    wb = build_vocabulary_map(bert, ms)  # BERT has cls/sep/mask, no bos/eos
    assert wb.src_to_tgt[bert.cls_token_id] == ms.bos_token_id
    assert wb.src_to_tgt[bert.sep_token_id] == ms.eos_token_id
    assert wb.src_to_tgt[bert.mask_token_id] == ms.unk_token_id
    assert wb.src_to_tgt[bert.pad_token_id] == ms.pad_token_id


def test_text_tokens_never_map_to_specials(tiny, bert):
    pairs = [(a, b) for a in tiny.values() for b in tiny.values()] + [(bert, tiny["metaspace"]), (tiny["wordpiece"], bert)]
    for src, tgt in pairs:
        m = build_vocabulary_map(src, tgt)
        src_special = np.asarray([s.startswith(SPECIAL_MARK) for s in token_surfaces(src)])
        tgt_special = np.asarray([s.startswith(SPECIAL_MARK) for s in token_surfaces(tgt)])
        text = ~src_special & (m.kind != UNK_FALLBACK)
        assert not tgt_special[m.src_to_tgt[text]].any()
        # Byte fragments fall back to unk only for a target without byte tokens (WordPiece).
        assert (m.kind == UNK_FALLBACK).any() == (detect_family(tgt) == "wordpiece" and detect_family(src) != "wordpiece")
        assert (m.src_to_tgt >= 0).all() and (m.src_to_tgt < len(tgt)).all()


def test_same_tokenizer_maps_to_itself(tiny, bert):
    for tok in (*tiny.values(), bert):
        m = build_vocabulary_map(tok, tok)
        surfaces = token_surfaces(tok)
        assert all(surfaces[j] == surfaces[i] for i, j in enumerate(m.src_to_tgt))
        # Identity except where two ids share a surface (BERT's never-emitted "##!" and "!").
        unique = np.asarray([surfaces.count(x) == 1 for x in surfaces]) if len(tok) < 1000 else None
        if unique is not None:
            assert (m.src_to_tgt[unique] == np.flatnonzero(unique)).all()
        assert (m.src_to_tgt == np.arange(len(tok))).mean() > 0.98
        assert m.exact.all() and m.stats()["exact_rate"] == 1.0


def test_padded_source_vocabulary(tiny):
    src, tgt = tiny["byte_level"], tiny["metaspace"]
    m = build_vocabulary_map(src, tgt, src_vocab_size=len(src) + 5)
    assert len(m) == len(src) + 5
    assert (m.src_to_tgt[-5:] == tgt.unk_token_id).all() and (m.kind[-5:] == SPECIAL_FALLBACK).all()


# ----------------------------------------------------------------------------- fuzzy + determinism

def test_nearest_tie_breaking():
    best, dist = V._nearest(["abcd", "zz", "q"], ["zbcd", "abcx", "abxx", "zy", "zx", "a"])
    # "abcd": zbcd and abcx both at 1 -> the longer common prefix (abcx); "zz": zy and zx at 1,
    # same prefix -> the lower index; "q": every 1-char choice... only "a" has length 1 -> "a".
    assert best.tolist() == [1, 3, 5] and dist.tolist() == [1, 1, 1]


def test_nearest_equals_brute_force():
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    rng = np.random.default_rng(0)
    alphabet = list("abcde ") + ["\udcc3", "é"]
    make = lambda k: ["".join(rng.choice(alphabet, size=rng.integers(1, 9))) for _ in range(k)]
    queries, choices = make(300), sorted(set(make(400)))
    best, dist = V._nearest(queries, choices)
    d = process.cdist(queries, choices, scorer=Levenshtein.distance)
    for q, b, m in zip(range(len(queries)), best, dist):
        ties = np.flatnonzero(d[q] == d[q].min())
        prefix = [len(os.path.commonprefix([queries[q], choices[c]])) for c in ties]
        assert m == d[q].min() and b == ties[int(np.argmax(prefix))]


def test_map_is_deterministic(tiny, bert):
    for src, tgt in [(bert, tiny["byte_level"]), (tiny["metaspace"], tiny["wordpiece"])]:
        a, b = build_vocabulary_map(src, tgt), build_vocabulary_map(src, tgt)
        assert np.array_equal(a.src_to_tgt, b.src_to_tgt) and np.array_equal(a.kind, b.kind)
        assert np.array_equal(a.distance, b.distance) and a.stats() == b.stats()
        assert (a.kind == FUZZY).any()


def test_map_speed_smollm2_vs_8k(smol_to_ms8k):
    """Not asserted: the time is printed by the fixture (pytest -s). Measured on the 2-core dev box
    (shared, loaded): 4.4 s; every id is mapped."""
    stats = smol_to_ms8k.stats()
    assert stats["src_vocab_size"] == 49152 and stats["tgt_vocab_size"] == 8000
    assert stats["exact_rate"] > 0.05 and stats["fuzzy_rate"] > 0.5


# ----------------------------------------------------------------------------- persistence

def test_save_load_roundtrip(tmp_path, tiny):
    m = build_vocabulary_map(tiny["wordpiece"], tiny["byte_level"])
    path = tmp_path / "sub" / "w.vocab.npz"
    m.save(path)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["w.vocab.npz"]
    back = VocabularyMap.load(path)
    for name in ("src_to_tgt", "exact", "kind", "distance"):
        assert np.array_equal(getattr(back, name), getattr(m, name))
    assert back.stats() == m.stats()
    assert back.src_fingerprint == tokenizer_fingerprint(tiny["wordpiece"]) and back.version == V.VOCAB_MAP_VERSION


def test_fingerprint(tiny, tiny_models):
    again = AutoTokenizer.from_pretrained(str(tiny_models["metaspace"]))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tiny["metaspace"])
    prints = {tokenizer_fingerprint(t) for t in tiny.values()}
    assert len(prints) == 3 and all(len(p) == 32 for p in prints)
    again.bos_token = again.eos_token  # a different start token is a different tokenizer for us
    assert tokenizer_fingerprint(again) != tokenizer_fingerprint(tiny["metaspace"])
