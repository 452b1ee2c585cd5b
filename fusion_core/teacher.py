"""teacher_inference: score documents with a source model and project its predictions onto the target.

For every TARGET position t of a document, the stored record holds the source's top-k
next-token log-probabilities mapped into the target vocabulary (duplicates merged by
log-sum-exp), and whether t was aligned to a source position. A position that is not aligned
holds the one-hot of the TRUE NEXT target token (not the current one), so training can still
give it full weight. Records are written as compact parquet shards: ids in the narrowest
unsigned type that holds the target vocabulary, log-probabilities as float16, no padding.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fusion_core.data import Document
from fusion_core.tokenization import EncodedText, encode_document


@dataclass
class SourceScores:
    """One document scored by a source model in its own tokenization."""

    topk_ids: np.ndarray       # int64 [n_s, k], source vocabulary
    topk_logprobs: np.ndarray  # float32 [n_s, k], log-softmax(logits / T)
    token_ce: np.ndarray       # float32 [n_s - 1], -log p(next token) at T = 1

    @property
    def seq_ce(self) -> float:
        return float(self.token_ce.mean()) if len(self.token_ce) else 0.0


@dataclass
class TeacherRecord:
    """One document's teacher signal at target positions."""

    ids: np.ndarray        # int64 [n_t, k], target vocabulary
    logprobs: np.ndarray   # float32 [n_t, k]; -inf marks an unused entry
    aligned: np.ndarray    # bool [n_t]
    seq_ce: float          # the source's mean CE on the document (its own tokens)
    source_tokens: int


