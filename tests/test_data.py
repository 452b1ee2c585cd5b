import json

import pytest
from transformers import AutoTokenizer

from fusion_core.data import DataError, chunk_text, clean_text, prepare_documents, read_corpus_texts


def test_clean_text():
    assert clean_text("a\r\nb  \n\n\n\nc\x00\t") == "a\nb\n\nc"
    assert clean_text("cafe\u0301") == "café"


def test_read_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert read_corpus_texts(tmp_path / "a.jsonl") == ["hello world", "x"]
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("b text")
    (folder / "a.md").write_text("a text")
    assert read_corpus_texts(folder) == ["a text", "b text"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", "p2"]}), tmp_path / "c.parquet")
    assert read_corpus_texts(tmp_path / "c.parquet", text_field="content") == ["p1", "p2"]


def test_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        read_corpus_texts(tmp_path / "bad.jsonl", name="c")


def test_chunks_fit_every_tokenizer(tiny_models):
    toks = [AutoTokenizer.from_pretrained(tiny_models[f]) for f in ("byte_level", "metaspace", "wordpiece")]
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(40))
    chunks = chunk_text(text, toks, 31)
    assert "".join(chunks) == text
    assert len(chunks) > 1
    for c in chunks:
        for t in toks:
            assert len(t(c, add_special_tokens=False)["input_ids"]) <= 31


def test_prepare_is_deterministic_and_splits_by_document(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["metaspace"])
    texts = [f"document number {i} " * 20 for i in range(50)]
    kw = dict(tokenizers=[tok], max_length=32, min_chars=10, validation_fraction=0.2, seed=3)
    a = prepare_documents([("c", "prose", texts)], **kw)
    b = prepare_documents([("c", "prose", texts)], **kw)
    assert a.train == b.train and a.validation == b.validation
    train_docs = {d.id.rsplit("-", 1)[0] for d in a.train}
    val_docs = {d.id.rsplit("-", 1)[0] for d in a.validation}
    assert train_docs and val_docs and not train_docs & val_docs
    assert 0.05 < len(val_docs) / 50 < 0.4


def test_empty_corpus_is_an_error():
    with pytest.raises(DataError, match="corpus 'empty' has no documents"):
        prepare_documents([("empty", "prose", ["", "  ", "tiny"])], tokenizers=[], max_length=32, min_chars=10,
                          validation_fraction=0.1, seed=0)


def test_duplicates_are_dropped():
    res = prepare_documents([("c", "d", ["same text here!"] * 3 + ["other text here"])], tokenizers=[],
                            max_length=32, min_chars=5, validation_fraction=0.0, seed=0)
    assert len(res.train) == 2 and res.stats["dropped_duplicate"] == 2


def test_document_file_reads_by_position(tmp_path):
    from fusion_core.data import Document, DocumentFile, read_documents, write_documents

    docs = [Document(id=f"d{i}", domain="code" if i % 2 else "prose", text=f"text {i} é 😀\n" * (i + 1))
            for i in range(10)]
    write_documents(tmp_path / "train.jsonl", docs)
    f = DocumentFile(tmp_path / "train.jsonl")
    assert len(f) == 10 and f.slice(3, 6) == docs[3:6] and f.slice(8, 20) == docs[8:]
    assert f.total_chars() == sum(len(d.text) for d in docs)
    assert [d.id for d in f.sample(3)] == ["d0", "d3", "d6"]
    assert read_documents(tmp_path / "train.jsonl") == docs
