"""Character-level marginalisation: prefix ranges, restricted top-k, projection, and the teacher stage with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_core.alignment import FALLBACK, MARGINAL
from fusion_core.corpus_alignment import align_corpus
from fusion_core.data import Document
from fusion_core.marginal import Marginalizer, PrefixIndex
from fusion_core.teacher import project_to_target, read_shards, run_teacher, score_documents
from fusion_core.tokenization import encode_document
from fusion_core.vocab import SurfaceLookup, build_vocabulary_map, token_surfaces

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
         "12 + 35 = 47\n7 * 8 = 56\n", "café naïve résumé — unicode text survives every tokenizer."]


@pytest.fixture(scope="module")
def source(tiny_models):
    path = tiny_models["byte_level"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_prefix_ranges_equal_brute_force(smollm2):
    surfaces = token_surfaces(smollm2)
    index = PrefixIndex(surfaces)
    for prefix in ["", " ", " c", "\n ", "\n    ", "12", "re", " tokeni", "\udce6", "zzzzzz", "\U0010ffff"]:
        lo, hi = index.range(prefix)
        got = sorted(index.order[lo:hi].tolist())
        want = sorted(i for i, s in enumerate(surfaces)
                      if s.startswith(prefix) and len(s) > len(prefix) and not s.startswith("\ud800"))
        assert got == want, prefix


def test_restricted_topk_equals_brute_force(source):
    model, tok = source
    surfaces = token_surfaces(tok)
    index = PrefixIndex(surfaces)
    text = TEXTS[0]
    enc = encode_document(tok, text)
    prefixes = {3: "", 5: " ", 7: "r", 8: " r", 9: "re"}  # 397, 40, 4, 1 and 0 tokens in this vocabulary
    queries = np.asarray([(p, *index.range(c)) for p, c in prefixes.items()], dtype=np.int64)
    sc = score_documents(model, tok, [text], top_k=4, temperature=2.0, encoded=[enc], marginal_queries=[queries],
                         prefix_order=index.order)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.as_tensor(enc.ids)[None]).logits[0] / 2.0, -1).numpy()
    for r, (pos, c) in enumerate(prefixes.items()):
        ok = np.asarray([s.startswith(c) and len(s) > len(c) and not s.startswith("\ud800") for s in surfaces])
        if not ok.any():  # nothing is consistent: no entry at all
            assert np.isneginf(sc.marginal_logprobs[r]).all()
            continue
        restricted = np.where(ok, logp[pos], -np.inf)
        restricted = restricted - np.logaddexp.reduce(restricted[ok])
        want = np.argsort(-restricted, kind="stable")[:min(4, ok.sum())]
        got = np.isfinite(sc.marginal_logprobs[r])
        assert set(sc.marginal_ids[r][got].tolist()) == set(want.tolist())
        np.testing.assert_allclose(np.sort(sc.marginal_logprobs[r][got]), np.sort(restricted[want]), atol=1e-4)
        assert np.exp(sc.marginal_logprobs[r]).sum() <= 1.0 + 1e-5


def test_projection_of_candidates():
    # Source surfaces; the target has " re", " ret", "urn", "u", "x" and its own ids.
    src = ["<s>", " return", " retry", " re", " reduce", " rex"]
    tgt = {" re": 10, " ret": 11, "urn": 12, "u": 13, "x": 14, "duce": 15}
    m = Marginalizer(src, PrefixIndex(src), SurfaceLookup(tgt, None, 4))
    text = "y = return"
    # The target has read "y = re" (offset 6) inside the source token " return" (c = " re").
    cand = np.asarray([[1, 2, 4, 5]])
    lp = np.log(np.asarray([[0.5, 0.2, 0.2, 0.1]], dtype=np.float32))
    ids, out = m.project(cand, lp, [" re"], text, np.asarray([6]), np.asarray([99]))
    # " return" continues with "turn", which the text shows: the true next target token (99).
    # " retry" -> "try": no target token and no prefix of it -> dropped. " reduce" -> "duce":
    # exact. " rex" -> "x": exact.
    assert ids[0].tolist()[:1] == [99] and ids[0, 2] == 15 and ids[0, 3] == 14
    assert np.isneginf(out[0, 1]) and np.exp(out[0, 0]) == pytest.approx(0.5)


def test_teacher_fills_marginal_positions_and_falls_back_without(source, tiny_tokenizers, tmp_path):
    model, tok = source
    target = tiny_tokenizers["metaspace"]
    docs = [Document(id=f"d{i}", domain="code" if i < 2 else "prose", text=t) for i, t in enumerate(TEXTS)]
    vmap = build_vocabulary_map(tok, target)
    aligned = align_corpus(tok, target, docs, vmap.src_to_tgt)
    labels = np.concatenate([a.label for a in aligned.alignments.values()])
    assert (labels == MARGINAL).sum() > 10  # the two tokenizers cut the text differently
    common = dict(top_k=4, temperature=1.0, batch_size=2, docs_per_shard=2, src_special=vmap.special_mask())
    on = run_teacher(model, tok, target, docs, aligned.alignments, vmap.src_to_tgt, tmp_path / "on",
                     marginalizer=Marginalizer.build(tok, target), **common)
    off = run_teacher(model, tok, target, docs, aligned.alignments, vmap.src_to_tgt, tmp_path / "off", **common)
    rec_on, rec_off = read_shards(tmp_path / "on"), read_shards(tmp_path / "off")
    for doc in docs:
        t = encode_document(target, doc.text)
        al = aligned.alignments[doc.id]
        marg = np.flatnonzero(al.label == MARGINAL)
        r_on, r_off = rec_on[doc.id], rec_off[doc.id]
        # With marginalisation: a real distribution (all its entries target ids, probabilities <= 1).
        assert r_on.aligned[marg].all() and (r_on.label[marg] == MARGINAL).all()
        probs = np.exp(r_on.logprobs[marg].astype(np.float64)).sum(axis=1)
        assert (probs > 0).all() and (probs <= 1 + 2e-3).all()
        # Without: the one-hot of the TRUE NEXT target token, flagged.
        assert not r_off.aligned[marg].any() and (r_off.label[marg] == FALLBACK).all()
        assert (r_off.ids[marg, 0] == t.ids[marg + 1]).all() and (r_off.logprobs[marg, 0] == 0).all()
        # Boundary positions are the same either way.
        both = al.boundary
        np.testing.assert_array_equal(r_on.ids[both], r_off.ids[both])
    assert on.metrics()["coverage"] > off.metrics()["coverage"]
    assert on.metrics()["coverage"] == pytest.approx(aligned.report.metrics()["coverage"])


def test_special_source_predictions_are_dropped(source):
    model, tok = source
    text = TEXTS[2]
    enc = encode_document(tok, text)
    sc = score_documents(model, tok, [text], top_k=4)[0]
    special = np.zeros(len(tok), dtype=bool)
    special[sc.topk_ids[0, 0]] = True  # pretend the top prediction at position 0 is a special token
    rec = project_to_target(sc, np.arange(len(enc)), enc, np.arange(len(tok)), src_special=special)
    assert sc.topk_ids[0, 0] not in rec.ids[0][np.isfinite(rec.logprobs[0])]
    assert rec.aligned[0]


def test_text_projection_of_boundary_positions():
    from fusion_core.alignment import END, ONE_TO_MANY, ONE_TO_ONE_EXACT, PositionAlignment
    from fusion_core.teacher import SourceScores
    from fusion_core.tokenization import EncodedText

    src = ["<s>", " tokenization", " token", " the", "a"]
    lookup = SurfaceLookup({" token": 10, "ization": 11, " the": 12, "a": 13}, None, 7)
    m = Marginalizer(src, PrefixIndex(src), lookup)
    text = "a tokenization"
    target = EncodedText(ids=np.asarray([0, 13, 10, 11]), ends=np.asarray([0, 1, 7, 14]),
                         spans=np.asarray([[0, 0], [0, 1], [1, 7], [7, 14]]))
    src_ends = np.asarray([0, 1, 14])
    # At target position 1 the source (after "a") predicts " tokenization" 0.6, " the" 0.3,
    # " token" 0.1; the target's next token is " token": one source token for two target tokens.
    lp = np.log(np.asarray([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.4, 0.4, 0.2]], dtype=np.float32))
    scores = SourceScores(topk_ids=np.asarray([[4, 3, 2], [1, 3, 2], [3, 2, 1]]), topk_logprobs=lp,
                          token_ce=np.zeros(2, dtype=np.float32))
    al = PositionAlignment(np.asarray([0, 1, -1, -1]), np.asarray([ONE_TO_ONE_EXACT, ONE_TO_MANY, 5, END], np.uint8),
                           np.zeros(4, np.int32))
    fuzzy = np.asarray([0, 12, 10, 12, 13])  # the map sends " tokenization" to " the" (say, by edit distance)
    by_map = project_to_target(scores, al, target, fuzzy)
    by_text = project_to_target(scores, al, target, fuzzy, marginalizer=m, text=text, src_ids=np.asarray([0, 4, 1]),
                                projection="text", src_ends=src_ends)
    assert by_map.ids[1, :2].tolist() == [12, 10] and np.exp(by_map.logprobs[1, 0]) == pytest.approx(0.9)
    # By text: " tokenization" and " token" both continue as the document does -> " token" (0.7).
    assert by_text.ids[1, :2].tolist() == [10, 12] and np.exp(by_text.logprobs[1, 0]) == pytest.approx(0.7)
    # Exact positions are projected through the map either way.
    np.testing.assert_array_equal(by_map.ids[0], by_text.ids[0])


def test_teacher_records_do_not_depend_on_batching_or_document_order(source, tiny_tokenizers, tmp_path):
    model, tok = source
    target = tiny_tokenizers["metaspace"]
    docs = [Document(id=f"d{i}", domain="code" if i % 2 else "prose", text=t) for i, t in enumerate(TEXTS * 2)]
    vmap = build_vocabulary_map(tok, target)
    alignments = align_corpus(tok, target, docs, vmap.src_to_tgt).alignments
    marg = Marginalizer.build(tok, target)
    common = dict(top_k=4, temperature=1.0, marginalizer=marg, src_special=vmap.special_mask())
    run_teacher(model, tok, target, docs, alignments, vmap.src_to_tgt, tmp_path / "a", batch_size=1,
                docs_per_shard=8, **common)
    run_teacher(model, tok, target, docs[::-1], alignments, vmap.src_to_tgt, tmp_path / "b", batch_size=3,
                docs_per_shard=3, **common)
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].label, b[k].label)
        np.testing.assert_array_equal(a[k].aligned, b[k].aligned)
        # Padding changes matmul shapes, not results beyond float16 storage precision.
        np.testing.assert_allclose(np.exp(a[k].logprobs.astype(np.float64)), np.exp(b[k].logprobs.astype(np.float64)),
                                   atol=2e-3)
        top = np.isfinite(a[k].logprobs[:, 0])
        assert (a[k].ids[top, 0] == b[k].ids[top, 0]).mean() > 0.99
