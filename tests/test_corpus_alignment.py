"""A corpus aligned against one source: saved labels, the report, unknown tokens and failing tokenizers."""
from __future__ import annotations

import numpy as np
import pytest

from fusion_core.alignment import FALLBACK, MARGINAL
from fusion_core.corpus_alignment import AlignmentError, align_corpus, load_alignment, save_alignment
from fusion_core.data import Document
from fusion_core.tokenization import encode_document

DOCS = [Document("p-1", "prose", "The tokenizer cuts 'unbelievably' differently. café 😀 ok"),
        Document("c-1", "code", "def f(a):\n    return a  \n\n\nend = 12345\n"),
        Document("c-2", "code", "for i in range(100):\n        total += i ** 2\n")]


def test_report_counts_labels_per_domain_and_shows_worst_spans(smollm2, bert, pair_tables, tmp_path):
    pair = pair_tables("bert", "smollm2")
    out = align_corpus(bert, smollm2, DOCS, pair.src_to_tgt, tables=pair, source_name="bert", target_name="smollm2",
                       vocab_stats={"exact_rate": 0.5, "src_vocab_size": 30522.0}, examples=2)
    m = out.report.metrics()
    assert set(out.alignments) == {d.id for d in DOCS}
    for domain in ("prose", "code"):
        labels = np.concatenate([out.alignments[d.id].label[:-1] for d in DOCS if d.domain == domain])
        assert m[f"positions.{domain}"] == labels.size
        assert m[f"coverage.{domain}"] == pytest.approx((labels < FALLBACK).mean())
        assert m[f"marginal_rate.{domain}"] == pytest.approx((labels == MARGINAL).mean())
    # BERT cannot encode the emoji: its [UNK] is counted, and the position that would learn
    # BERT's prediction of it falls back.
    assert m["source_unk_tokens"] == 1 and m["vocab.exact_rate"] == 0.5
    doc = DOCS[0]
    s = encode_document(bert, doc.text)
    al = out.alignments[doc.id]
    unk_next = np.flatnonzero(s.ids == bert.unk_token_id) - 1
    assert not np.isin(al.src_pos[al.label < FALLBACK], unk_next).any()
    # The worst spans: the longest runs of fallback positions, longest first, with their text.
    def longest_fallback_run(al) -> int:
        best = run = 0
        for lab in al.label[:-1]:
            run = run + 1 if lab == FALLBACK else 0
            best = max(best, run)
        return best

    runs = sorted(((longest_fallback_run(out.alignments[d.id]), d.id) for d in DOCS), key=lambda r: (-r[0], r[1]))
    expected = [r for r in runs if r[0] > 0][:2]
    assert expected  # this corpus has fallback positions (whitespace BERT never reads)
    assert [(w.positions, w.doc_id) for w in out.report.worst] == expected
    for w in out.report.worst:
        text = next(d.text for d in DOCS if d.id == w.doc_id)
        assert w.text == text[w.start:w.end] and w.text and w.target_tokens
    md = out.report.markdown()
    assert "# Alignment report: bert -> smollm2" in md and "| coverage |" in md and "## Worst-aligned spans" in md
    assert "source unk tokens: 1" in md
    # Saved and read back unchanged.
    save_alignment(tmp_path / "a.parquet", out.alignments)
    back = load_alignment(tmp_path / "a.parquet")
    for k, v in out.alignments.items():
        for f in ("src_pos", "label", "consumed"):
            assert np.array_equal(getattr(back[k], f), getattr(v, f))


def test_dtw_method(smollm2, bert, pair_tables):
    pair = pair_tables("smollm2", "bert")
    offsets = align_corpus(smollm2, bert, DOCS, pair.src_to_tgt, tables=pair, marginalize=False)
    dtw = align_corpus(smollm2, bert, DOCS, pair.src_to_tgt, tables=pair, method="dtw")
    assert dtw.report.method == "dtw" and "method `dtw`" in dtw.report.markdown()
    agree = found = 0
    for d in DOCS:
        a, b = offsets.alignments[d.id], dtw.alignments[d.id]
        assert MARGINAL not in b.label
        # Where both align a position, they pick source states that have read the same text up
        # to whitespace (DTW may pick the state before an indentation run, offsets the one after).
        both = (b.label < FALLBACK) & (a.label < FALLBACK)
        src = encode_document(smollm2, d.text)
        for x, y in zip(a.src_pos[both].tolist(), b.src_pos[both].tolist()):
            assert d.text[:src.ends[x]].rstrip() == d.text[:src.ends[y]].rstrip(), (d.id, x, y)
        agree, found = agree + both.sum(), found + (a.label < FALLBACK).sum()
    assert agree >= 0.5 * found  # plain DTW wanders where granularities differ (see test_alignment)
    with pytest.raises(ValueError, match="method must be"):
        align_corpus(smollm2, bert, DOCS, pair.src_to_tgt, method="fuzzy")


def test_a_tokenizer_that_fails_on_a_document_is_named(smollm2, bert):
    class Broken:
        """A tokenizer that raises on one document (as a tokenizer bug or a bad normaliser would)."""

        is_fast = True
        name_or_path = "broken"
        unk_token_id = None

        def __call__(self, text, **kw):
            if "12345" in text:
                raise RuntimeError("offset overflow")
            return bert(text, **kw)

        def __getattr__(self, name):
            return getattr(bert, name)

    with pytest.raises(AlignmentError, match=r"source 'weird' tokenizer cannot encode document 'c-1' \(code\): "
                                             r"offset overflow"):
        align_corpus(Broken(), smollm2, DOCS, None, source_name="weird")


def test_old_alignment_files_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["a"], "tgt_to_src": [[0, 1]]}), tmp_path / "old.parquet")
    with pytest.raises(AlignmentError, match="rerun align_vocabularies"):
        load_alignment(tmp_path / "old.parquet")


def test_alignment_file_reads_only_the_row_groups_a_shard_needs(tmp_path, monkeypatch):
    import fusion_core.corpus_alignment as ca
    from fusion_core.alignment import PositionAlignment
    from fusion_core.corpus_alignment import AlignmentFile

    monkeypatch.setattr(ca, "ROW_GROUP", 4)
    rng = np.random.default_rng(0)
    alignments = {}
    for i in range(10):
        n = int(rng.integers(2, 9))
        alignments[f"doc-{9 - i}"] = PositionAlignment(np.arange(n), np.zeros(n, np.uint8), np.zeros(n, np.int32))
    save_alignment(tmp_path / "a.parquet", alignments)  # in the stage's order, not sorted
    f = AlignmentFile(tmp_path / "a.parquet")
    assert len(f) == 10 and "doc-3" in f and f._file.num_row_groups == 3
    read = []
    original = f._file.read_row_group
    monkeypatch.setattr(f._file, "read_row_group", lambda g, **kw: read.append(g) or original(g, **kw))
    got = f.get(["doc-5", "doc-4"])  # rows 4 and 5: the second row group only
    assert read == [1] and set(got) == {"doc-5", "doc-4"}
    assert np.array_equal(got["doc-4"].src_pos, alignments["doc-4"].src_pos)
    with pytest.raises(KeyError, match="'doc-x' has no alignment"):
        f.get(["doc-x"])
