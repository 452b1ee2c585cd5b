import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_core.data import Document
from fusion_core.teacher import (
    id_dtype, merge_duplicates, project_to_target, read_shards, run_teacher, score_documents,
    topk_logsumexp,
)
from fusion_core.tokenization import encode_document

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "12 + 35 = 47"]


@pytest.fixture(scope="module")
def byte_model(tiny_models):
    path = tiny_models["byte_level"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_scores_equal_direct_computation(byte_model, temperature):
    model, tok = byte_model
    # Batches of 2 documents of different lengths: padded rows are scored over their real positions.
    scores = score_documents(model, tok, TEXTS, top_k=5, batch_size=2, temperature=temperature)
    for text, sc in zip(TEXTS, scores):
        ids = torch.as_tensor(encode_document(tok, text).ids)[None]
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        lp, top = torch.topk(torch.log_softmax(out.logits[0] / temperature, -1), 5)
        np.testing.assert_array_equal(sc.topk_ids, top.numpy())
        np.testing.assert_allclose(sc.topk_logprobs, lp.numpy(), atol=1e-5)
        # Per-sequence CE is the model's own loss (mean next-token CE, at temperature 1).
        assert sc.seq_ce == pytest.approx(out.loss.item(), abs=1e-5)
        # The score strategies compare: the summed NLL per UTF-8 byte of the text.
        assert sc.nll_per_byte == pytest.approx(out.loss.item() * (ids.shape[1] - 1) / len(text.encode()), rel=1e-5)


def test_topk_logsumexp_equals_torch_and_keeps_non_finite_rows():
    # More rows than one cache-sized chunk, so the chunked sums and their seams are exercised.
    torch.manual_seed(0)
    x = torch.randn(150, 20_000) * 4
    x[7, 3] = float("nan")
    x[52, 5] = float("inf")
    x[149] = float("-inf")
    for temperature in (1.0, 2.0):
        values, ids, lse, lse_t = topk_logsumexp(x, 5, temperature)
        want_v, want_i = x.topk(5, dim=-1)
        torch.testing.assert_close(values, want_v, equal_nan=True)
        ok = torch.ones(150, dtype=torch.bool)
        ok[[7, 52, 149]] = False
        assert torch.equal(ids[ok], want_i[ok])
        torch.testing.assert_close(lse[ok], torch.logsumexp(x[ok], dim=-1))
        if temperature == 1.0:
            assert lse_t is None
        else:
            torch.testing.assert_close(lse_t[ok], torch.logsumexp(x[ok] / temperature, dim=-1))
        # A row with NaN, +inf or nothing but -inf has no normaliser: flagged, never a number.
        assert not torch.isfinite(lse[[7, 52, 149]]).any()


def test_merge_duplicates_uses_log_sum_exp():
    ids = np.array([[5, 3, 5, 7], [1, 1, 1, 1]])
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    m_ids, m_lp = merge_duplicates(ids, lp.astype(np.float32))
    np.testing.assert_array_equal(m_ids[0, :3], [5, 3, 7])
    np.testing.assert_allclose(np.exp(m_lp[0, :3]), [0.6, 0.3, 0.1], atol=1e-6)
    assert m_ids[1, 0] == 1 and np.exp(m_lp[1, 0]) == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.isneginf(m_lp[1, 1:])) and np.all(m_ids[1, 1:] == 0)


def test_unaligned_positions_get_the_next_token_one_hot(byte_model):
    model, tok = byte_model
    text = TEXTS[0]
    target = encode_document(tok, text)
    sc = score_documents(model, tok, [text], top_k=4)[0]
    n = len(target)
    tgt_to_src = np.arange(n)
    tgt_to_src[2] = -1
    identity = np.arange(len(tok))
    rec = project_to_target(sc, tgt_to_src, target, identity)
    assert not rec.aligned[2] and rec.ids[2, 0] == target.ids[3] and rec.logprobs[2, 0] == 0.0
    assert rec.aligned[0] and np.array_equal(rec.ids[0], sc.topk_ids[0])
    assert not rec.aligned[-1]  # the last position predicts nothing


def test_shards_round_trip_compactly(byte_model, tmp_path):
    model, tok = byte_model
    docs = [Document(id=f"d{i}", domain="code" if i % 2 else "prose", text=t) for i, t in enumerate(TEXTS * 2)]
    align = {d.id: np.arange(len(encode_document(tok, d.text))) for d in docs}
    stats = run_teacher(model, tok, tok, docs, align, np.arange(len(tok)), tmp_path, top_k=4, temperature=1.0,
                        batch_size=3, docs_per_shard=4)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    recs = read_shards(tmp_path)
    assert set(recs) == {d.id for d in docs}
    direct = score_documents(model, tok, [docs[1].text], top_k=4)[0]
    np.testing.assert_array_equal(recs["d1"].ids[:-1], direct.topk_ids[:-1])
    np.testing.assert_allclose(recs["d1"].logprobs[:-1], direct.topk_logprobs[:-1], atol=2e-3)  # float16
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "shard-00000.parquet")
    assert str(schema.field("ids").type) == "list<element: uint16>"
    assert str(schema.field("logprobs").type) == "list<element: halffloat>"
    assert stats.target_positions == sum(len(encode_document(tok, d.text)) for d in docs)
    assert set(stats.ce_by_domain) == {"code", "prose"}


def test_id_dtype_is_narrowest():
    assert id_dtype(256) == np.uint8 and id_dtype(257) == np.uint16 and id_dtype(49152) == np.uint16
    assert id_dtype(70000) == np.uint32