def score_documents(model, tokenizer, texts: Sequence[str], *, top_k: int, temperature: float = 1.0,
                    batch_size: int = 8, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> list[SourceScores]:
    """Top-k log-probabilities and per-token CE of `model` on each text (start token prepended).

    Documents are batched by length (longest first) so padding stays small. The result is in
    the order of `texts`. progress(tokens_done, docs_done) is called after each batch.
    """
    import torch

    encoded = [encode_document(tokenizer, t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[SourceScores | None] = [None] * len(texts)
    done_tokens = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lengths = [len(encoded[i]) for i in idx]
        width = max(lengths)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :lengths[r]] = torch.from_numpy(encoded[i].ids)
            mask[r, :lengths[r]] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            nxt = ids[:, 1:].to(device)
            ce = -logp[:, :-1].gather(-1, nxt[..., None])[..., 0]
            scaled = logp if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
            top_lp, top_ids = scaled.topk(top_k, dim=-1)
        top_lp, top_ids, ce = top_lp.cpu().numpy(), top_ids.cpu().numpy(), ce.cpu().numpy()
        for r, i in enumerate(idx):
            n = lengths[r]
            results[i] = SourceScores(topk_ids=top_ids[r, :n].astype(np.int64),
                                      topk_logprobs=top_lp[r, :n].astype(np.float32),
                                      token_ce=ce[r, :n - 1].astype(np.float32))
        done_tokens += sum(lengths)
        if progress is not None:
            progress(done_tokens, b + len(idx))
    return results  # type: ignore[return-value]


def merge_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, merge equal ids by log-sum-exp of their log-probabilities; rows sorted by probability.

    ids, logprobs: [A, k]. Returns arrays of the same shape, merged entries first (descending),
    the freed slots filled with id 0 and -inf.
    """
    a, k = ids.shape
    if a == 0:
        return ids.copy(), logprobs.copy()
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, axis=1)
    slp = np.take_along_axis(logprobs, order, axis=1).astype(np.float64)
    new_group = np.ones_like(sid, dtype=bool)
    new_group[:, 1:] = sid[:, 1:] != sid[:, :-1]
    flat_starts = np.flatnonzero(new_group.ravel())
    probs = np.exp(slp).ravel()
    merged_p = np.add.reduceat(probs, flat_starts)
    rows = flat_starts // k
    rank_in_row = np.arange(len(flat_starts)) - np.searchsorted(flat_starts // k, rows, side="left")
    out_ids = np.zeros((a, k), dtype=ids.dtype)
    out_lp = np.full((a, k), -np.inf, dtype=np.float64)
    out_ids[rows, rank_in_row] = sid.ravel()[flat_starts]
    with np.errstate(divide="ignore"):
        out_lp[rows, rank_in_row] = np.log(merged_p)
    resort = np.argsort(-out_lp, axis=1, kind="stable")
    out_ids = np.take_along_axis(out_ids, resort, axis=1)
    out_lp = np.take_along_axis(out_lp, resort, axis=1)
    out_ids[~np.isfinite(out_lp)] = 0
    return out_ids, out_lp.astype(np.float32)


def project_to_target(scores: SourceScores, tgt_to_src: np.ndarray, target: EncodedText,
                      src_to_tgt: np.ndarray) -> TeacherRecord:
    """Map a source's predictions onto target positions and ids.

    tgt_to_src: [n_t] source position aligned with each target position, -1 where none.
    src_to_tgt: the vocabulary map, [V_src] -> target id.
    """
    n_t, k = len(target), scores.topk_ids.shape[1]
    ids = np.zeros((n_t, k), dtype=np.int64)
    lp = np.full((n_t, k), -np.inf, dtype=np.float32)
    aligned = np.zeros(n_t, dtype=bool)
    has_next = np.arange(n_t) < n_t - 1
    src_pos = np.asarray(tgt_to_src, dtype=np.int64)
    use = has_next & (src_pos >= 0) & (src_pos < len(scores.topk_ids))
    if use.any():
        mapped = src_to_tgt[scores.topk_ids[src_pos[use]]]
        m_ids, m_lp = merge_duplicates(mapped, scores.topk_logprobs[src_pos[use]])
        ids[use], lp[use], aligned[use] = m_ids, m_lp, True
    # No teacher signal: the one-hot of the TRUE NEXT token (label at t), flagged.
    fallback = has_next & ~use
    ids[fallback, 0] = target.ids[1:][fallback[:-1]] if n_t > 1 else 0
    lp[fallback, 0] = 0.0
    return TeacherRecord(ids=ids, logprobs=lp, aligned=aligned, seq_ce=scores.seq_ce,
                         source_tokens=len(scores.topk_ids))


# ---------------------------------------------------------------- shards

def id_dtype(vocab_size: int):
    """The narrowest unsigned integer type that holds every id of a vocabulary."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return dt
    return np.uint64


def write_shard(path: Path, doc_ids: Sequence[str], domains: Sequence[str], records: Sequence[TeacherRecord],
                vocab_size: int) -> int:
    """Write records as one parquet shard atomically; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dt = id_dtype(vocab_size)
    arrow_dt = {np.uint8: pa.uint8(), np.uint16: pa.uint16(), np.uint32: pa.uint32(), np.uint64: pa.uint64()}[dt]
    k = records[0].ids.shape[1] if records else 0
    table = pa.table({
        "doc_id": pa.array(list(doc_ids), pa.string()),
        "domain": pa.array(list(domains), pa.string()),
        "positions": pa.array([len(r.aligned) for r in records], pa.int32()),
        "ids": pa.array([r.ids.astype(dt).ravel() for r in records], pa.list_(arrow_dt)),
        "logprobs": pa.array([r.logprobs.astype(np.float16).ravel() for r in records], pa.list_(pa.float16())),
        "aligned": pa.array([r.aligned for r in records], pa.list_(pa.bool_())),
        "seq_ce": pa.array([r.seq_ce for r in records], pa.float32()),
        "source_tokens": pa.array([r.source_tokens for r in records], pa.int32()),
    }, metadata={"top_k": str(k), "vocab_size": str(vocab_size)})
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return Path(path).stat().st_size


def read_shards(folder: Path) -> dict[str, TeacherRecord]:
    """All records of a source's shard folder, by document id."""
    import pyarrow.parquet as pq

    out: dict[str, TeacherRecord] = {}
    for path in sorted(Path(folder).glob("shard-*.parquet")):
        table = pq.read_table(path)
        k = int(table.schema.metadata[b"top_k"])
        cols = {c: table.column(c).to_pylist() for c in ("doc_id", "positions", "seq_ce", "source_tokens")}
        ids_col, lp_col, al_col = table.column("ids"), table.column("logprobs"), table.column("aligned")
        for row, doc_id in enumerate(cols["doc_id"]):
            n = cols["positions"][row]
            out[doc_id] = TeacherRecord(
                ids=np.asarray(ids_col[row].values.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, k),
                logprobs=np.asarray(lp_col[row].values.to_numpy(zero_copy_only=False),
                                    dtype=np.float32).reshape(n, k),
                aligned=np.asarray(al_col[row].values.to_numpy(zero_copy_only=False), dtype=bool),
                seq_ce=float(cols["seq_ce"][row]), source_tokens=int(cols["source_tokens"][row]))
    return out


@dataclass
class TeacherRunStats:
    documents: int
    source_tokens: int
    target_positions: int
    seconds: float
    bytes: int
    ce_by_domain: dict[str, float]

    def metrics(self) -> dict[str, float]:
        m = {"documents": self.documents, "source_tokens": self.source_tokens,
             "target_positions": self.target_positions, "seconds": self.seconds,
             "tokens_per_s": self.source_tokens / self.seconds if self.seconds else 0.0,
             "bytes_per_target_token": self.bytes / max(self.target_positions, 1)}
        for d, ce in self.ce_by_domain.items():
            m[f"ce.{d}"] = ce
            m[f"perplexity.{d}"] = float(np.exp(ce))
        return m


def run_teacher(model, src_tokenizer, tgt_tokenizer, docs: Sequence[Document], tgt_to_src: dict[str, np.ndarray],
                src_to_tgt: np.ndarray, out_dir: Path, *, top_k: int, temperature: float, batch_size: int,
                docs_per_shard: int, device: str = "cpu",
                progress: Callable[[int, int], None] | None = None) -> TeacherRunStats:
    """Score `docs` with one source and write its shards (shard-00000.parquet, ...) into out_dir."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = positions = size = 0
    ce_sum: dict[str, float] = {}
    ce_n: dict[str, int] = {}
    done_docs = 0
    for s, lo in enumerate(range(0, len(docs), docs_per_shard)):
        chunk = docs[lo:lo + docs_per_shard]
        base_tokens = tokens

        def _progress(t: int, d: int) -> None:
            if progress is not None:
                progress(base_tokens + t, done_docs + d)

        scores = score_documents(model, src_tokenizer, [d.text for d in chunk], top_k=top_k,
                                 temperature=temperature, batch_size=batch_size, device=device, progress=_progress)
        records = []
        for doc, sc in zip(chunk, scores):
            if doc.id not in tgt_to_src:
                raise KeyError(f"document {doc.id!r} has no alignment for this source")
            target = encode_document(tgt_tokenizer, doc.text)
            records.append(project_to_target(sc, tgt_to_src[doc.id], target, src_to_tgt))
            tokens += len(sc.topk_ids)
            positions += len(target)
            ce_sum[doc.domain] = ce_sum.get(doc.domain, 0.0) + float(sc.token_ce.sum())
            ce_n[doc.domain] = ce_n.get(doc.domain, 0) + len(sc.token_ce)
        size += write_shard(out_dir / f"shard-{s:05d}.parquet", [d.id for d in chunk], [d.domain for d in chunk],
                            records, len(tgt_tokenizer))
        done_docs += len(chunk)
    ce_by_domain = {d: ce_sum[d] / ce_n[d] for d in sorted(ce_sum) if ce_n[d]}
    return TeacherRunStats(documents=len(docs), source_tokens=tokens, target_positions=positions,
                           seconds=time.perf_counter() - start, bytes=size, ce_by_domain=ce_by_domain)


def iter_fusion_examples(docs: Sequence[Document], tgt_tokenizer,
                         teachers: Sequence[dict[str, TeacherRecord]]) -> Iterator:
    """FusionExample per document: target ids plus every source's record, stacked [K, ...]."""
    from fusion_core.fusion import FusionExample

    for doc in docs:
        target = encode_document(tgt_tokenizer, doc.text)
        n = len(target)
        recs = [t[doc.id] for t in teachers]
        for r in recs:
            if len(r.aligned) != n:
                raise ValueError(f"document {doc.id!r}: teacher record has {len(r.aligned)} positions, "
                                 f"target tokenization has {n}; the stages are out of date")
        k = recs[0].ids.shape[1] if recs else 1
        yield FusionExample(
            input_ids=target.ids, domain=doc.domain,
            teacher_ids=np.stack([r.ids for r in recs]) if recs else np.zeros((0, n, k), np.int64),
            teacher_logprobs=np.stack([r.logprobs for r in recs]) if recs else np.zeros((0, n, k), np.float32),
            teacher_aligned=np.stack([r.aligned for r in recs]) if recs else np.zeros((0, n), bool),
            teacher_seq_ce=np.asarray([r.seq_ce for r in recs], dtype=np.float32),
        )