# ----------------------------------------------------------------------------- shards: resume, checksums, bad input

class _Killed(RuntimeError):
    pass


class _CountingModel(torch.nn.Module):
    """Wraps a model; counts forward calls and can die after a number of them (a killed worker)."""

    def __init__(self, model, die_after: int | None = None):
        super().__init__()
        self.inner, self.calls, self.die_after = model, 0, die_after
        self.config = model.config

    def forward(self, **kw):
        if self.die_after is not None and self.calls >= self.die_after:
            raise _Killed("killed")
        self.calls += 1
        return self.inner(**kw)


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}


def _docs():
    return [Document(id=f"d{i}", domain="code" if i % 2 else "prose", text=t) for i, t in enumerate(TEXTS * 4)]


def test_killed_run_resumes_only_missing_shards_byte_identical(byte_model, tmp_path):
    model, tok = byte_model
    docs = _docs()  # 12 documents, 3 per shard: 4 shards; batch_size 3: one forward per shard
    align = {d.id: np.arange(len(encode_document(tok, d.text))) for d in docs}
    common = dict(top_k=4, temperature=1.0, batch_size=3, docs_per_shard=3, fingerprint="fp")
    run_teacher(model, tok, tok, docs, align, np.arange(len(tok)), tmp_path / "whole", **common)
    whole = _shard_bytes(tmp_path / "whole")
    assert len(whole) == 4

    with pytest.raises(_Killed):
        run_teacher(_CountingModel(model, die_after=2), tok, tok, docs, align, np.arange(len(tok)),
                    tmp_path / "resumed", **common)
    assert len(_shard_bytes(tmp_path / "resumed")) == 2  # the two shards finished before the kill
    counting = _CountingModel(model)
    stats = run_teacher(counting, tok, tok, docs, align, np.arange(len(tok)), tmp_path / "resumed", **common)
    assert counting.calls == 2  # only the two missing shards were scored
    assert _shard_bytes(tmp_path / "resumed") == whole
    assert stats.documents == len(docs) and stats.source_tokens == sum(len(encode_document(tok, d.text)) for d in docs)


def test_corrupt_or_foreign_shard_is_detected_and_rescored(byte_model, tmp_path):
    from fusion_core.teacher import plan_shards, shard_state

    model, tok = byte_model
    docs = _docs()
    align = {d.id: np.arange(len(encode_document(tok, d.text))) for d in docs}
    common = dict(top_k=4, temperature=1.0, batch_size=3, docs_per_shard=3)
    run_teacher(model, tok, tok, docs, align, np.arange(len(tok)), tmp_path, fingerprint="fp", **common)
    whole = _shard_bytes(tmp_path)
    specs = plan_shards(len(docs), 3)
    path = tmp_path / specs[1].name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shard_state(tmp_path, specs[1], "fp") == (False, "checksum mismatch")
    assert shard_state(tmp_path, specs[0], "other") == (False, "from another configuration")
    counting = _CountingModel(model)
    run_teacher(counting, tok, tok, docs, align, np.arange(len(tok)), tmp_path, fingerprint="fp", **common)
    assert counting.calls == 1 and _shard_bytes(tmp_path) == whole
    # Another configuration (fingerprint) rescores everything.
    counting = _CountingModel(model)
    run_teacher(counting, tok, tok, docs, align, np.arange(len(tok)), tmp_path, fingerprint="fp2", **common)
    assert counting.calls == 4


def test_nan_logits_and_too_long_documents_are_named(byte_model, tmp_path):
    from fusion_core.teacher import TeacherError

    model, tok = byte_model
    docs = _docs()[:3]
    align = {d.id: np.arange(len(encode_document(tok, d.text))) for d in docs}

    class NaNModel(_CountingModel):
        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits[1, 2, 5] = float("nan")  # the second document of the length-sorted batch
            return out

    common = dict(top_k=4, temperature=1.0, batch_size=3, docs_per_shard=3, source_name="src")
    with pytest.raises(TeacherError, match=r"source 'src' returned non-finite \(NaN/inf\) logits on document 'd\d'"):
        run_teacher(NaNModel(model), tok, tok, docs, align, np.arange(len(tok)), tmp_path / "nan", **common)
    assert not list((tmp_path / "nan").glob("shard-*"))  # nothing half-written
    first_long = next(d for d in docs if len(encode_document(tok, d.text)) > 8)
    with pytest.raises(TeacherError, match=rf"source 'src': document '{first_long.id}' has \d+ tokens .* context \(8\)"):
        run_teacher(model, tok, tok, docs, align, np.arange(len(tok)), tmp_path / "long", context_length=8, **common)


def test_shards_hold_per_token_ce(byte_model, tmp_path):
    model, tok = byte_model
    docs = _docs()[:3]
    align = {d.id: np.arange(len(encode_document(tok, d.text))) for d in docs}
    run_teacher(model, tok, tok, docs, align, np.arange(len(tok)), tmp_path, top_k=4, temperature=1.0,
                batch_size=3, docs_per_shard=3)
    recs = read_shards(tmp_path)
    for d in docs:
        sc = score_documents(model, tok, [d.text], top_k=4)[0]
        np.testing.assert_allclose(recs[d.id].token_ce, sc.token_ce, rtol=2e-3, atol=2e-3)  # float16
        assert recs[d.id].seq_ce == pytest.approx(sc.seq_ce, abs=1e-5)
        assert recs[d.id].nll_per_byte == pytest.approx(sc.nll_per_byte, rel=1e-5)
